"""Python API: a scikit-learn classifier whose head is trained under CKKS encryption.

    from medblindtuner import EncryptedHeadClassifier

    clf = EncryptedHeadClassifier(insecure_test_params=True).fit(x_train, y_train)
    clf.predict_proba(x_test); clf.score(x_test, y_test)

`fit` plays the hospital (split, probe, derived settings, keys, encryption, early-stopping
answers, decryption) and sends the training to a cloud: in this process (`cloud="local"`) or
to a running `medblindtuner serve` (`cloud="http://host:port"`). The decrypted head then
scores new rows here. Which scikit-learn checks cannot hold, and why: docs/sklearn.md.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class EncryptedHeadClassifier(ClassifierMixin, BaseEstimator):
    """Linear (sigmoid/softmax) head on frozen features, trained under CKKS encryption.

    Parameters left at None are derived from the training data as the product does
    (`hospital.recipe`). Without `X_val`/`y_val`, `fit` holds out a stratified
    `validation_fraction` of the rows (seeded by `seed`) for the settings and early stopping.
    `insecure_test_params=True` selects a tiny, NOT secure ring for tests. `workdir` keeps the
    hospital's and the local cloud's folders (keys, ciphertexts, result); without it they go
    to a temporary folder that lives as long as the fitted estimator. `refresh`: "hospital"
    (this process refreshes the cloud's spent ciphertexts, through the service when the cloud
    is a URL) or "bootstrap"; None: `he.params.default_refresh()`, local or remote alike.
    """

    def __init__(self, *, pca_dims: int | None = None, learning_rate: float | None = None,
                 momentum: float | None = None, weight_decay: float | None = None,
                 epochs: int | None = None, batch_size: int | None = None, patience: int = 4,
                 seed: int = 0, validation_fraction: float = 0.25, cloud: str = "local",
                 workdir: str | Path | None = None, insecure_test_params: bool = False,
                 refresh: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.pca_dims = pca_dims
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.validation_fraction = validation_fraction
        self.cloud = cloud
        self.workdir = workdir
        self.insecure_test_params = insecure_test_params
        self.refresh = refresh
        self.log = log

    def fit(self, X, y, X_val=None, y_val=None) -> EncryptedHeadClassifier:  # noqa: N803
        """Train under encryption; the validation rows drive the settings and early stop."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        if (X_val is None) != (y_val is None):
            raise ValueError("give both X_val and y_val, or neither")
        if X_val is None:
            X, X_val, y, y_val = self._validation_split(X, y)
        else:
            X_val, y_val = validate_data(self, X_val, y_val, dtype=np.float64, reset=False)
        self.classes_ = np.unique(np.concatenate([y, y_val]))
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes")
        hospital = self._hospital()
        self.recipe_ = hospital.prepare(self._features(X, y, X_val, y_val), self._overrides())
        hospital.generate_keys()
        hospital.encrypt_dataset()
        if self.cloud == "local":
            self.history_ = _train_in_process(hospital, hospital.folder.root.parent / "cloud")
        else:
            self.history_ = _train_on_service(hospital, self.cloud)
        self.weights_ = hospital.decrypt_result()
        self.hospital_ = hospital
        self.coef_, self.intercept_ = _fold_into_inputs(self.weights_, hospital.scaler)
        return self

    # ---- steps of fit -------------------------------------------------------------------
    def _validation_split(self, X: np.ndarray, y: np.ndarray):
        from sklearn.model_selection import train_test_split

        counts = np.unique(y, return_counts=True)[1]
        stratify = y if counts.min() >= 2 else None
        return train_test_split(X, y, test_size=self.validation_fraction, stratify=stratify,
                                random_state=self.seed)

    def _features(self, X, y, X_val, y_val):
        from medblindtuner.features.extract import FeatureSet

        encode = {label: index for index, label in enumerate(self.classes_.tolist())}
        return FeatureSet.from_arrays(
            {"train": (X, np.array([encode[v] for v in y.tolist()])),
             "val": (X_val, np.array([encode[v] for v in y_val.tolist()]))},
            n_classes=len(self.classes_))

    def _overrides(self):
        from medblindtuner.hospital.recipe import Overrides

        return Overrides(pca_dims=self.pca_dims, learning_rate=self.learning_rate,
                         momentum=self.momentum, weight_decay=self.weight_decay,
                         epochs=self.epochs, batch_size=self.batch_size,
                         patience=self.patience, seed=self.seed)

    def _hospital(self):
        from medblindtuner.hospital.hospital import Hospital

        if self.workdir is None:
            # The hospital folder holds the secret key: without a workdir it lives only as long
            # as this estimator (removed when it is collected or the interpreter exits).
            self.scratch_ = tempfile.TemporaryDirectory(prefix="medblindtuner-")
            workdir = Path(self.scratch_.name)
        else:
            workdir = Path(self.workdir)
        from medblindtuner.he.params import default_refresh

        refresh = self.refresh or default_refresh()
        return Hospital(workdir / "hospital", insecure_test_params=self.insecure_test_params,
                        refresh=refresh,
                        log=self.log)

    # ---- prediction ---------------------------------------------------------------------
    def _model_inputs(self, X) -> np.ndarray:
        check_is_fitted(self, "weights_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self.hospital_.scale(X)

    def decision_function(self, X) -> np.ndarray:  # noqa: N803
        """Logits of the decrypted head: (n,) for two classes, (n, classes) otherwise."""
        logits = self._model_inputs(X) @ self.weights_.T
        return logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X) -> np.ndarray:  # noqa: N803
        """(n, classes) probabilities of the decrypted head."""
        x = self._model_inputs(X)
        return self.hospital_.probabilities(self.weights_, x)

    def predict(self, X) -> np.ndarray:  # noqa: N803
        probabilities = self.predict_proba(X)
        return self.classes_[probabilities.argmax(axis=1)]

    def __getstate__(self) -> dict:
        """Pickled without the hospital's keys (OpenFHE objects) and scratch folder: a
        pickled estimator predicts with its decrypted head only."""
        state = dict(self.__dict__)
        state.pop("scratch_", None)
        hospital = state.pop("hospital_", None)
        if hospital is not None:
            state["scaler_"] = hospital.scaler
        return state

    def __setstate__(self, state: dict) -> None:
        scaler = state.pop("scaler_", None)
        self.__dict__.update(state)
        if scaler is not None:
            self.hospital_ = _DecryptedHead(scaler, len(self.classes_))


class _DecryptedHead:
    """What prediction needs of a hospital after unpickling: its scaler and the head."""

    def __init__(self, scaler, n_classes: int) -> None:
        self.scaler, self.n_classes = scaler, n_classes

    def scale(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return self.scaler.augment(X)

    def probabilities(self, weights: np.ndarray, x: np.ndarray) -> np.ndarray:
        from medblindtuner.training.plain import class_probabilities

        return class_probabilities(weights, x, self.n_classes)


def _fold_into_inputs(weights: np.ndarray, scaler) -> tuple[np.ndarray, np.ndarray]:
    """`coef_` (rows, input features) and `intercept_` (rows,) of the head over the raw input
    features: standardisation, PCA, the norm scaling and the bias column folded back (exact
    for rows the scaler does not clip, i.e. within the training rows' norm)."""
    k = scaler.n_features_out
    head, bias = weights[:, :k] * scaler.scale_, weights[:, k] * scaler.bias_
    shift = np.zeros(len(weights))
    if scaler.components_ is not None:
        head = head @ scaler.components_
        shift = head @ scaler.pca_mean_
    if scaler.standardize:
        shift = shift + head @ (scaler.mean_ / scaler.std_)
        head = head / scaler.std_
    return head, bias - shift


def _train_in_process(hospital, cloud_dir: Path) -> list[dict]:
    """The cloud's role in this process: evaluation keys and ciphertexts only."""
    from medblindtuner.cloud.cloud import Cloud
    from medblindtuner.experiment import in_process_refresher

    judge = hospital.judge()
    cloud = Cloud(hospital.folder.public_bundle,
                  allow_insecure=hospital.insecure_test_params)
    cloud.evaluator.refresher = in_process_refresher(
        hospital, cloud.crypto.context, cloud.crypto.public_key, cloud_dir / "refresh_journal",
        judge)
    cloud.run_training(hospital.folder.encrypted_dataset, cloud_dir / "checkpoints",
                       hospital.folder.result, decide=judge)
    return [{"epoch": e, "val_loss": loss} for e, loss in sorted(judge.losses.items())]


def _train_on_service(hospital, url: str) -> list[dict]:
    """Upload, answer the early-stopping questions, download the encrypted result."""
    from medblindtuner.hospital.session import CloudSession

    with CloudSession.create(hospital, url, progress=False) as session:
        return session.train().history
