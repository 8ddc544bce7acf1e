"""The per-chunk arithmetic of an encrypted step, apart from the model's bootstraps.

A step's batch is one or more data ciphertexts ("chunks", `TrainingPlan.batch_chunks`). What
each chunk needs (logit products and rotations, polynomials, gradient terms) runs in a
`StepKernel`, which uses relinearisation and rotation keys only, never bootstrapping keys: it
can run wherever the chunks are (this process, or a Ray actor per node). The driver
(`cloud.trainer.EncryptedTrainer`) adds the kernels' partial results, bootstraps and
updates the model. A chunk's position in its step (0, 1, ...) fixes where its softmax
denominators sit in the step's one compact bootstrap (`he.packing.SoftmaxLayout`).

Binary head, per chunk:  (sigmoid~(rotsum(x_dup * V)) * lr/n - lr/n Y) * x_grad, summed over
the chunks before the driver's gradient rotate-and-sum.
Binary head with one sigmoid a step (`TrainingPlan.compact_sigmoid`, refresh mode "hospital"),
two phases around the driver's refresh and sigmoid: `binary_forward` gathers the chunks'
partial logits (place p at slots p r .. p r + r - 1 of each block, `TrainingPlan.
compact_period`), `binary_backward` spreads each chunk's value of the step's sigmoid back over
its block and forms the same terms; the driver does the rotations all chunks share.
Softmax head, two phases around the driver's denominator bootstrap:
    forward:  e_k = exp~(Z_k); the chunk's sums of exponentials at its compact slots, shifted
              by its place in its denominator group, summed per group (the driver folds each
              group's sum and bootstraps it once)
    backward: P = spread(its group's inverse) * x_grad (once per chunk);
              e_k * P - (lr/n Y_k) * x_grad, i.e. (softmax_k - lr/n Y_k) * x_grad, summed over
              the chunks, rotated back per class (the driver adds the period sum): the
              exponentials meet one product, not two (a level for the saturating exp).
Softmax head with one exponential a step (`TrainingPlan.compact_softmax`, refresh mode
"hospital"): `softmax_gather` gathers every chunk's and diagonal's partial logits (and labels)
into one ciphertext, the driver refreshes them, runs the exponential, the sums and the inverse
once, and `softmax_scatter` spreads each logit's softmax - label back over its block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import openfhe as ofhe

from medblindtuner.he.engine import Evaluator
from medblindtuner.he.packing import power_parts
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
        # (a streamed chunk is then not held across the denominator bootstrap)
        self._pending: list[tuple[int, int, list[ofhe.Ciphertext]]] = []

    def masked(self, ct: ofhe.Ciphertext, key: tuple, make: Callable[[], np.ndarray]):
        """ct times a constant mask (one level); the mask is encoded once per process, at the
        ciphertext's level (fewer towers to hold)."""
        plain = self.ev.cached_plaintext(key, make, self.ev.effective_level(ct))
        return self.ev.mul_plain(ct, plain)

    # ---- shared by training and validation ---------------------------------------------------
    def logit(self, chunk: EncryptedChunk, weights: ofhe.Ciphertext) -> ofhe.Ciphertext:
        """rotsum(x_dup * w): each sample's logit over the first half of its block."""
        return self.ev.rotate_and_sum(self.ev.mul(chunk.x_dup, weights),
                                      self.layout.logit_strides)

    def diagonals(self, model: Sequence[ofhe.Ciphertext],
                  weights: Sequence[float]) -> list[ofhe.Ciphertext]:
        """W_k for the c diagonals of `SoftmaxLayout`, from sum_j weights_j model_j (the
        look-ahead of [M, M_prev], or [M] itself) scaled by the exponential's unit map: one
        level in all. A step computes them once for all its chunks."""
        softmax, stride = self.softmax, self.layout.stride
        alpha = self.plan.activation.exp.unit_map[0]
        coefficients = [alpha * w for w in weights]
        if softmax.cyclic:
            combined = self.ev.linear_combination(model, coefficients)
            return [self.ev.rotate_chain(combined, power_parts(stride * k))
                    for k in range(softmax.n_classes)]
        out: list[ofhe.Ciphertext | None] = [None] * softmax.n_classes
        for shift in softmax.model_shifts:
            shifted = [self.ev.rotate_chain(ct, power_parts(stride * shift)) for ct in model]
            for k in softmax.shift_diagonals(shift):
                for ct, c in zip(shifted, coefficients, strict=True):
                    term = self.masked(ct, ("diagonal", k, shift, c),
                                       lambda k=k, s=shift, c=c: c * softmax.diagonal_mask(k, s))
                    out[k] = term if out[k] is None else self.ev.add(out[k], term)
        return out

    def exponentials_under(self, chunk: EncryptedChunk,
                           model: ofhe.Ciphertext) -> list[ofhe.Ciphertext]:
        """exp~ of one chunk's logits under `model` itself (validation: no look-ahead)."""
        return self.exponentials(self.softmax_logits(chunk, self.diagonals([model], [1.0])))

    def softmax_logits(self, chunk: EncryptedChunk,
                       diagonals: list[ofhe.Ciphertext]) -> list[ofhe.Ciphertext]:
        """One logit ciphertext per diagonal, already on the exponential's unit interval."""
        beta = self.plan.activation.exp.unit_map[1]
        logits = [self.logit(chunk, w) for w in diagonals]
        return logits if beta == 0.0 else [self.ev.add_scalar(z, beta) for z in logits]

    def sigmoid(self, unit_logit: ofhe.Ciphertext, scale: float) -> ofhe.Ciphertext:
        """scale * sigmoid~ of a logit already on the sigmoid's unit interval (times its unit
        map's alpha: `unit_lookahead`, `unit_logit`), the scale folded into the coefficients:
        `sigmoid.unit_depth` levels."""
        sig = self.plan.activation.sigmoid.scaled(scale)
        return self.ev.chebyshev_unit(unit_logit, sig.coefficients)

    def sigmoid_odd(self, unit_logit: ofhe.Ciphertext, scale: float) -> ofhe.Ciphertext:
        """The odd part of scale * sigmoid~ (`ChebyshevApprox.odd_part`): 0 where the input
        is 0, the series' value at zero left out (the caller adds it back)."""
        odd = self.plan.activation.sigmoid.scaled(scale).odd_part()[0]
        return self.ev.chebyshev_unit(unit_logit, odd)

    def unit_lookahead(self, model: Sequence[ofhe.Ciphertext],
                       weights: Sequence[float]) -> ofhe.Ciphertext:
        """alpha sum_j weights_j model_j, alpha the sigmoid's unit map (the interval is
        symmetric, beta = 0): the look-ahead whose logits are on [-1, 1], in the one level the
        look-ahead costs anyway (binary head)."""
        alpha = self.plan.activation.sigmoid.unit_map[0]
        return self.ev.linear_combination(model, [alpha * w for w in weights])

    def unit_logit(self, chunk: EncryptedChunk, model: ofhe.Ciphertext) -> ofhe.Ciphertext:
        """alpha * logit under `model` itself (validation): the level OpenFHE's own linear map
        would spend inside the series."""
        return self.ev.mul_scalar(self.logit(chunk, model),
                                  self.plan.activation.sigmoid.unit_map[0])

    def exponentials(self, logits: list[ofhe.Ciphertext]) -> list[ofhe.Ciphertext]:
        """exp~ of logits already on the unit interval (`softmax_logits`)."""
        coefficients = self.plan.activation.exp.coefficients
        return [self.ev.chebyshev_unit(z, coefficients) for z in logits]

    def compact_sums(self, exps: list[ofhe.Ciphertext]) -> ofhe.Ciphertext:
        """alpha S_i (the inverse's unit-map scale) at each sample's compact slot, zero
        elsewhere; the driver adds beta after the refresh."""
        alpha = self.plan.activation.inverse.unit_map[0]
        return self.masked(self.ev.add_many(exps), ("select", alpha),
                           lambda: alpha * self.softmax.select_mask())

    def spread_inverse(self, inverse: ofhe.Ciphertext, rotation: int,
                       scale: float) -> ofhe.Ciphertext:
        """scale / S_i over the first half of each sample's block, from the refreshed inverse.

        `rotation` brings this chunk's own 1/S_i to the second half of each sample's block
        (offset g); the unfold mask carries the scale, the spread covers the first half (its
        spill into second halves meets the zeros of x_grad and labels)."""
        softmax = self.softmax
        own = self.ev.rotate(inverse, rotation) if rotation else inverse
        unfold = self.masked(own, ("unfold", scale), lambda: scale * softmax.unfold_mask())
        return self.ev.rotate_and_sum(unfold, softmax.spread_strides)

    def softmax_probabilities(self, inverse: ofhe.Ciphertext, rotation: int,
                              exps: list[ofhe.Ciphertext]) -> list[ofhe.Ciphertext]:
        """Softmax probabilities per diagonal (validation): e_k / S."""
        spread = self.spread_inverse(inverse, rotation, 1.0)
        return [self.ev.mul(e, spread) for e in exps]

    def _term(self, probability: ofhe.Ciphertext, label: ofhe.Ciphertext, scale: float,
              x_grad: ofhe.Ciphertext) -> ofhe.Ciphertext:
        return self.ev.mul(self.ev.sub(probability, self.ev.mul_scalar(label, scale)), x_grad)

    def gather(self, terms: list[ofhe.Ciphertext]) -> ofhe.Ciphertext:
        """Per-diagonal gradient terms back into the model layout (before the period sum):
        sum over shifts s of rot(sum_k P_ks T_k, 2d (C - s)), the diagonals' way back."""
        softmax, stride, width = self.softmax, self.layout.stride, self.softmax.class_slots
        if softmax.cyclic:
            return self.ev.add_many([self.ev.rotate_chain(t, power_parts(stride * (width - k)))
                                     if k else t for k, t in enumerate(terms)])
        parts = []
        for shift in softmax.model_shifts:
            picked = self.ev.add_many([
                self.masked(terms[k], ("gather", k, shift),
                            lambda k=k, s=shift: softmax.diagonal_mask(k, s))
                for k in softmax.shift_diagonals(shift)])
            parts.append(self.ev.rotate_chain(picked, power_parts(stride * (width - shift)))
                         if shift else picked)
        return self.ev.add_many(parts)

    # ---- the step's phases ---------------------------------------------------------------------
    def binary_terms(self, lookahead: ofhe.Ciphertext, placed: Sequence[PlacedChunk],
                     scale: float) -> ofhe.Ciphertext:
        """Sum over these chunks of (scale sigmoid~(z) - scale y) * x_grad (binary head);
        `lookahead` comes from `unit_lookahead`."""
        terms = []
        for _, index in placed:
            chunk = self.chunks[index]
            probability = self.sigmoid(self.logit(chunk, lookahead), scale)
            terms.append(self._term(probability, chunk.labels[0], scale, chunk.x_grad))
        return self.ev.add_many(terms)

    def binary_forward(self, lookahead: ofhe.Ciphertext,
                       placed: Sequence[PlacedChunk]) -> ofhe.Ciphertext:
        """These chunks' partial logits gathered into one ciphertext (compact sigmoid,
        `TrainingPlan.compact_sigmoid`): the chunk at step position p sums its products over
        strides r .. d/2 (r = `TrainingPlan.compact_period`) and keeps slots p r .. p r + r - 1
        of each block, which then hold its logit's r residue sums (the duplicated x makes
        every window of d slots a whole logit); summed over the chunks, one level after the
        logits. The driver adds the last r slots once for the whole step."""
        r = self.plan.compact_period
        return self.ev.add_many([self.windowed_logit(self.chunks[index].x_dup, lookahead,
                                                     position, r)
                                 for position, index in placed])

    def binary_backward(self, probabilities: ofhe.Ciphertext, placed: Sequence[PlacedChunk],
                        scale: float) -> ofhe.Ciphertext:
        """Sum over these chunks of (P - scale y) * x_grad. `probabilities`: the odd part of
        scale sigmoid~ of the step's gathered logits (zero wherever no logit is), moved right
        by d and summed over strides 1 .. r/2 by the driver, so chunk p's value fills slots
        d + p r - r + 1 .. d + p r of each block and no other chunk's reaches them. Each
        chunk picks its window (one level) and spreads it over strides r .. d/2 and d, which
        covers the first half of its block once (the spill lands in second halves, where
        x_grad and the labels are zero), and adds the series' value at zero."""
        r = self.plan.compact_period
        at_zero = self.plan.activation.sigmoid.scaled(scale).odd_part()[1]
        terms = []
        for position, index in placed:
            chunk = self.chunks[index]
            spread = self.ev.add_scalar(self.spread_window(probabilities, position, r), at_zero)
            terms.append(self._term(spread, chunk.labels[0], scale, chunk.x_grad))
        return self.ev.add_many(terms)

    def windowed_logit(self, x_dup: ofhe.Ciphertext, weights: ofhe.Ciphertext, place: int,
                       r: int) -> ofhe.Ciphertext:
        """x_dup * weights summed over strides r .. d/2 and kept at slots place r .. place r
        + r - 1 of each block (one level): there, the logit's r residue sums (the duplicated
        x makes every window of d slots a whole logit). A gathered logit's part
        (`binary_forward`, `gather_softmax_logits`); the driver adds the last r slots."""
        partial = self.ev.rotate_and_sum(self.ev.mul(x_dup, weights),
                                         self.layout.strides_from(r, self.layout.block // 2))
        return self.masked(partial, ("window", place, r),
                           lambda: self.layout.window_mask([place * r], r))

    def spread_window(self, values: ofhe.Ciphertext, place: int, r: int,
                      scale: float = 1.0) -> ofhe.Ciphertext:
        """scale times the value of place in `values` (a gathered vector moved right by d and
        summed over strides 1 .. r/2, so it fills slots d + place r - r + 1 .. d + place r of
        each block) over the first half of each block: the window picked (one level) and
        summed over strides r .. d/2 and d (the spill lands in second halves, where x_grad
        and the labels are zero)."""
        d = self.layout.block
        start = d + place * r - r + 1
        own = self.masked(values, ("spread", start, r, scale),
                          lambda: scale * self.layout.window_mask([start], r))
        return self.ev.rotate_and_sum(own, self.layout.strides_from(r, d // 2) + [d])

    def softmax_forward(self, model: Sequence[ofhe.Ciphertext], weights: Sequence[float],
                        placed: Sequence[PlacedChunk]) -> dict[int, ofhe.Ciphertext]:
        """These chunks' share of each denominator group's compact vector (before the fold),
        by group, under the look-ahead sum_j weights_j model_j."""
        self._pending = []
        parts: dict[int, list[ofhe.Ciphertext]] = {}
        diagonals = self.diagonals(model, weights)
        for position, index in placed:
            chunk = self.chunks[index]
            exps = self.exponentials(self.softmax_logits(chunk, diagonals))
            picked = self.compact_sums(exps)
            shift = self.softmax.chunk_shift(position)
            parts.setdefault(self.softmax.group_of(position), []).append(
                self.ev.rotate(picked, -shift) if shift else picked)
            self._pending.append((position, index, exps))
        return {group: self.ev.add_many(cts) for group, cts in parts.items()}

    def softmax_gather(self, model: Sequence[ofhe.Ciphertext], weights: Sequence[float],
                       placed: Sequence[PlacedChunk]) -> dict[int, ofhe.Ciphertext]:
        """One exponential a step (`TrainingPlan.compact_softmax`): these chunks' partial
        logits and labels gathered by group of `softmax_group` chunks (keys 2 j and 2 j + 1
        for group j). Logit q = p C + k (chunk at place p of its group, diagonal k) sums its
        products over strides r .. d/2 (r = `TrainingPlan.softmax_period`) and keeps slots
        q r .. q r + r - 1 of each block (the driver adds the last r once a group); its label
        keeps slot q r. The diagonals are made once for all groups."""
        return self.gather_softmax_logits(
            [(position, self.chunks[index]) for position, index in placed],
            self.diagonals(model, weights), self.plan.softmax_period, self.plan.softmax_group)

    def gather_softmax_logits(self, chunks: Sequence[tuple[int, EncryptedChunk]],
                              diagonals: Sequence[ofhe.Ciphertext], r: int,
                              group: int) -> dict[int, ofhe.Ciphertext]:
        """`softmax_gather` for (position, chunk) pairs under these diagonals, windows of r
        slots, `group` chunks a group (the driver gathers the validation chunks the same
        way)."""
        width = self.softmax.class_slots
        parts: dict[int, list[ofhe.Ciphertext]] = {}
        for position, chunk in chunks:
            key, place = 2 * (position // group), position % group
            for k, diagonal in enumerate(diagonals):
                q = place * width + k
                parts.setdefault(key, []).append(self.windowed_logit(chunk.x_dup, diagonal,
                                                                     q, r))
                parts.setdefault(key + 1, []).append(self.masked(
                    chunk.labels[k], ("softmax label", q, r),
                    lambda q=q: self.layout.window_mask([q * r])))
        return {key: self.ev.add_many(cts) for key, cts in parts.items()}

    def softmax_scatter(self, deltas: dict[int, ofhe.Ciphertext],
                        placed: Sequence[PlacedChunk], scale: float) -> ofhe.Ciphertext:
        """Gradient terms of these chunks from their group's softmax_q - Y_q (one exponential
        a step; `deltas` by group j), summed and gathered into the model layout. Each group's
        values were moved right by d and summed over strides 1 .. r/2 by the driver, so
        logit q fills slots d + q r - r + 1 .. d + q r of each block; each (chunk, diagonal)
        picks its window (times the step size), spreads it over strides r .. d/2 and d (the
        first half of its block, as `binary_backward`) and meets x_grad."""
        r, width = self.plan.softmax_period, self.softmax.class_slots
        group = self.plan.softmax_group
        summed: list[ofhe.Ciphertext | None] = [None] * self.softmax.n_classes
        for position, index in placed:
            chunk, values = self.chunks[index], deltas[position // group]
            for k in range(self.softmax.n_classes):
                spread = self.spread_window(values, (position % group) * width + k, r, scale)
                term = self.ev.mul(spread, chunk.x_grad)
                summed[k] = term if summed[k] is None else self.ev.add(summed[k], term)
        return self.gather(summed)

    def softmax_backward(self, inverses: dict[int, ofhe.Ciphertext],
                         scale: float) -> ofhe.Ciphertext:
        """Gradient terms of the chunks of the last forward (each with its group's refreshed
        inverse), summed over them and gathered into the model layout (class b lands on
        block b once the driver sums over the period)."""
        if not self._pending:
            raise RuntimeError("softmax_backward needs the chunks of a softmax_forward")
        d = self.layout.block
        summed: list[ofhe.Ciphertext | None] = [None] * self.softmax.n_classes
        pending, self._pending = self._pending, []
        while pending:  # a chunk's exponentials and terms are freed once its terms are added
            position, index, exps = pending.pop(0)
            chunk = self.chunks[index]
            rotation = self.softmax.chunk_shift(position) - d
            inverse = inverses[self.softmax.group_of(position)]
            weighted = self.ev.mul(self.spread_inverse(inverse, rotation, scale), chunk.x_grad)
            for k, e in enumerate(exps):
                labelled = self.ev.mul(self.ev.mul_scalar(chunk.labels[k], scale), chunk.x_grad)
                term = self.ev.sub(self.ev.mul(e, weighted), labelled)
                summed[k] = term if summed[k] is None else self.ev.add(summed[k], term)
            del exps, weighted, chunk
        return self.gather(summed)
