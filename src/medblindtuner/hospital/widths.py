"""Hospital side, in the clear: the PCA widths a recipe weighs (`hospital.recipe`).

Every candidate width whose `MIN_EPOCHS` encrypted epochs fit the time allowance
(`hospital.budget`) is weighed by its probe's validation log-loss; the widths tied with the
best are preferred, widest first.
"""

from __future__ import annotations

import numpy as np

from medblindtuner.features.extract import FeatureSet
from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import BOOTSTRAP
from medblindtuner.hospital.budget import (
    MIN_EPOCHS,
    TIME_ALLOWANCE_HOURS,
    chunks_per_step,
    epoch_seconds,
)
from medblindtuner.hospital.reference import fit_logistic, sample_log_losses, tied_with_best

PCA_CANDIDATES = (31, 63, 127, 255, 511, 1023)


def choose_pca_dims(features: FeatureSet, n_classes: int, c: float, slots: int,
                    candidates: tuple[int, ...] = PCA_CANDIDATES,
                    hours: float = TIME_ALLOWANCE_HOURS,
                    refresh: str = BOOTSTRAP) -> tuple[list[int | None], str]:
    """Widths to try, preferred first: every affordable width whose probe is tied with the
    best on validation, widest first (`derive_recipe` takes the first that keeps the probe's
    prior).

    Tied: the mean paired difference of per-sample validation log-losses to the best width is
    at most its standard error. Affordable: `MIN_EPOCHS` encrypted epochs fit the time
    allowance (`hospital.budget`). A softmax head's step bootstraps the denominators of all
    its chunks at once, so its memory grows with the chunks of a step: a wider softmax width
    may not add chunks to a step.
    """
    x_train, y_train = features.splits["train"]
    x_val, y_val = features.splits["val"]
    y_train = np.asarray(y_train).reshape(-1).astype(int)
    y_val = np.asarray(y_val).reshape(-1).astype(int)
    n, n_val = len(x_train), len(y_val)

    def layout(k: int) -> PackingLayout:
        return PackingLayout(slots, k + 1)

    def epoch_hours(k: int) -> float:
        return epoch_seconds(n, n_val, layout(k), n_classes, refresh) / 3600.0

    def affordable(k: int) -> bool:
        return MIN_EPOCHS * epoch_hours(k) <= hours

    usable = [k for k in candidates if k < min(x_train.shape[1], n)
              and (k == candidates[0] or affordable(k))]
    if not usable:
        return [None], f"{x_train.shape[1]} features: no PCA needed"
    losses = {}
    for k in usable:
        scaler = FeatureScaler(standardize=True, n_components=k).fit(x_train)
        model = fit_logistic(scaler.project(x_train), y_train, c, n_classes)
        losses[k] = sample_log_losses(model, scaler.project(x_val), y_val)
    best = min(losses, key=lambda k: losses[k].mean())
    tied = [k for k in usable if tied_with_best(losses[k] - losses[best])]
    chunks = {k: chunks_per_step(n, layout(k), n_classes) for k in tied}
    fewest = min(chunks.values())
    preferred = sorted((k for k in tied if n_classes == 2 or chunks[k] <= fewest),
                       reverse=True)
    table = ", ".join(f"{k}: {losses[k].mean():.4f}" for k in usable)
    hours_at = ", ".join(f"{k}: {epoch_hours(k):.2g}" for k in usable)
    return preferred, (f"widest affordable width (estimated hours an epoch: {hours_at}; "
                       f"allowance {hours:g} h for at least {MIN_EPOCHS} epochs) whose probe's "
                       f"validation log-loss is within one paired standard error of the best "
                       f"({table}; tied: {tied})"
                       + ("" if n_classes == 2 else ", with the fewest chunks per step")
                       + " and whose settings keep the probe's prior")
