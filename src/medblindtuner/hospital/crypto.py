"""The key holder's cryptographic work: encrypt data and queries, judge, decrypt.

Only the hospital runs this (it needs the secret key). The cloud's counterpart is
`training.encrypted.EncryptedTrainer` and `training.inference.score_queries`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import openfhe as ofhe

from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import data_level
from medblindtuner.training.approx import exact_probabilities
from medblindtuner.training.artifacts import EncryptedBatch, EncryptedDataset, EncryptedQueries
from medblindtuner.training.encrypted import Decision
from medblindtuner.training.plain import make_batches, one_hot
from medblindtuner.training.plan import TrainingPlan


def encrypt_dataset(
    keys: HospitalKeys,
    plan: TrainingPlan,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> EncryptedDataset:
    """Hospital: encrypt the fixed batches (and validation chunks) at the post-refresh level."""
    layout = plan.layout
    level = data_level(keys.params)

    def encrypt_batch(x: np.ndarray, y: np.ndarray) -> EncryptedBatch:
        labels = [keys.encrypt(vector, level)
                  for vector in plan.label_vectors(one_hot(y, plan.n_classes))]
        batch = EncryptedBatch(
            len(x),
            keys.encrypt(layout.encode_x_dup(x), level),
            keys.encrypt(layout.encode_x_grad(x), level),
            labels,
        )
        if progress:
            progress(1)
        return batch

    train_batches = make_batches(len(x_train), plan.config.batch_size, plan.config.seed)
    train = [encrypt_batch(x_train[idx], y_train[idx]) for idx in train_batches]
    step = layout.samples_per_ct
    val = [encrypt_batch(x_val[i : i + step], y_val[i : i + step])
           for i in range(0, len(x_val), step)]
    return EncryptedDataset(plan, train, val)


class HospitalJudge:
    """Key holder's side of early stopping: decrypts one scalar per epoch."""

    def __init__(self, keys: HospitalKeys, plan: TrainingPlan, n_val: int):
        self.keys = keys
        self.plan = plan
        self.n_val = n_val
        padding = sum(plan.layout.samples_per_ct - n for n in plan.val_batch_sizes)
        self.padding_loss = plan.padding_loss(padding)
        self.best_loss = float("inf")
        self.best_epoch = 0
        self.since_best = 0
        self.losses: dict[int, float] = {}

    def validation_loss(self, loss_ct: ofhe.Ciphertext) -> float:
        total = float(self.keys.decrypt(loss_ct, length=1)[0])
        return (total - self.padding_loss) / self.n_val

    def __call__(self, epoch: int, loss_ct: ofhe.Ciphertext) -> Decision:
        loss = self.validation_loss(loss_ct)
        self.losses[epoch] = loss
        if loss < self.best_loss - 1e-12:
            self.best_loss, self.best_epoch, self.since_best = loss, epoch, 0
        else:
            self.since_best += 1
        keep_going = self.since_best < self.plan.config.patience
        return Decision(continue_training=keep_going, best_epoch=self.best_epoch)


def decrypt_weights(keys: HospitalKeys, plan: TrainingPlan, cts: list[ofhe.Ciphertext]):
    return np.vstack([plan.layout.decode_weights(keys.decrypt(ct, plan.layout.block))
                      for ct in cts])


def encrypt_queries(keys: HospitalKeys, plan: TrainingPlan, x: np.ndarray) -> EncryptedQueries:
    """Encrypt bias-augmented, scaled feature rows for scoring."""
    layout = plan.layout
    step = layout.samples_per_ct
    chunks = [x[i : i + step] for i in range(0, len(x), step)]
    cts = [keys.encrypt(layout.encode_x_dup(c), data_level(keys.params)) for c in chunks]
    return EncryptedQueries(tuple(len(c) for c in chunks), cts)


def decrypt_scores(keys: HospitalKeys, plan: TrainingPlan, scores, sizes) -> np.ndarray:
    """(n, c) class probabilities from the encrypted logits (exact softmax/sigmoid)."""
    layout = plan.layout
    logits = np.vstack([
        np.column_stack([layout.decode_per_sample(keys.decrypt(ct), n) for ct in row])
        for row, n in zip(scores, sizes, strict=True)
    ])
    probs = exact_probabilities(logits, plan.n_classes)
    if plan.n_classes == 2:
        probs = np.hstack([1.0 - probs, probs])
    return probs
