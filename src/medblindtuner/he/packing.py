"""Slot layout of data and model ciphertexts, defined once for hospital, cloud and tests.

Let d = next power of two >= n_features (bias included). A data ciphertext holds a batch of
`samples_per_ct = slots / (2d)` samples; sample i owns the slot block [2d*i, 2d*(i+1)):

* `x_dup`:  x_i in the first half AND again in the second half of its block.
* `x_grad`: x_i in the first half, zeros in the second half.
* labels:   y_i (one ciphertext per class; one for binary) in the first half of the block.

A weight row w_j (one ciphertext per class; one for binary) is replicated with period d.

Logits (`A @ B^T`): x_dup * w then rotate-and-sum with strides 1, 2, ..., d/2. Because x is
duplicated, every slot of the first half of block i sees a full cyclic window of x_i * w and
holds z_ij; no mask (and no level) is needed. Gradient (`A^T @ B`): (p_j - y_j) * x_grad then
rotate-and-sum with strides d, 2d, ..., slots/2, which adds all half-blocks (second halves are
zero) and leaves g_j replicated with period d: exactly the weight layout, ready for the update.
Rotations per class and step: log2(d) + log2(slots/d) = log2(slots). A weight ciphertext is
periodic with period d, so it is bootstrapped as a sparse ciphertext of d slots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def next_power_of_two(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


def power_parts(amount: int) -> list[int]:
    """A non-negative rotation as distinct powers of two, largest first: a rotation made once
    a step is composed from keys a plan has anyway instead of costing a key of its own (a key
    is ~26 MB at ring 2^15)."""
    return [1 << k for k in reversed(range(int(amount).bit_length())) if amount >> k & 1]


@dataclass(frozen=True)
class PackingLayout:
    slots: int
    n_features: int  # including the bias column

    def __post_init__(self) -> None:
        if self.n_features < 1:
            raise ValueError("need at least one feature")
        if 2 * self.block > self.slots:
            raise ValueError(
                f"{self.n_features} features need blocks of {2 * self.block} slots but the "
                f"ciphertext has only {self.slots}: reduce the feature dimension (PCA)"
            )

    @property
    def block(self) -> int:
        """d: the padded feature width and the weight period."""
        return next_power_of_two(self.n_features)

    @property
    def stride(self) -> int:
        return 2 * self.block

    @property
    def samples_per_ct(self) -> int:
        return self.slots // self.stride

    @property
    def logit_strides(self) -> list[int]:
        return [1 << k for k in range(self.block.bit_length() - 1)]

    @property
    def gradient_strides(self) -> list[int]:
        return [self.block << k for k in range((self.slots // self.block).bit_length() - 1)]

    @property
    def sample_sum_strides(self) -> list[int]:
        """Sum one value per sample block over all blocks (for scalar losses)."""
        return [self.stride << k for k in range((self.slots // self.stride).bit_length() - 1)]

    @property
    def rotation_indices(self) -> list[int]:
        return sorted(set(self.logit_strides + self.gradient_strides + self.sample_sum_strides))

    # ---- encoders (hospital side: plaintext numpy -> slot vectors) --------------------------
    def _check_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected a (n, {self.n_features}) batch, got {x.shape}")
        if x.shape[0] > self.samples_per_ct:
            raise ValueError(f"batch of {x.shape[0]} exceeds {self.samples_per_ct} per ciphertext")
        return x

    def encode_x_dup(self, x: np.ndarray) -> np.ndarray:
        x = self._check_batch(x)
        blocks = np.zeros((self.samples_per_ct, 2, self.block))
        blocks[: len(x), 0, : self.n_features] = x
        blocks[: len(x), 1, : self.n_features] = x
        return blocks.reshape(-1)

    def encode_x_grad(self, x: np.ndarray) -> np.ndarray:
        x = self._check_batch(x)
        blocks = np.zeros((self.samples_per_ct, 2, self.block))
        blocks[: len(x), 0, : self.n_features] = x
        return blocks.reshape(-1)

    def encode_per_sample(self, values: np.ndarray) -> np.ndarray:
        """One number per sample (a label column), spread over the first half of its block."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) > self.samples_per_ct:
            raise ValueError("too many samples for one ciphertext")
        blocks = np.zeros((self.samples_per_ct, 2, self.block))
        blocks[: len(values), 0, :] = values[:, None]
        return blocks.reshape(-1)

    def sample_mask(self, n_samples: int) -> np.ndarray:
        """1 at the first slot of each of the first `n_samples` blocks (loss reduction)."""
        blocks = np.zeros((self.samples_per_ct, 2, self.block))
        blocks[:n_samples, 0, 0] = 1.0
        return blocks.reshape(-1)

    def window_mask(self, starts: Iterable[int], width: int = 1) -> np.ndarray:
        """1 at slots start .. start + width - 1 of every block, for each start (a binary
        step's gathered logits, `TrainingPlan.compact_period`)."""
        blocks = np.zeros((self.samples_per_ct, self.stride))
        for start in starts:
            if not 0 <= start and start + width <= self.stride:
                raise ValueError(f"slots {start}..{start + width - 1} outside a block of "
                                 f"{self.stride}")
            blocks[:, start:start + width] = 1.0
        return blocks.reshape(-1)

    def strides_from(self, first: int, last: int) -> list[int]:
        """first, 2 first, ..., last (powers of two): a rotate-and-sum over a window of
        2 last / first groups of first slots."""
        out, stride = [], first
        while stride <= last:
            out.append(stride)
            stride *= 2
        return out

    def encode_weights(self, w: np.ndarray) -> np.ndarray:
        return self._tiled_row(w, 0.0, "weights")

    def encode_feature_scale(self, values: np.ndarray) -> np.ndarray:
        """One factor per feature on every slot that holds that feature's weight, in the
        binary and the softmax model layouts alike (slot s holds feature s mod d); 1 on the
        slots past the features."""
        return self._tiled_row(values, 1.0, "factors")

    def _tiled_row(self, values: np.ndarray, fill: float, what: str) -> np.ndarray:
        """One value per feature in every block of d slots, `fill` past the features."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) != self.n_features:
            raise ValueError(f"expected {self.n_features} {what}, got {len(values)}")
        row = np.full(self.block, fill)
        row[: self.n_features] = values
        return np.tile(row, self.slots // self.block)

    def logit_slots(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Every slot of the encrypted logit ciphertext, simulated in numpy.

        Slots outside the first half of each block hold partial sums mixing neighbouring
        samples; the polynomials see them too, so the hospital's range check covers them.
        """
        values = self.encode_x_dup(x) * self.encode_weights(w)
        for stride in self.logit_strides:
            values = values + np.roll(values, -stride)
        return values

    # ---- decoders ---------------------------------------------------------------------------
    def decode_weights(self, slots: np.ndarray) -> np.ndarray:
        return np.asarray(slots)[: self.n_features].copy()

    def decode_per_sample(self, slots: np.ndarray, n_samples: int) -> np.ndarray:
        return np.asarray(slots)[: n_samples * self.stride : self.stride].copy()


@dataclass(frozen=True)
class SoftmaxLayout:
    """Class-diagonal layout: a c-class softmax step with c logit ciphertexts per chunk and
    two sparse bootstraps.

    Let C = next_pow2(c) and Q = 2d C. The model is ONE ciphertext with period Q: block b of
    each period holds weight row b in both halves (rows b >= c are zero). Sample i sees, in
    diagonal k < c, class `class_of(i, k)` = ((i mod C) + k) mod c: each sample sees each
    class exactly once over the c diagonals, and no diagonal is spent on the zero rows. The
    diagonal's model W_k holds that row under sample i: rotating the model by 2d s puts row
    (i + s) mod C under sample i, so W_k = sum_s P_ks * rot(M, 2d s) with 0/1 block masks P_ks
    over the shifts s = class_of(i, k) - (i mod C) mod C, at most three per diagonal because
    C < 2c (`diagonal_shifts`); with c = C (a power of two) it is one rotation and no mask.
    The masks carry the look-ahead's coefficients, so W_k costs the one level the look-ahead
    costs anyway. The gradient terms go back the same way: sum over s of
    rot(sum_k P_ks * T_k, -2d s), then the period sum, which lands class b's gradient on block
    b: the model layout again.

    Softmax denominators: one value per sample is selected into a compact vector of period
    P = max(2d, slots / d): sample i = g R + r (R = P / 2d blocks per period) keeps S_i at slot
    2d r + g of its block, distinct for every sample because g < slots / P <= d. Folding
    (rotate-and-sum over P, 2P, ..., slots/2) makes it P-periodic for a P-slot bootstrap.
    After the refresh, a right shift by d puts each sample's own 1/S_i in the second half of its
    block at offset g, from where a rotate-and-sum over strides 1..d covers the first half.
    Compact values sit in first halves, so a second set fits in the second halves: shifted
    right by d before the fold, already in place after (place 1 below).

    A step over several data ciphertexts ("chunks") refreshes their denominators in groups of
    up to `chunks` chunks, ONE bootstrap of K P slots per group (K = chunk_groups periods, two
    places each): the chunk at place j of a group has its selected values shifted right by
    `place_shift(j)` = (j // 2) P + (j mod 2) d before the fold over K P, i.e. into the first
    halves of period j // 2 for even j, the second halves for odd j. Sample i = g R + r of
    place j lands at (g + j // 2 mod K) P + 2d r + (j mod 2) d + g, distinct for every (i, j)
    because 2d r + (j mod 2) d + g < P fixes (r, j mod 2, g), and then g + j // 2 mod K fixes
    j // 2. After the refresh, a rotation by place_shift(j) - d puts each sample's own value
    in the second half of its block, as for place 1. Position p of a step is place
    p mod `chunks` of group p // `chunks`. The previous epoch's validation chunk takes the
    group's last place (`validation_place`) when the step's last group leaves it free
    (`validation_rides`).

    Both bootstraps (model and denominators) use one slot count, `bootstrap_period`: the
    larger period is a multiple of the smaller, and one slot count means one bootstrap
    precomputation and key set instead of two (they dominate the cloud's memory).
    """

    layout: PackingLayout
    n_classes: int
    chunks: int = 1  # data ciphertexts per denominator bootstrap (a group of the step's chunks)

    def __post_init__(self) -> None:
        if self.n_classes < 3:
            raise ValueError("the softmax layout is for 3 or more classes (binary: sigmoid)")
        if self.model_period >= self.layout.slots:
            raise ValueError(
                f"a {self.n_classes}-class model needs 2·d·{self.class_slots} = "
                f"{self.model_period} < {self.layout.slots} slots: reduce the feature width"
            )
        if not 1 <= self.chunks <= self.max_chunks(self.layout):
            raise ValueError(
                f"a group of {self.chunks} data ciphertexts is more than one denominator "
                f"bootstrap holds (at most {self.max_chunks(self.layout)} at "
                f"{self.layout.n_features} features)")

    @staticmethod
    def compact_period_of(layout: PackingLayout) -> int:
        """P: smallest period whose groups (slots / P) fit in the d slots of a half block."""
        return max(layout.stride, layout.slots // layout.block)

    @staticmethod
    def max_chunks(layout: PackingLayout) -> int:
        """Most chunks per group whose compact values fit a sparse bootstrap (K P <= slots / 2,
        two places per period)."""
        return max(1, layout.slots // SoftmaxLayout.compact_period_of(layout))

    @property
    def class_slots(self) -> int:
        """C: classes padded to a power of two (rotations must wrap within the period)."""
        return next_power_of_two(self.n_classes)

    @property
    def model_period(self) -> int:
        """Q: period (and sparse bootstrap slot count) of the model ciphertext."""
        return self.layout.stride * self.class_slots

    def class_of(self, sample: int | np.ndarray, diagonal: int):
        """Class whose logit sample i sees in diagonal k: ((i mod C) + k) mod c."""
        return (np.asarray(sample) % self.class_slots + diagonal) % self.n_classes

    def diagonal_shift(self, sample: int | np.ndarray, diagonal: int):
        """s (in blocks) such that rot(M, 2d s) holds sample i's class of diagonal k."""
        residue = np.asarray(sample) % self.class_slots
        return (self.class_of(sample, diagonal) - residue) % self.class_slots

    @property
    def cyclic(self) -> bool:
        """c = C: diagonal k is the model rotated by 2d k, with no mask."""
        return self.n_classes == self.class_slots

    def diagonal_shifts(self, diagonal: int) -> list[int]:
        """The block shifts diagonal k gathers its rows from (at most three: C < 2c)."""
        return sorted({int(s) for s in self.diagonal_shift(np.arange(self.class_slots),
                                                           diagonal)})

    @property
    def model_shifts(self) -> list[int]:
        """Every block shift of the model that some diagonal uses (0 included)."""
        return sorted({s for k in range(self.n_classes) for s in self.diagonal_shifts(k)})

    def shift_diagonals(self, shift: int) -> list[int]:
        """The diagonals that take some of their rows from model shift s."""
        return [k for k in range(self.n_classes) if shift in self.diagonal_shifts(k)]

    def diagonal_mask(self, diagonal: int, shift: int) -> np.ndarray:
        """P_ks: 1 on the whole blocks whose sample takes its diagonal-k row from shift s."""
        blocks = self.diagonal_shift(np.arange(self.layout.samples_per_ct), diagonal) == shift
        return np.repeat(blocks.astype(np.float64), self.layout.stride)

    # ---- encoders / decoders (hospital side and tests) ---------------------------------------
    def encode_model(self, weights: np.ndarray) -> np.ndarray:
        weights = np.asarray(weights, dtype=np.float64)
        d, n = self.layout.block, self.layout.n_features
        period = np.zeros((self.class_slots, 2, d))
        period[: self.n_classes, 0, :n] = weights
        period[: self.n_classes, 1, :n] = weights
        return np.tile(period.reshape(-1), self.layout.slots // self.model_period)

    def decode_model(self, slots: np.ndarray) -> np.ndarray:
        d, n = self.layout.block, self.layout.n_features
        blocks = np.asarray(slots)[: self.model_period].reshape(self.class_slots, 2, d)
        return blocks[: self.n_classes, 0, :n].copy()

    def encode_labels(self, targets: np.ndarray) -> list[np.ndarray]:
        """One label vector per diagonal k: sample i holds y[i, class_of(i, k)]."""
        targets = np.asarray(targets, dtype=np.float64)
        rows = np.arange(len(targets))
        return [self.layout.encode_per_sample(targets[rows, self.class_of(rows, k)])
                for k in range(self.n_classes)]

    def row_mask(self, row: int) -> np.ndarray:
        """1 on block `row` of every period: extracting one weight row (d-periodic after the
        rotate-and-sum over `row_strides`)."""
        period = np.zeros((self.class_slots, self.layout.stride))
        period[row] = 1.0
        return np.tile(period.reshape(-1), self.layout.slots // self.model_period)

    @property
    def row_strides(self) -> list[int]:
        return [self.layout.stride << k for k in range(self.class_slots.bit_length() - 1)]

    @property
    def period_sum_strides(self) -> list[int]:
        """Sum the model-period blocks of all samples: strides Q, 2Q, ..., slots/2."""
        q, slots = self.model_period, self.layout.slots
        return [q << k for k in range((slots // q).bit_length() - 1)]

    # ---- compact softmax denominators --------------------------------------------------------
    @property
    def compact_period(self) -> int:
        return self.compact_period_of(self.layout)

    @property
    def chunk_groups(self) -> int:
        """K: periods of a group (two places each), a power of two (the fold must wrap
        evenly)."""
        return next_power_of_two(-(-self.chunks // 2))

    @property
    def places(self) -> int:
        """Chunks one denominator bootstrap can hold: 2 K."""
        return 2 * self.chunk_groups

    @property
    def group_compact_period(self) -> int:
        """K P: period of a group's folded denominators."""
        return self.compact_period * self.chunk_groups

    @property
    def bootstrap_period(self) -> int:
        """Slot count of both bootstraps: max(Q, K P), a multiple of each (powers of two)."""
        return max(self.model_period, self.group_compact_period)

    def group_of(self, position: int) -> int:
        """Which denominator bootstrap of its step the chunk at `position` joins."""
        return position // self.chunks

    def place_shift(self, place: int) -> int:
        """(j // 2) P + (j mod 2) d: how far place j's selected values move right before
        the fold."""
        return self.compact_period * (place // 2) + self.layout.block * (place % 2)

    def chunk_shift(self, position: int) -> int:
        """`place_shift` of the chunk at step position `position` (its place in its group)."""
        return self.place_shift(position % self.chunks)

    @property
    def validation_place(self) -> int:
        """The place a ridden validation chunk takes: the last of its group."""
        return self.places - 1

    def validation_rides(self, chunks_in_last_group: int) -> bool:
        """Whether a step whose last group holds this many chunks has the validation place
        free (otherwise the validation chunk is refreshed on its own)."""
        return chunks_in_last_group <= self.validation_place

    @property
    def blocks_per_period(self) -> int:
        return self.compact_period // self.layout.stride

    def compact_offset(self, sample: int) -> int:
        return sample // self.blocks_per_period

    def select_mask(self) -> np.ndarray:
        """1 at each sample's compact slot (inside the first half of its block)."""
        out = np.zeros(self.layout.slots)
        for i in range(self.layout.samples_per_ct):
            out[i * self.layout.stride + self.compact_offset(i)] = 1.0
        return out

    @property
    def fold_strides(self) -> list[int]:
        p, slots = self.group_compact_period, self.layout.slots
        return [p << k for k in range((slots // p).bit_length() - 1)]

    def unfold_mask(self) -> np.ndarray:
        """After the right shift by d: 1 where each block's own value sits (second half)."""
        return np.roll(self.select_mask(), self.layout.block)

    @property
    def spread_strides(self) -> list[int]:
        """Rotate-and-sum over 1..d: a value at 2d i + d + g covers [2d i, 2d i + d)."""
        return [1 << k for k in range(self.layout.block.bit_length())]

    @property
    def kernel_rotation_indices(self) -> list[int]:
        """Rotations of the per-chunk arithmetic (`cloud.kernel.StepKernel`): the model's
        shifts into the diagonals and the terms' way back (2d (C - s), the same modulo Q once
        the driver sums the periods), both once a step and composed from powers of two
        (`power_parts`), the spread, each chunk's move into and out of the
        compact vector (chunk 0's way out is -d). The logits' strides are the packing's."""
        stride = self.layout.stride
        shifts = [p for s in self.model_shifts for p in power_parts(stride * s)]
        back = [p for s in self.model_shifts if s
                for p in power_parts(stride * (self.class_slots - s))]
        return sorted(set(shifts + back + self.spread_strides
                          + self.place_moves(range(self.chunks))) - {0})

    def place_moves(self, places: Iterable[int]) -> list[int]:
        """Rotations moving these places into the compact vector and back out."""
        return [s for j in places
                for s in (-self.place_shift(j), self.place_shift(j) - self.layout.block)]

    @property
    def rotation_indices(self) -> list[int]:
        """The driver's: the kernel's, the validation place's moves, row extraction, period
        sums and folds."""
        return self.driver_rotation_indices(validation_rides=True)

    def driver_rotation_indices(self, validation_rides: bool) -> list[int]:
        """`rotation_indices`, with the validation place's moves only where a validation
        chunk can ride in a step's denominator group (not with one exponential a step)."""
        validation = self.place_moves([self.validation_place]) if validation_rides else []
        return sorted(set(self.kernel_rotation_indices + validation + self.row_strides
                          + self.period_sum_strides + self.fold_strides) - {0})
