"""The key holder's cryptographic work: encrypt data and queries, judge, decrypt.

Only the hospital runs this (it needs the secret key). The cloud's counterpart is
`cloud.trainer.EncryptedTrainer` and `cloud.inference.score_queries`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.ciphertexts import (
    atomic_write_json,
    ciphertext_from_bytes,
    ciphertext_to_bytes,
)
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import CkksParams, data_level
from medblindtuner.training.approx import exact_probabilities
from medblindtuner.training.artifacts import EncryptedChunk, EncryptedDataset, EncryptedQueries
from medblindtuner.training.plain import jacobi_preconditioner, make_batches, one_hot
from medblindtuner.training.plan import ChunkLevels, Decision, TrainingPlan


def encrypted_chunks(
    keys: HospitalKeys,
    plan: TrainingPlan,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> tuple[Iterator[EncryptedChunk], Iterator[EncryptedChunk]]:
    """Hospital: the fixed batches' chunks and the validation chunks, encrypted one at a
    time as they are consumed, each ciphertext of a training chunk at the level the step
    first uses it (`TrainingPlan.train_chunk_levels`), validation at `he.params.data_level`."""
    layout = plan.layout
    scale = feature_preconditioner(plan, x_train)

    def encrypt_chunk(x: np.ndarray, y: np.ndarray, levels: ChunkLevels) -> EncryptedChunk:
        labels = [keys.encrypt(vector, levels.labels)
                  for vector in plan.label_vectors(one_hot(y, plan.n_classes))]
        chunk = EncryptedChunk(
            len(x),
            keys.encrypt(layout.encode_x_dup(x), levels.x_dup),
            keys.encrypt(layout.encode_x_grad(x * scale), levels.x_grad),
            labels,
        )
        if progress:
            progress(1)
        return chunk

    step = layout.samples_per_ct
    train_level = plan.train_chunk_levels(keys.params)
    val_level = ChunkLevels.uniform(data_level(keys.params))
    train = (encrypt_chunk(x_train[idx[i : i + step]], y_train[idx[i : i + step]], train_level)
             for idx in make_batches(len(x_train), plan.config.batch_size, plan.config.seed)
             for i in range(0, len(idx), step))
    val = (encrypt_chunk(x_val[i : i + step], y_val[i : i + step], val_level)
           for i in range(0, len(x_val), step))
    return train, val


def feature_preconditioner(plan: TrainingPlan, x_train: np.ndarray) -> np.ndarray:
    """p_j of a preconditioned plan (`training.plain.jacobi_preconditioner`), 1 otherwise:
    the hospital encrypts x_grad as x p, so the cloud's gradient is preconditioned as is."""
    if not plan.config.preconditioned:
        return np.ones(x_train.shape[1])
    return jacobi_preconditioner(x_train, plan.n_classes, plan.config.weight_decay)


def encrypted_decay(keys: HospitalKeys, plan: TrainingPlan,
                    x_train: np.ndarray) -> ofhe.Ciphertext | None:
    """A preconditioned plan's per-feature decay 1 - lr wd p_j in the model's slots
    (`PackingLayout.encode_feature_scale`), at the data's level; None for a plain plan."""
    if not plan.config.preconditioned:
        return None
    decay = plan.config.decay_vector(feature_preconditioner(plan, x_train))
    return keys.encrypt(plan.layout.encode_feature_scale(decay), data_level(keys.params))


def encrypt_dataset(keys: HospitalKeys, plan: TrainingPlan, x_train: np.ndarray,
                    y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                    progress: Callable[[int], None] | None = None) -> EncryptedDataset:
    """The whole encrypted dataset in memory (tests, benchmarks; the hospital streams it to
    disk with `write_encrypted_dataset`)."""
    train, val = encrypted_chunks(keys, plan, x_train, y_train, x_val, y_val, progress)
    return EncryptedDataset(plan, list(train), list(val),
                            decay=encrypted_decay(keys, plan, x_train))


def write_encrypted_dataset(directory: Path, keys: HospitalKeys, plan: TrainingPlan,
                            x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                            y_val: np.ndarray,
                            progress: Callable[[int], None] | None = None) -> dict:
    """Encrypt and write chunk by chunk: memory stays one chunk whatever the dataset size."""
    train, val = encrypted_chunks(keys, plan, x_train, y_train, x_val, y_val, progress)
    return EncryptedDataset.write(directory, keys.params, plan, train, val,
                                  encrypted_decay(keys, plan, x_train))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class JudgeRefusal(MedBlindTunerError):
    """The cloud asked an early-stopping question outside the plan: not answered."""


# CKKS noise on the decrypted validation loss is ~1e-4 of the per-sample Brier loss; anything
# further outside [0, 2] did not come from the plan's computation.
LOSS_TOLERANCE = 0.05
# The cloud's epoch header: a plain decimal integer of at most this many digits.
MAX_EPOCH_DIGITS = 7


@dataclass(frozen=True)
class UntrustedParseLimits:
    """The subprocess that parses a cloud-supplied ciphertext before this process does (the
    same machinery as the service's validator, `he.untrusted`)."""

    memory_bytes: int = 4 << 30
    timeout_s: float = 120.0


def parse_epoch(text: str | None) -> int:
    """The cloud's `X-Epoch` header: digits only (no sign, exponent, spaces or `abc`)."""
    if (text is None or not text.isascii() or not text.isdigit()
            or not 1 <= len(text) <= MAX_EPOCH_DIGITS):
        raise JudgeRefusal(f"the cloud sent the epoch {str(text)[:40]!r}, not a plain "
                           "integer: refused")
    return int(text)


def loss_ciphertext_bound(params: CkksParams) -> int:
    """Largest serialised size a validation-loss ciphertext of these parameters can have
    (two polynomials at the top level, 8 bytes per coefficient per tower, plus headers)."""
    return 2 * params.ring_dim * (params.depth + 2) * 8 + (1 << 20)


class HospitalJudge:
    """Key holder's side of early stopping: decrypts one scalar per epoch, strictly by plan.

    Every answer leaks one bit about the decrypted value, so the judge is a state machine
    persisted in `state_path` (the hospital folder's `local/judge.json`):

    * epochs come 1, 2, 3, ... up to the plan's number of epochs E and not after a stop; a
      question about an epoch already answered gets the recorded answer without a decryption;
    * **the decryption budget is E for the job's whole life**: each decryption is counted
      in the state file *before* it happens (one ciphertext of one epoch counts once, so a
      fetch cut off mid-decryption may retry the same bytes), across processes and crashes;
    * **the first refusal ends the job's questions for good**: it is persisted, and every
      later question (any process, any re-run of `hospital fetch`) is refused unread;
    * a loss outside the Brier range [0, 2] (plus CKKS noise), a ciphertext that does not
      parse (in a limited subprocess) or decrypt, or a malformed epoch is a refusal.

    So the cloud sees at most E answers, each "improved" or "not" (the best epoch is the
    current or the previous one; continue/stop follows from it and the patience), possibly
    ended by one refusal: at most 2^(E+1) - 1 outcome sequences, fewer than E + 1 bits.
    """

    def __init__(self, keys: HospitalKeys, plan: TrainingPlan, n_val: int,
                 state_path: Path | None = None,
                 parse_limits: UntrustedParseLimits | None = None):
        self.keys = keys
        self.plan = plan
        self.n_val = n_val
        padding = sum(plan.layout.samples_per_ct - n for n in plan.val_batch_sizes)
        self.padding_loss = plan.padding_loss(padding)
        self.state_path = Path(state_path) if state_path is not None else None
        self.parse_limits = parse_limits or UntrustedParseLimits()
        self.losses: dict[int, float] = {}
        self.answers: dict[int, Decision] = {}
        self.decrypted: list[tuple[int, str]] = []  # (epoch, SHA-256 of the ciphertext)
        self.refused: str | None = None
        if self.state_path is not None and self.state_path.exists():
            self._load(json.loads(self.state_path.read_text()))

    def _load(self, saved: dict) -> None:
        self.losses = {int(e): float(v) for e, v in saved["losses"].items()}
        self.answers = {int(e): Decision(**d) for e, d in saved["answers"].items()}
        self.decrypted = [(int(e), str(d)) for e, d in saved.get(
            "decrypted", [[e, ""] for e in sorted(self.losses)])]
        self.refused = saved.get("refused")

    @property
    def budget(self) -> int:
        """Decryptions this job may ever cost: its plan's epochs."""
        return self.plan.config.epochs

    @property
    def best_epoch(self) -> int:
        return self.answers[max(self.answers)].best_epoch if self.answers else 0

    @property
    def stopped(self) -> bool:
        return bool(self.answers) and not self.answers[max(self.answers)].continue_training

    def validation_loss(self, loss_ct: ofhe.Ciphertext) -> float:
        total = float(self.keys.decrypt(loss_ct, length=1)[0])
        return (total - self.padding_loss) / self.n_val

    # ---- the two ways a question arrives ------------------------------------------------------
    def answer_cloud(self, epoch_text: str | None, data: bytes) -> Decision:
        """A question exactly as the cloud sent it: its epoch header and ciphertext bytes.
        Parsed in a limited subprocess first; every malformed part is a (persisted)
        refusal."""
        self.require_open()
        epoch = self._guarded(lambda: parse_epoch(epoch_text))
        if epoch in self.answers:  # asked again (a resumed cloud): same answer, no decryption
            return self.answers[epoch]
        self._check_in_plan(epoch)
        self._check_parses(epoch, data)
        try:
            loss_ct = ciphertext_from_bytes(data)
        except (RuntimeError, ValueError, OSError) as exc:
            raise self.refuse(f"the validation loss of epoch {epoch} is not a ciphertext "
                              f"({str(exc)[:200]}): refused") from exc
        return self._answer_new(epoch, loss_ct, sha256_bytes(data))

    def __call__(self, epoch: int, loss_ct: ofhe.Ciphertext) -> Decision:
        """A question from a trusted, in-process trainer (no cloud: `experiment`, tests)."""
        self.require_open()
        epoch = int(epoch)
        if epoch in self.answers:
            return self.answers[epoch]
        self._check_in_plan(epoch)
        return self._answer_new(epoch, loss_ct, sha256_bytes(ciphertext_to_bytes(loss_ct)))

    # ---- refusals -----------------------------------------------------------------------------
    def require_open(self) -> None:
        """Refuse at once if an earlier question of this job was refused."""
        if self.refused is not None:
            raise JudgeRefusal(f"this job's questions ended with a refusal: {self.refused}")

    def refuse(self, message: str) -> JudgeRefusal:
        """Persist the refusal (every later question is refused unread) and return it."""
        self.refused = message
        self._save()
        return JudgeRefusal(message)

    def _guarded(self, check: Callable[[], int]) -> int:
        try:
            return check()
        except JudgeRefusal as exc:
            raise self.refuse(str(exc)) from exc

    def _check_in_plan(self, epoch: int) -> None:
        expected = max(self.answers, default=0) + 1
        if self.stopped:
            raise self.refuse(f"the cloud asked about epoch {epoch} after the hospital "
                              f"stopped training at epoch {expected - 1}: refused")
        if epoch > self.plan.config.epochs:
            raise self.refuse(f"the cloud asked about epoch {epoch}; the plan has "
                              f"{self.plan.config.epochs} epochs: refused")
        if epoch != expected:
            raise self.refuse(f"the cloud asked about epoch {epoch}; the plan allows only "
                              f"epoch {expected} next: refused")

    def _check_parses(self, epoch: int, data: bytes) -> None:
        """The ciphertext bytes parse, within the limits, as one of this job's ring."""
        from medblindtuner.he.untrusted import run_isolated

        bound = loss_ciphertext_bound(self.keys.params)
        if len(data) > bound:
            raise self.refuse(f"the validation-loss ciphertext is {len(data)} bytes; one of "
                              f"these parameters has at most {bound}: refused")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "loss.bin"
            path.write_bytes(data)
            verdict = run_isolated([str(path), "--role", "ciphertext", "--ring-dim",
                                    str(self.keys.params.ring_dim)],
                                   self.parse_limits.timeout_s, self.parse_limits.memory_bytes,
                                   "the validation-loss ciphertext")
        if not verdict.ok:
            raise self.refuse(f"the validation loss of epoch {epoch} is refused: "
                              f"{verdict.error}")

    # ---- a new answer: one decryption of the budget ----------------------------------------
    def _spend_decryption(self, epoch: int, digest: str) -> None:
        """Count this decryption in the state file before it happens (write-ahead)."""
        if (epoch, digest) in self.decrypted:
            return  # the same bytes again (a fetch cut off mid-decryption): no new value
        if len(self.decrypted) >= self.budget:
            raise self.refuse(f"epoch {epoch} would be decryption {len(self.decrypted) + 1}; "
                              f"the plan allows {self.budget}: refused")
        self.decrypted.append((epoch, digest))
        self._save()

    def _answer_new(self, epoch: int, loss_ct: ofhe.Ciphertext, digest: str) -> Decision:
        self._spend_decryption(epoch, digest)
        try:
            loss = self.validation_loss(loss_ct)
        except (RuntimeError, ValueError) as exc:  # e.g. made under another key or context
            raise self.refuse(f"the validation loss of epoch {epoch} does not decrypt under "
                              f"this job's key ({str(exc)[:200]}): refused") from exc
        if not -LOSS_TOLERANCE <= loss <= 2 + LOSS_TOLERANCE:
            raise self.refuse(f"the decrypted validation loss of epoch {epoch} is "
                              f"{loss:.4g}, outside the Brier range [0, 2]: the ciphertext "
                              "did not come from the planned computation; refused")
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
                "answers": {str(e): d.__dict__ for e, d in self.answers.items()},
                "decrypted": [[e, d] for e, d in self.decrypted],
                "refused": self.refused})


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
