"""The union's encrypted dataset, made from each hospital's own rows.

The union is the hospitals' training rows one after another (hospital 0's, then 1's, ...;
the counts are public) and the agreed public plan cuts it into batches and data ciphertexts
exactly as for one hospital (`plain.make_batches`). Each hospital encrypts, for every chunk
that holds any of its rows, the chunk's packing with its own rows in place and zeros in the
others' (`encrypt_share`, hospital side); the packings are linear, so the cloud adds the
hospitals' ciphertexts slot-wise into the union's chunk (`combine_shares`, cloud side) and
trains on an ordinary `EncryptedDataset` with its unchanged trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import openfhe as ofhe

from medblindtuner.he.threshold import joint_data_level
from medblindtuner.training.artifacts import EncryptedChunk, EncryptedDataset
from medblindtuner.training.plain import make_batches, one_hot
from medblindtuner.training.plan import ChunkLevels, TrainingPlan


@dataclass(frozen=True)
class Ownership:
    """Which union rows are this hospital's: [offset, offset + count) (public)."""

    train_offset: int
    train_count: int
    val_offset: int
    val_count: int


def union_chunk_rows(plan: TrainingPlan, n_train: int, n_val: int):
    """Union row indices of every training chunk (file order) and validation chunk."""
    step = plan.layout.samples_per_ct
    train = [idx[i : i + step]
             for idx in make_batches(n_train, plan.config.batch_size, plan.config.seed)
             for i in range(0, len(idx), step)]
    val = [np.arange(i, min(i + step, n_val)) for i in range(0, n_val, step)]
    return train, val


@dataclass
class ShareChunk:
    """A hospital's part of one union chunk: ciphertexts like an `EncryptedChunk`'s."""

    position: int
    x_dup: ofhe.Ciphertext
    x_grad: ofhe.Ciphertext
    labels: list[ofhe.Ciphertext]


def encrypt_share(keys, plan: TrainingPlan, owned: Ownership, x_train: np.ndarray,
                  y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                  n_train: int, n_val: int, preconditioner: np.ndarray | None = None
                  ) -> tuple[list[ShareChunk], list[ShareChunk]]:
    """Hospital side: its rows of each union chunk (others' rows zero) under the joint key
    (`keys.encrypt`); chunks without any of its rows are skipped (public from the counts).
    A preconditioned plan's x_grad is x p with the agreed `preconditioner` (required)."""
    layout, base = plan.layout, joint_data_level(keys.params)
    if plan.config.preconditioned and preconditioner is None:
        raise ValueError("a preconditioned plan needs the agreed preconditioner")
    scale = preconditioner if plan.config.preconditioned else 1.0
    train_rows, val_rows = union_chunk_rows(plan, n_train, n_val)
    train_levels = plan.train_chunk_levels(keys.params, base)

    def chunks(rows_list, offset, count, x, y, levels: ChunkLevels) -> list[ShareChunk]:
        targets = one_hot(y, plan.n_classes)
        out = []
        for position, rows in enumerate(rows_list):
            mine = (rows >= offset) & (rows < offset + count)
            if not mine.any():
                continue
            x_chunk = np.zeros((len(rows), x.shape[1]))
            t_chunk = np.zeros((len(rows), targets.shape[1]))
            x_chunk[mine] = x[rows[mine] - offset]
            t_chunk[mine] = targets[rows[mine] - offset]
            out.append(ShareChunk(
                position, keys.encrypt(layout.encode_x_dup(x_chunk), levels.x_dup),
                keys.encrypt(layout.encode_x_grad(x_chunk * scale), levels.x_grad),
                [keys.encrypt(v, levels.labels) for v in plan.label_vectors(t_chunk)]))
        return out

    return (chunks(train_rows, owned.train_offset, owned.train_count, x_train, y_train,
                   train_levels),
            chunks(val_rows, owned.val_offset, owned.val_count, x_val, y_val,
                   ChunkLevels.uniform(base)))


def encrypt_decay(keys, plan: TrainingPlan, preconditioner: np.ndarray
                  ) -> ofhe.Ciphertext | None:
    """A preconditioned plan's per-feature decay 1 - lr wd p_j under the joint key (one
    hospital sends it; every hospital can compute it), None for a plain plan."""
    if not plan.config.preconditioned:
        return None
    decay = plan.config.decay_vector(preconditioner)
    return keys.encrypt(plan.layout.encode_feature_scale(decay), joint_data_level(keys.params))


def combine_shares(context: ofhe.CryptoContext, plan: TrainingPlan,
                   shares: Sequence[tuple[list[ShareChunk], list[ShareChunk]]],
                   n_train: int, n_val: int, decay: ofhe.Ciphertext | None = None
                   ) -> EncryptedDataset:
    """Cloud side: the union's dataset, each chunk the slot-wise sum of the hospitals' parts
    (`decay`: the preconditioned plan's decay ciphertext)."""
    train_rows, val_rows = union_chunk_rows(plan, n_train, n_val)

    def combined(rows_list, parts_of) -> list[EncryptedChunk]:
        by_position: dict[int, list[ShareChunk]] = {}
        for parts in parts_of:
            for part in parts:
                by_position.setdefault(part.position, []).append(part)
        out = []
        for position, rows in enumerate(rows_list):
            parts = by_position.get(position)
            if not parts:
                raise ValueError(f"no hospital sent union chunk {position}")

            out.append(EncryptedChunk(
                len(rows), _sum(context, [p.x_dup for p in parts]),
                _sum(context, [p.x_grad for p in parts]),
                [_sum(context, [p.labels[k] for p in parts]) for k in range(plan.label_cts)]))
        return out

    return EncryptedDataset(plan, combined(train_rows, [s[0] for s in shares]),
                            combined(val_rows, [s[1] for s in shares]), decay=decay)


def _sum(context: ofhe.CryptoContext, cts: list[ofhe.Ciphertext]) -> ofhe.Ciphertext:
    total = cts[0]
    for ct in cts[1:]:
        total = context.EvalAdd(total, ct)
    return total
