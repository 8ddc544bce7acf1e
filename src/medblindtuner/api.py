"""Python API in the style of scikit-learn estimators, with a client/server split.

    from medblindtuner import EncryptedHeadClassifier

    clf = EncryptedHeadClassifier().fit(x_train, y_train, x_val, y_val)
    clf.predict_proba(x_test); clf.score(x_test, y_test)

`fit` plays the hospital (probe, derived settings, keys, encryption, early-stopping answers,
decryption) and sends the training to a cloud: in this process (`cloud="local"`, for
experiments) or to a running `medblindtuner serve` (`cloud="http://host:port"`), which only
ever sees the public bundle and ciphertexts. The decrypted head then scores new rows here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


class EncryptedHeadClassifier:
    """Linear (sigmoid/softmax) head on frozen features, trained under CKKS encryption.

    Parameters left at None are derived from the training/validation data as the product does
    (`hospital.recipe`); `insecure_test_params=True` selects a tiny, NOT secure ring for tests.
    `workdir` keeps the hospital's and the local cloud's folders (keys, ciphertexts, result);
    without it they go to a temporary folder that lives as long as the estimator.
    """

    def __init__(self, *, pca_dims: int | None = None, learning_rate: float | None = None,
                 momentum: float | None = None, weight_decay: float | None = None,
                 epochs: int | None = None, batch_size: int | None = None, patience: int = 4,
                 seed: int = 0, cloud: str = "local", workdir: str | Path | None = None,
                 insecure_test_params: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.pca_dims = pca_dims
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.cloud = cloud
        self.workdir = workdir
        self.insecure_test_params = insecure_test_params
        self.log = log

    # ---- scikit-learn conventions --------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in (
            "pca_dims", "learning_rate", "momentum", "weight_decay", "epochs", "batch_size",
            "patience", "seed", "cloud", "workdir", "insecure_test_params", "log")}

    def set_params(self, **params) -> EncryptedHeadClassifier:
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"unknown parameter {key!r}")
            setattr(self, key, value)
        return self

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray,
            y_val: np.ndarray) -> EncryptedHeadClassifier:
        """Train under encryption; the validation split drives the settings and early stop."""
        from medblindtuner.features.extract import FeatureSet
        from medblindtuner.he.params import INSECURE_TEST, PRODUCTION
        from medblindtuner.hospital.hospital import Hospital
        from medblindtuner.hospital.recipe import Overrides

        classes = np.unique(np.concatenate([np.asarray(y).reshape(-1),
                                            np.asarray(y_val).reshape(-1)]))
        if len(classes) < 2:
            raise ValueError("need at least two classes")
        index = {c: i for i, c in enumerate(classes.tolist())}
        encode = np.vectorize(index.__getitem__)
        features = FeatureSet.from_arrays(
            {"train": (x, encode(np.asarray(y).reshape(-1))),
             "val": (x_val, encode(np.asarray(y_val).reshape(-1)))}, n_classes=len(classes))
        if self.workdir is None:
            # The hospital folder holds the secret key: without a workdir it lives only as long
            # as this estimator (removed when it is collected or the interpreter exits).
            self.scratch_ = tempfile.TemporaryDirectory(prefix="medblindtuner-")
            workdir = Path(self.scratch_.name)
        else:
            workdir = Path(self.workdir)
        params = INSECURE_TEST if self.insecure_test_params else PRODUCTION
        hospital = Hospital(workdir / "hospital", params,
                            allow_insecure=self.insecure_test_params, log=self.log)
        given = Overrides(pca_dims=self.pca_dims, learning_rate=self.learning_rate,
                          momentum=self.momentum, weight_decay=self.weight_decay,
                          epochs=self.epochs, batch_size=self.batch_size,
                          patience=self.patience, seed=self.seed)
        self.recipe_ = hospital.prepare(features, given)
        hospital.generate_keys()
        hospital.encrypt_dataset()
        if self.cloud == "local":
            self.history_ = _train_in_process(hospital, workdir / "cloud")
        else:
            self.history_ = _train_on_service(hospital, self.cloud)
        self.coef_ = hospital.decrypt_result()
        self.classes_ = classes
        self.hospital_ = hospital
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("this EncryptedHeadClassifier is not fitted yet: call fit()")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, classes) probabilities of the decrypted head on raw feature rows."""
        self._check_fitted()
        return self.hospital_.probabilities(self.coef_, self.hospital_.scale(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        probabilities = self.predict_proba(x)
        return self.classes_[probabilities.argmax(axis=1)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean accuracy, as scikit-learn classifiers report it."""
        return float(np.mean(self.predict(x) == np.asarray(y).reshape(-1)))


def _train_in_process(hospital, cloud_dir: Path) -> list[dict]:
    """The cloud's role in this process: evaluation keys and ciphertexts only."""
    from medblindtuner.cloud.trainer import EncryptedTrainer
    from medblindtuner.he.engine import Evaluator
    from medblindtuner.he.keys import CloudCrypto
    from medblindtuner.training.artifacts import EncryptedDataset, EncryptedResult

    judge = hospital.judge()
    cloud = CloudCrypto.load(hospital.folder.public_bundle,
                             allow_insecure=hospital.allow_insecure)
    evaluator = Evaluator(cloud.context, cloud.params, cloud.public_key)
    trainer = EncryptedTrainer(evaluator, EncryptedDataset.load(
        hospital.folder.encrypted_dataset, cloud.params, adopt=evaluator.adopt),
        cloud_dir / "checkpoints")
    state = trainer.train(decide=judge)
    EncryptedResult(trainer.weights_of_epoch(state.best_epoch), state.best_epoch, state.epoch,
                    state.steps, {"ops": evaluator.ops.snapshot()}).save(
        hospital.folder.result, cloud.params)
    return [{"epoch": e, "val_loss": loss} for e, loss in sorted(judge.losses.items())]


def _train_on_service(hospital, url: str) -> list[dict]:
    """Upload, answer the early-stopping questions, download the encrypted result."""
    from medblindtuner.hospital.client import HospitalClient

    judge = hospital.judge()
    client = HospitalClient(url, progress=False)
    try:
        client.create_job()
        client.upload_dir("bundle", hospital.folder.public_bundle)
        client.upload_dir("dataset", hospital.folder.encrypted_dataset)
        client.start()
        client.answer_decisions(judge)
        client.fetch_result(hospital.folder.result)
    finally:
        client.close()
    return [{"epoch": e, "val_loss": loss} for e, loss in sorted(judge.losses.items())]
