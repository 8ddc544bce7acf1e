"""Plaintext softmax/sigmoid head trainer in numpy: the reference and the encrypted step's mirror.

The update is exactly the one the encrypted trainer performs, in the same order, on the same
fixed batches (the hospital fixes the batches when it encrypts; the epoch's batch order comes
from the seed):

    V  = (1 + m) W - m W_prev                    (Nesterov look-ahead)
    Z  = X_b V^T                                 (logits)
    P  = head(Z)                                 (exact, or the shared polynomial mirror)
    W_prev, W = W, (1 - lr wd) V - (lr / n_b) (P - Y_b)^T X_b     (wd: L2 weight decay)

With `preconditioned`, each feature column j takes its own step lr p_j (a diagonal, Jacobi
preconditioner from the training features' second moments, `jacobi_preconditioner`): the
gradient uses X_b diag(p) and the decay is 1 - lr wd p_j per column, so the fixed point, the
probe's L2-penalised optimum, is unchanged while every principal direction converges at the
same rate.

Binary tasks use one weight row and a sigmoid (the 2-class softmax in its minimal form);
c > 2 classes use c rows and softmax. Early stopping watches the validation Brier loss
sum_j (p_j - y_j)^2 because the encrypted side can evaluate it with polynomials only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from medblindtuner.he.packing import PackingLayout
from medblindtuner.training.approx import (
    ActivationPlan,
    RangeError,
    exact_probabilities,
    saturated_exp,
)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by the exact, mirror and encrypted trainers.

    The product derives them from the data (`hospital.recipe.derive_recipe`); a config built
    by hand must give the learning rate.
    """

    learning_rate: float | None = None
    momentum: float = 0.9
    epochs: int = 10
    batch_size: int = 256
    patience: int = 4
    seed: int = 0
    weight_decay: float = 0.0  # L2 penalty (wd/2)||W||^2 per sample, applied as a decay
    preconditioned: bool = False  # a step of lr p_j per feature column (module docstring)

    def to_dict(self) -> dict:
        return asdict(self)

    def checked(self) -> TrainConfig:
        """This config, after refusing values no trainer can use."""
        if self.learning_rate is None:
            raise ValueError("TrainConfig.learning_rate is not set: build the config with "
                             "hospital.recipe.derive_recipe or give a learning rate")
        if not (self.learning_rate > 0 and 0 <= self.momentum < 1 and self.epochs >= 1
                and self.batch_size >= 1 and self.patience >= 1 and self.weight_decay >= 0):
            raise ValueError(f"invalid training settings: {self.to_dict()}")
        if self.learning_rate * self.weight_decay >= 1:
            raise ValueError(f"learning rate x weight decay = "
                             f"{self.learning_rate * self.weight_decay:.3g} must stay below 1")
        return self

    @property
    def decay_factor(self) -> float:
        """Multiplier of the look-ahead weights in each step (1 - lr wd)."""
        return 1.0 - self.learning_rate * self.weight_decay

    def decay_vector(self, preconditioner: np.ndarray) -> np.ndarray:
        """Multiplier of each feature column of the look-ahead weights (1 - lr wd p_j)."""
        return 1.0 - self.learning_rate * self.weight_decay * np.asarray(preconditioner)


MIN_RELATIVE_MOMENT = 1e-6  # floor of a column's second moment in `jacobi_preconditioner`


def curvature_weight(n_classes: int) -> float:
    """h: the largest second derivative of the loss per unit of squared logit (sigmoid 1/4,
    softmax 1/2), so that h X^T X / n bounds the loss's curvature."""
    return 0.25 if n_classes == 2 else 0.5


def jacobi_preconditioner(x_train: np.ndarray, n_classes: int,
                          weight_decay: float) -> np.ndarray:
    """p_j = 1 / (h mean_i x_ij^2 + wd), one per feature column (bias included): the inverse
    of the diagonal of the loss's curvature bound. On PCA coordinates the second moment is
    nearly diagonal, so the preconditioned problem is nearly as well conditioned as its
    prior allows. A column's moment counts as at least `MIN_RELATIVE_MOMENT` of the largest
    (a constant column under no penalty would get an infinite step); any positive p keeps
    the optimum, so the floor costs nothing but pace."""
    x = np.asarray(x_train, dtype=np.float64)
    return preconditioner_of_moments(np.mean(x * x, axis=0), n_classes, weight_decay)


def preconditioner_of_moments(moment: np.ndarray, n_classes: int,
                              weight_decay: float) -> np.ndarray:
    """`jacobi_preconditioner` from the columns' second moments mean_i x_ij^2 (what a
    consortium learns by secure aggregation instead of the rows)."""
    moment = np.asarray(moment, dtype=np.float64)
    moment = np.maximum(moment, MIN_RELATIVE_MOMENT * max(float(moment.max()), 1e-300))
    return 1.0 / (curvature_weight(n_classes) * moment + weight_decay)


def step_bounds(x_train: np.ndarray, n_classes: int, weight_decay: float,
                preconditioned: bool) -> tuple[float, float]:
    """(L, mu): bounds on the largest and smallest curvature of the penalised loss, in the
    metric of the step (`jacobi_preconditioner` when `preconditioned`)."""
    x, h = np.asarray(x_train, dtype=np.float64), curvature_weight(n_classes)
    if not preconditioned:
        return h * float(np.linalg.norm(x, ord=2)**2) / len(x) + weight_decay, weight_decay
    p = jacobi_preconditioner(x, n_classes, weight_decay)
    top = float(np.linalg.norm(x * np.sqrt(p), ord=2)**2) / len(x)
    return h * top + weight_decay * float(p.max()), weight_decay * float(p.min())


def step_bounds_of_moments(second_moment: np.ndarray, n_classes: int, weight_decay: float
                           ) -> tuple[float, float]:
    """`step_bounds(x, ..., preconditioned=True)` from the rows' second-moment matrix
    X^T X / n alone (a consortium's securely aggregated one)."""
    moment = np.asarray(second_moment, dtype=np.float64)
    p = preconditioner_of_moments(np.diag(moment), n_classes, weight_decay)
    root = np.sqrt(p)
    top = float(np.linalg.eigvalsh(root[:, None] * moment * root[None, :])[-1])
    return (curvature_weight(n_classes) * top + weight_decay * float(p.max()),
            weight_decay * float(p.min()))


def add_bias(x: np.ndarray, value: float = 1.0) -> np.ndarray:
    """Append the constant bias feature (the model is affine); see FeatureScaler.augment."""
    return np.hstack([np.asarray(x, dtype=np.float64), np.full((len(x), 1), float(value))])


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Targets per weight row: (n, 1) for binary, (n, c) one-hot otherwise."""
    labels = np.asarray(labels).reshape(-1).astype(int)
    if n_classes == 2:
        return labels[:, None].astype(np.float64)
    return np.eye(n_classes)[labels]


def n_weight_rows(n_classes: int) -> int:
    return 1 if n_classes == 2 else n_classes


def make_batches(n_samples: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Fixed batches: one shuffle by the hospital before encryption, then as few batches of at
    most `batch_size` as possible, of equal size (+-1): a short remainder batch would take a
    full step on a few samples' noisy gradient."""
    order = np.random.default_rng(seed).permutation(n_samples)
    return np.array_split(order, -(-n_samples // batch_size))


def epoch_batch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    """Order of the fixed batches in `epoch` (public schedule, same for every trainer)."""
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


VALIDATION_LOSS_NAME = "Brier loss (sum over classes of (p - y)^2)"


def brier_loss(probabilities: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.sum((probabilities - targets) ** 2, axis=1)))


def class_probabilities(weights: np.ndarray, x_bias: np.ndarray, n_classes: int) -> np.ndarray:
    """Exact (n, c) class probabilities of a trained head (used for all reported metrics)."""
    logits = x_bias @ weights.T
    probs = exact_probabilities(logits, n_classes)
    if n_classes == 2:
        probs = np.hstack([1.0 - probs, probs])
    return probs


def evaluate(weights: np.ndarray, x_bias: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """ACC and AUC (one-vs-rest macro for multi-class) with sklearn's metrics."""
    from sklearn.metrics import accuracy_score, roc_auc_score  # 1 s import: only when used

    labels = np.asarray(labels).reshape(-1).astype(int)
    probs = class_probabilities(weights, x_bias, n_classes)
    predictions = probs.argmax(axis=1)
    if n_classes == 2:
        auc = roc_auc_score(labels, probs[:, 1])
    else:
        auc = roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(n_classes)))
    return {
        "acc": float(accuracy_score(labels, predictions)),
        "auc": float(auc),
        "y_true": labels.tolist(),
        "y_pred": predictions.tolist(),
        "y_score": probs.tolist(),
    }


@dataclass
class TrainResult:
    weights: np.ndarray  # best epoch's weights, (rows, n_features incl. bias)
    final_weights: np.ndarray | None = None  # the last epoch's
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    steps: int = 0
    wall_time_s: float = 0.0
    max_abs_logit: float = 0.0  # over every slot of the logit ciphertexts (with a layout)
    max_softmax_sum: float = 0.0
    min_softmax_sum: float = float("inf")
    # exact head only: the largest sum of saturating exponentials its logits would give (the
    # inverse's interval of a softmax head on a wide interval, `ActivationPlan.softmax_for`)
    max_saturated_sum: float = 0.0


class _RangeTracker:
    """The head's activation (exact, or the mirror's polynomials) with the ranges it saw: the
    largest |logit| (every slot of the logit ciphertexts, with a layout) and softmax sums;
    RangeError when the mirror leaves its approximation interval."""

    def __init__(self, result: TrainResult, n_classes: int, activation: ActivationPlan | None,
                 layout: PackingLayout | None) -> None:
        self.result, self.n_classes = result, n_classes
        self.activation, self.layout = activation, layout

    def record_range(self, peak: float, where: str) -> None:
        self.result.max_abs_logit = max(self.result.max_abs_logit, peak)
        activation = self.activation
        if activation is not None and not peak <= activation.logit_bound:
            raise RangeError(
                f"{where} reached {peak:.3g}, outside the approximation interval "
                f"[-{activation.logit_bound}, {activation.logit_bound}]: the polynomial head "
                "would diverge; lower the learning rate or raise the logit bound"
            )

    def track_slots(self, x: np.ndarray, w: np.ndarray) -> None:
        layout = self.layout
        if layout is None:
            return
        for start in range(0, len(x), layout.samples_per_ct):
            chunk = x[start : start + layout.samples_per_ct]
            for row in w:
                peak = float(np.max(np.abs(layout.logit_slots(chunk, row))))
                self.record_range(peak, "a logit-ciphertext slot")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        self.record_range(float(np.max(np.abs(logits))), "a logit")
        if self.n_classes > 2:  # sums of exponentials: the softmax inverse's input range
            exp = np.exp if self.activation is None else self.activation.exp
            sums = exp(logits).sum(axis=1)
            self.result.max_softmax_sum = max(self.result.max_softmax_sum, float(sums.max()))
            self.result.min_softmax_sum = min(self.result.min_softmax_sum, float(sums.min()))
            if self.activation is None:
                self.result.max_saturated_sum = max(
                    self.result.max_saturated_sum,
                    float(saturated_exp(logits).sum(axis=1).max()))
        if self.activation is None:
            return exact_probabilities(logits, self.n_classes)
        return self.activation.probabilities(logits)


def train_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    config: TrainConfig,
    activation: ActivationPlan | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    layout: PackingLayout | None = None,
) -> TrainResult:
    """Train on bias-augmented features. `activation=None`: exact head; else the mirror.

    With `layout`, the range of every slot the encrypted logits would occupy is tracked too.
    """
    start = time.perf_counter()
    config = config.checked()
    targets = one_hot(y_train, n_classes)
    val_targets = one_hot(y_val, n_classes)
    weights = np.zeros((n_weight_rows(n_classes), x_train.shape[1]))
    previous = weights.copy()
    result = TrainResult(weights=weights.copy())
    head = _RangeTracker(result, n_classes, activation, layout)
    batches = make_batches(len(x_train), config.batch_size, config.seed)
    decay: float | np.ndarray = config.decay_factor
    x_grad = x_train
    if config.preconditioned:
        preconditioner = jacobi_preconditioner(x_train, n_classes, config.weight_decay)
        decay, x_grad = config.decay_vector(preconditioner), x_train * preconditioner
    best_loss = float("inf")
    since_best = 0
    for epoch in range(1, config.epochs + 1):
        for batch_index in epoch_batch_order(len(batches), config.seed, epoch):
            idx = batches[batch_index]
            lookahead = (1 + config.momentum) * weights - config.momentum * previous
            head.track_slots(x_train[idx], lookahead)
            probs = head.probabilities(x_train[idx] @ lookahead.T)
            gradient = (probs - targets[idx]).T @ x_grad[idx]
            previous, weights = weights, (decay * lookahead
                                          - (config.learning_rate / len(idx)) * gradient)
            result.steps += 1
        head.track_slots(x_val, weights)
        val_loss = brier_loss(head.probabilities(x_val @ weights.T), val_targets)
        train_loss = brier_loss(head.probabilities(x_train @ weights.T), targets)
        record = {"epoch": epoch, "val_loss": val_loss, "train_loss": train_loss,
                  "val_acc": evaluate(weights, x_val, y_val, n_classes)["acc"]}
        result.history.append(record)
        result.epochs_run = epoch
        if on_epoch:
            on_epoch(record)
        if val_loss < best_loss - 1e-12:
            best_loss, since_best = val_loss, 0
            result.weights, result.best_epoch = weights.copy(), epoch
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    result.final_weights = weights
    result.wall_time_s = time.perf_counter() - start
    return result
