"""The per-chunk arithmetic of an encrypted step, apart from the model's bootstraps.

A step's batch is one or more data ciphertexts ("chunks", `TrainingPlan.batch_chunks`). What
each chunk needs (logit products and rotations, polynomials, gradient terms) runs in a
`StepKernel`, which uses relinearisation and rotation keys only, never bootstrapping keys: it
can run wherever the chunks are (this process, or a Ray actor per node). The driver
(`training.encrypted.EncryptedTrainer`) adds the kernels' partial results, bootstraps and
updates the model. A chunk's position in its step (0, 1, ...) fixes where its softmax
denominators sit in the step's one compact bootstrap (`he.packing.SoftmaxLayout`).

Binary head, per chunk:  (sigmoid~(rotsum(x_dup * V)) * lr/n - lr/n Y) * x_grad, summed over
the chunks before the driver's gradient rotate-and-sum.
Softmax head, two phases around the driver's denominator bootstrap:
    forward:  e_k = exp~(Z_k); the chunk's sums of exponentials at its compact slots, shifted
              by its place in its denominator group, summed per group (the driver folds each
              group's sum and bootstraps it once)
    backward: A_k = e_k * spread(its group's inverse); (A_k - lr/n Y_k) * x_grad summed over
              the chunks, rotated back per class (the driver adds the period sum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import openfhe as ofhe

from medblindtuner.he.engine import Evaluator
from medblindtuner.training.artifacts import EncryptedChunk
from medblindtuner.training.plan import TrainingPlan

# (position in the step, chunk index in the dataset's training chunks)
PlacedChunk = tuple[int, int]


class StepKernel:
    """Chunk-level step arithmetic over the chunks this process holds (`chunks[index]`)."""

    def __init__(self, evaluator: Evaluator, plan: TrainingPlan,
                 chunks: Sequence[EncryptedChunk] | dict[int, EncryptedChunk]) -> None:
        self.ev = evaluator
        self.plan = plan
        self.layout = plan.layout
        self.softmax = plan.softmax_layout
        self.chunks = chunks
        # softmax: (position, chunk index, exponentials) of each chunk, kept from
        # `softmax_forward` for the backward phase; the chunk itself is looked up again there
        # (a streamed chunk, 10 ciphertexts, is then not held across the denominator bootstrap)
        self._pending: list[tuple[int, int, list[ofhe.Ciphertext]]] = []

    def masked(self, ct: ofhe.Ciphertext, key: tuple, make: Callable[[], np.ndarray]):
        """ct times a constant mask (one level); the mask is encoded once per process."""
        return self.ev.mul_plain(ct, self.ev.cached_plaintext(key, make))

    # ---- shared by training and validation ---------------------------------------------------
    def class_rotations(self, model: ofhe.Ciphertext) -> list[ofhe.Ciphertext]:
        """The model under each class rotation (softmax; binary: the model itself). A step
        computes them once for all its chunks."""
        if self.softmax is None:
            return [model]
        return [self.ev.rotate(model, shift) if shift else model
                for shift in self.softmax.class_shifts]

    def logits(self, chunk: EncryptedChunk, model: ofhe.Ciphertext,
               rotated: list[ofhe.Ciphertext] | None = None) -> list[ofhe.Ciphertext]:
        """Binary: [z]. Softmax: one logit ciphertext per class rotation k (see SoftmaxLayout).
        `rotated`: `class_rotations(model)` when the caller has them already."""
        rotated = rotated or self.class_rotations(model)
        return [self.ev.rotate_and_sum(self.ev.mul(chunk.x_dup, w), self.layout.logit_strides)
                for w in rotated]

    def sigmoid(self, logit: ofhe.Ciphertext, scale: float) -> ofhe.Ciphertext:
        """scale * sigmoid~(logit), the scale folded into the coefficients (no level)."""
        sig = self.plan.activation.sigmoid.scaled(scale)
        return self.ev.chebyshev(logit, sig.coefficients, sig.a, sig.b)

    def exponentials(self, logits: list[ofhe.Ciphertext]) -> list[ofhe.Ciphertext]:
        exp = self.plan.activation.exp
        return [self.ev.chebyshev(z, exp.coefficients, exp.a, exp.b) for z in logits]

    def compact_sums(self, exps: list[ofhe.Ciphertext]) -> ofhe.Ciphertext:
        """Each sample's softmax denominator at its compact slot (zero elsewhere)."""
        padding = ((self.softmax.class_slots - self.softmax.n_classes)
                   * float(self.plan.activation.exp(np.zeros(1))[0]))
        total = self.ev.add_scalar(self.ev.add_many(exps), -padding)
        return self.masked(total, ("select",), self.softmax.select_mask)

    def spread_inverse(self, inverse: ofhe.Ciphertext, rotation: int, scale: float,
                       exps: list[ofhe.Ciphertext]) -> list[ofhe.Ciphertext]:
        """scale * softmax probabilities per class rotation, from the refreshed inverse.

        `rotation` brings this chunk's own 1/S_i to the second half of each sample's block
        (offset g); the unfold mask carries the scale, the spread covers the first half."""
        softmax = self.softmax
        own = self.ev.rotate(inverse, rotation) if rotation else inverse
        unfold = self.masked(own, ("unfold", scale),
                             lambda: scale * softmax.unfold_mask())
        spread = self.ev.rotate_and_sum(unfold, softmax.spread_strides)
        return [self.ev.mul(e, self.masked(spread, ("valid", k),
                                           lambda k=k: softmax.valid_mask(k)))
                for k, e in enumerate(exps)]

    def _term(self, probability: ofhe.Ciphertext, label: ofhe.Ciphertext, scale: float,
              x_grad: ofhe.Ciphertext) -> ofhe.Ciphertext:
        return self.ev.mul(self.ev.sub(probability, self.ev.mul_scalar(label, scale)), x_grad)

    # ---- the step's phases ---------------------------------------------------------------------
    def binary_terms(self, lookahead: ofhe.Ciphertext, placed: Sequence[PlacedChunk],
                     scale: float) -> ofhe.Ciphertext:
        """Sum over these chunks of (scale sigmoid~(z) - scale y) * x_grad (binary head)."""
        terms = []
        for _, index in placed:
            chunk = self.chunks[index]
            probability = self.sigmoid(self.logits(chunk, lookahead)[0], scale)
            terms.append(self._term(probability, chunk.labels[0], scale, chunk.x_grad))
        return self.ev.add_many(terms)

    def softmax_forward(self, lookahead: ofhe.Ciphertext,
                        placed: Sequence[PlacedChunk]) -> dict[int, ofhe.Ciphertext]:
        """These chunks' share of each denominator group's compact vector (before the fold),
        by group."""
        self._pending = []
        parts: dict[int, list[ofhe.Ciphertext]] = {}
        rotated = self.class_rotations(lookahead)
        for position, index in placed:
            chunk = self.chunks[index]
            exps = self.exponentials(self.logits(chunk, lookahead, rotated))
            picked = self.compact_sums(exps)
            shift = self.softmax.chunk_shift(position)
            parts.setdefault(self.softmax.group_of(position), []).append(
                self.ev.rotate(picked, -shift) if shift else picked)
            self._pending.append((position, index, exps))
        return {group: self.ev.add_many(cts) for group, cts in parts.items()}

    def softmax_backward(self, inverses: dict[int, ofhe.Ciphertext],
                         scale: float) -> ofhe.Ciphertext:
        """Gradient terms of the chunks of the last forward (each with its group's refreshed
        inverse), summed over them and rotated back per class rotation (class b lands on
        block b once the driver sums over the period)."""
        if not self._pending:
            raise RuntimeError("softmax_backward needs the chunks of a softmax_forward")
        d = self.layout.block
        summed: list[ofhe.Ciphertext | None] = [None] * len(self.softmax.class_shifts)
        pending, self._pending = self._pending, []
        while pending:  # a chunk's exponentials and terms are freed once its terms are added
            position, index, exps = pending.pop(0)
            chunk = self.chunks[index]
            rotation = self.softmax.chunk_shift(position) - d
            inverse = inverses[self.softmax.group_of(position)]
            probabilities = self.spread_inverse(inverse, rotation, scale, exps)
            del exps
            for k, p in enumerate(probabilities):
                term = self._term(p, chunk.labels[k], scale, chunk.x_grad)
                summed[k] = term if summed[k] is None else self.ev.add(summed[k], term)
            del probabilities, chunk
        shifts = self.softmax.class_shifts
        return self.ev.add_many([self.ev.rotate(t, shifts[-k]) if k else t
                                 for k, t in enumerate(summed)])
