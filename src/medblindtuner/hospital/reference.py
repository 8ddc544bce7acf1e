"""The bar the encrypted model is judged against: a tuned plaintext probe and published results.

The probe is what a hospital would get from scikit-learn on the same frozen features, in the
clear: `LogisticRegression` on the standardised full-width features, its inverse regularisation
`C` chosen on the validation split (log-loss). Its `C` is also the product's L2 prior for the
encrypted head (`hospital.recipe`). The MedMNIST v2 ResNet-18 (28) row is the published
end-to-end baseline of each MedMNIST flag.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from medblindtuner.data.errors import DatasetError

# Test ACC / AUC of ResNet-18 (28) in the MedMNIST v2 paper (Yang et al., Scientific Data
# 10:41, 2023, Table 3), per 2D flag.
PUBLISHED_RESNET18_28: dict[str, tuple[float, float]] = {
    "pathmnist": (0.907, 0.983),
    "chestmnist": (0.947, 0.768),
    "dermamnist": (0.735, 0.917),
    "octmnist": (0.743, 0.943),
    "pneumoniamnist": (0.854, 0.944),
    "retinamnist": (0.524, 0.717),
    "breastmnist": (0.863, 0.901),
    "bloodmnist": (0.958, 0.998),
    "tissuemnist": (0.676, 0.930),
    "organamnist": (0.935, 0.997),
    "organcmnist": (0.900, 0.992),
    "organsmnist": (0.782, 0.972),
}
PUBLISHED_LABEL = "MedMNIST v2 ResNet-18 (28), published"

# Inverse regularisation strengths tried for the probe (half-decade steps).
PROBE_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 11))


@dataclass(frozen=True)
class ProbeResult:
    """The tuned probe: chosen C, its validation log-loss and its scores."""

    c: float
    val_log_loss: float
    val: dict
    test: dict  # empty when there is no test split (e.g. the Python API's fit)
    seconds: float

    def to_run(self) -> dict:
        """An entry of a results dict's `runs` (report schema)."""
        return {"label": "Probe: scikit-learn LogisticRegression, full features, C on val",
                "test": self.test, "val": self.val, "c": self.c,
                "val_log_loss": self.val_log_loss, "wall_time_s": self.seconds}

    def to_dict(self) -> dict:
        return asdict(self)


def published_run(dataset_name: str) -> dict | None:
    """The published MedMNIST v2 ResNet-18 (28) row as a `runs` entry, or None."""
    scores = PUBLISHED_RESNET18_28.get(str(dataset_name).lower())
    if scores is None:
        return None
    return {"label": PUBLISHED_LABEL, "test": {"acc": scores[0], "auc": scores[1]}}


def scores(probabilities: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """ACC and AUC (one-vs-rest macro for multi-class) with the arrays the report plots."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    labels = np.asarray(labels).reshape(-1).astype(int)
    predictions = probabilities.argmax(axis=1)
    if n_classes == 2:
        auc = roc_auc_score(labels, probabilities[:, 1])
    else:
        auc = roc_auc_score(labels, probabilities, multi_class="ovr",
                            labels=list(range(n_classes)))
    return {"acc": float(accuracy_score(labels, predictions)), "auc": float(auc),
            "y_true": labels.tolist(), "y_pred": predictions.tolist(),
            "y_score": probabilities.tolist()}


def fit_logistic(x_train: np.ndarray, y_train: np.ndarray, c: float, n_classes: int):
    """scikit-learn's L2 logistic regression (multinomial for c > 2) on given features."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=3000)
    model.fit(x_train, y_train)
    if len(model.classes_) != n_classes:
        raise DatasetError(f"the training split holds {len(model.classes_)} of {n_classes} "
                         "classes: every class needs training samples")
    return model


def val_log_loss(model, x_val: np.ndarray, y_val: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(y_val, model.predict_proba(x_val), labels=list(range(n_classes))))


def fit_probe(splits: dict[str, tuple[np.ndarray, np.ndarray]], n_classes: int,
              grid: tuple[float, ...] = PROBE_C_GRID) -> ProbeResult:
    """Standardise on train, fit one probe per C, keep the lowest validation log-loss."""
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    x_train, y_train = splits["train"]
    scaler = StandardScaler().fit(x_train)
    z = {s: scaler.transform(x) for s, (x, _) in splits.items()}
    y = {s: np.asarray(v).reshape(-1).astype(int) for s, (_, v) in splits.items()}
    best = None
    for c in grid:
        model = fit_logistic(z["train"], y["train"], c, n_classes)
        loss = val_log_loss(model, z["val"], y["val"], n_classes)
        if best is None or loss < best[0]:
            best = (loss, c, model)
    loss, c, model = best
    val = scores(model.predict_proba(z["val"]), y["val"], n_classes)
    return ProbeResult(
        c=float(c), val_log_loss=loss,
        val={k: val[k] for k in ("acc", "auc")},
        test=(scores(model.predict_proba(z["test"]), y["test"], n_classes)
              if "test" in z else {}),
        seconds=time.perf_counter() - start)
