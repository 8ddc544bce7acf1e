"""The key holder's cryptographic work: encrypt data and queries, judge, decrypt.

Only the hospital runs this (it needs the secret key). The cloud's counterpart is
`cloud.trainer.EncryptedTrainer` and `cloud.inference.score_queries`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.ciphertexts import atomic_write_json
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import data_level
from medblindtuner.training.approx import exact_probabilities
from medblindtuner.training.artifacts import EncryptedChunk, EncryptedDataset, EncryptedQueries
from medblindtuner.training.plain import make_batches, one_hot
from medblindtuner.training.plan import Decision, TrainingPlan


def encrypted_chunks(
    keys: HospitalKeys,
    plan: TrainingPlan,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> tuple[Iterator[EncryptedChunk], Iterator[EncryptedChunk]]:
    """Hospital: the fixed batches' chunks and the validation chunks, encrypted at the
    post-refresh level one at a time as they are consumed."""
    layout = plan.layout
    level = data_level(keys.params)

    def encrypt_chunk(x: np.ndarray, y: np.ndarray) -> EncryptedChunk:
        labels = [keys.encrypt(vector, level)
                  for vector in plan.label_vectors(one_hot(y, plan.n_classes))]
        chunk = EncryptedChunk(
            len(x),
            keys.encrypt(layout.encode_x_dup(x), level),
            keys.encrypt(layout.encode_x_grad(x), level),
            labels,
        )
        if progress:
            progress(1)
        return chunk

    step = layout.samples_per_ct
    train = (encrypt_chunk(x_train[idx[i : i + step]], y_train[idx[i : i + step]])
             for idx in make_batches(len(x_train), plan.config.batch_size, plan.config.seed)
             for i in range(0, len(idx), step))
    val = (encrypt_chunk(x_val[i : i + step], y_val[i : i + step])
           for i in range(0, len(x_val), step))
    return train, val


def encrypt_dataset(keys: HospitalKeys, plan: TrainingPlan, x_train: np.ndarray,
                    y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                    progress: Callable[[int], None] | None = None) -> EncryptedDataset:
    """The whole encrypted dataset in memory (tests, benchmarks; the hospital streams it to
    disk with `write_encrypted_dataset`)."""
    train, val = encrypted_chunks(keys, plan, x_train, y_train, x_val, y_val, progress)
    return EncryptedDataset(plan, list(train), list(val))


def write_encrypted_dataset(directory: Path, keys: HospitalKeys, plan: TrainingPlan,
                            x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                            y_val: np.ndarray,
                            progress: Callable[[int], None] | None = None) -> dict:
    """Encrypt and write chunk by chunk: memory stays one chunk whatever the dataset size."""
    train, val = encrypted_chunks(keys, plan, x_train, y_train, x_val, y_val, progress)
    return EncryptedDataset.write(directory, keys.params, plan, train, val)


class JudgeRefusal(MedBlindTunerError):
    """The cloud asked an early-stopping question outside the plan: not answered."""


# CKKS noise on the decrypted validation loss is ~1e-4 of the per-sample Brier loss; anything
# further outside [0, 2] did not come from the plan's computation.
LOSS_TOLERANCE = 0.05


class HospitalJudge:
    """Key holder's side of early stopping: decrypts one scalar per epoch, strictly by plan.

    Every answer leaks one bit about the decrypted value, so the judge is a state machine:
    epochs must come 1, 2, 3, ... up to the plan's number of epochs and not after a stop; a
    question about an epoch already answered gets the recorded answer again without a new
    decryption; a loss outside the Brier range [0, 2] (plus CKKS noise) is refused. With
    `state_path` the history is saved after every answer, so a repeated `fetch` (after a
    crash or a restart) continues it instead of starting anew.
    """

    def __init__(self, keys: HospitalKeys, plan: TrainingPlan, n_val: int,
                 state_path: Path | None = None):
        self.keys = keys
        self.plan = plan
        self.n_val = n_val
        padding = sum(plan.layout.samples_per_ct - n for n in plan.val_batch_sizes)
        self.padding_loss = plan.padding_loss(padding)
        self.state_path = Path(state_path) if state_path is not None else None
        self.losses: dict[int, float] = {}
        self.answers: dict[int, Decision] = {}
        if self.state_path is not None and self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            self.losses = {int(e): float(v) for e, v in saved["losses"].items()}
            self.answers = {int(e): Decision(**d) for e, d in saved["answers"].items()}

    @property
    def best_epoch(self) -> int:
        return self.answers[max(self.answers)].best_epoch if self.answers else 0

    @property
    def stopped(self) -> bool:
        return bool(self.answers) and not self.answers[max(self.answers)].continue_training

    def validation_loss(self, loss_ct: ofhe.Ciphertext) -> float:
        total = float(self.keys.decrypt(loss_ct, length=1)[0])
        return (total - self.padding_loss) / self.n_val

    def __call__(self, epoch: int, loss_ct: ofhe.Ciphertext) -> Decision:
        epoch = int(epoch)
        if epoch in self.answers:  # asked again (a resumed cloud): same answer, no decryption
            return self.answers[epoch]
        expected = max(self.answers, default=0) + 1
        if self.stopped:
            raise JudgeRefusal(f"the cloud asked about epoch {epoch} after the hospital "
                               f"stopped training at epoch {expected - 1}: refused")
        if epoch > self.plan.config.epochs:
            raise JudgeRefusal(f"the cloud asked about epoch {epoch}; the plan has "
                               f"{self.plan.config.epochs} epochs: refused")
        if epoch != expected:
            raise JudgeRefusal(f"the cloud asked about epoch {epoch}; the plan allows only "
                               f"epoch {expected} next: refused")
        loss = self.validation_loss(loss_ct)
        if not -LOSS_TOLERANCE <= loss <= 2 + LOSS_TOLERANCE:
            raise JudgeRefusal(f"the decrypted validation loss of epoch {epoch} is {loss:.4g}, "
                               "outside the Brier range [0, 2]: the ciphertext did not come "
                               "from the planned computation; refused")
        best_loss = min(self.losses.values(), default=float("inf"))
        best_epoch = epoch if loss < best_loss - 1e-12 else self.best_epoch
        keep_going = epoch - best_epoch < self.plan.config.patience
        decision = Decision(continue_training=keep_going, best_epoch=best_epoch)
        self.losses[epoch] = loss
        self.answers[epoch] = decision
        self._save()
        return decision

    def _save(self) -> None:
        if self.state_path is not None:
            atomic_write_json(self.state_path, {
                "losses": {str(e): v for e, v in self.losses.items()},
                "answers": {str(e): d.__dict__ for e, d in self.answers.items()}})


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
