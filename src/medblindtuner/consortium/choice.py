"""PCA width and weight decay a consortium agrees on without a pooled probe.

One hospital picks its width and prior with a probe fitted on its own rows
(`hospital.recipe`). No hospital can fit the union's probe. The width is the widest of
`PCA_CANDIDATES` the time allowance affords (`candidate_widths`; the recipe, too, prefers
the widest its validation cannot tell apart). The decay is scored with a stand-in that every
hospital computes from the pooled sums alone: the one-Newton-step logistic model from zero,

    W(wd) = (h Z^T Z / n + wd I)^-1 Z^T (Y - 1/c) / n     (sigmoid: targets y - 1/2),

on the union's features Z scaled at that width (`PooledStatistics.scaler`), for every decay
of `DECAY_GRID`. Z^T Z and Z^T Y follow from the pooled feature sums, outer products and
per-class sums. Each hospital scores every stand-in on its own validation rows; the sums are
securely aggregated, so every hospital learns the union's mean validation loss per decay and
nothing per hospital; the lowest sets the decay. (Scoring widths by the stand-ins, with the
recipe's tie rule, was tried: it disfavours widths near the row count, BreastMNIST -3.4 AUC;
docs/results.md.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.he.packing import PackingLayout
from medblindtuner.hospital.budget import MIN_EPOCHS, affordable_epochs
from medblindtuner.hospital.widths import PCA_CANDIDATES
from medblindtuner.training.plain import curvature_weight

DECAY_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, -1, 11))


def class_sums(x_train: np.ndarray, y_train: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, d + 1): each class's feature sum and row count (one hospital's, masked
    before it leaves)."""
    x = np.asarray(x_train, dtype=np.float64)
    y = np.asarray(y_train).reshape(-1).astype(int)
    return np.stack([np.append(x[y == k].sum(axis=0), float(np.sum(y == k)))
                     for k in range(n_classes)])


def candidate_widths(dim: int, n_train: int, n_val: int, n_classes: int, slots: int,
                     refresh: str) -> list[int | None]:
    """`PCA_CANDIDATES` below min(dim, n_train) whose `MIN_EPOCHS` encrypted epochs fit the
    time allowance (the narrowest always), narrowest first: the consortium takes the last;
    [None] (every feature) when none is below."""
    usable = [k for k in PCA_CANDIDATES if k < min(dim, n_train)]
    fits = [k for k in usable if k == usable[0] or affordable_epochs(
        n_train, n_val, PackingLayout(slots, k + 1), n_classes, refresh=refresh) > MIN_EPOCHS]
    return fits or [None]


def newton_models(scaler: FeatureScaler, n_train: int, feature_sum: np.ndarray,
                  outer_sum: np.ndarray, sums_by_class: np.ndarray, n_classes: int,
                  decays: Sequence[float] = DECAY_GRID) -> list[np.ndarray]:
    """W(k, wd) for each decay, (width + 1, rows): from the pooled sums, in the coordinates
    `scaler.augment` gives (rows beyond the norm bound unclipped: a stand-in only)."""
    n = n_train
    mean = feature_sum / n
    basis = (scaler.components_ if scaler.components_ is not None
             else np.eye(len(mean))) * (scaler.scale_ / scaler.std_)[None, :]
    k = basis.shape[0]
    gram = np.zeros((k + 1, k + 1))
    gram[:k, :k] = basis @ (outer_sum - n * np.outer(mean, mean)) @ basis.T
    gram[k, k] = n * scaler.bias_**2
    counts = sums_by_class[:, -1]
    zy = np.vstack([basis @ (sums_by_class[:, :-1] - counts[:, None] * mean).T,
                    counts[None, :] * scaler.bias_])  # (k + 1, classes)
    ones = np.zeros(k + 1)
    ones[k] = n * scaler.bias_
    target = (zy[:, 1] - 0.5 * ones)[:, None] if n_classes == 2 else (
        zy - ones[:, None] / n_classes)
    h = curvature_weight(n_classes)
    return [np.linalg.solve(h * gram / n + wd * np.eye(k + 1), target / n) for wd in decays]


def sample_losses(weights: np.ndarray, z: np.ndarray, y: np.ndarray,
                  n_classes: int) -> np.ndarray:
    """Per-row log-loss of a stand-in model on scaled, bias-augmented rows `z`."""
    y = np.asarray(y).reshape(-1).astype(int)
    logits = z @ weights
    if n_classes == 2:
        return np.where(y == 1, np.logaddexp(0, -logits[:, 0]), np.logaddexp(0, logits[:, 0]))
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]
