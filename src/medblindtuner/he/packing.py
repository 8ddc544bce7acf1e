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

from dataclasses import dataclass

import numpy as np


def next_power_of_two(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


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

    def encode_weights(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        if len(w) != self.n_features:
            raise ValueError(f"expected {self.n_features} weights, got {len(w)}")
        row = np.zeros(self.block)
        row[: self.n_features] = w
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
