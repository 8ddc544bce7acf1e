"""One exponential a step: a softmax step's (or validation's) logits in one ciphertext.

With refresh mode "hospital" (`TrainingPlan.compact_softmax`) the chunks' partial logits and
labels come gathered (`cloud.kernel.StepKernel.softmax_gather`): logit q = p C + k (chunk p,
class diagonal k, C classes padded to a power of two) at slot q r of each block. Here they are
refreshed, and the exponential, the sums and the inverse run once for all of them
(docs/design.md, "One exponential a step").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import openfhe as ofhe

from medblindtuner.cloud.kernel import StepKernel
from medblindtuner.he.engine import Evaluator
from medblindtuner.training.artifacts import EncryptedChunk


class CompactSoftmax:
    """The driver's part of one exponential a step, on a trainer's evaluator and kernel."""

    def __init__(self, evaluator: Evaluator, kernel: StepKernel) -> None:
        self.ev = evaluator
        self.kernel = kernel
        self.plan = kernel.plan
        self.layout = kernel.layout
        self.softmax = kernel.softmax

    def loss(self, model: ofhe.Ciphertext,
             chunks: Sequence[EncryptedChunk]) -> ofhe.Ciphertext:
        """The validation loss (the trainer's `_sum_of_squares`) with one exponential and one
        inverse per `TrainingPlan.validation_group` validation chunks: their logits under
        `model` gathered as a step's are, (softmax - label)^2 at each logit's slot, summed
        into slot 0."""
        r, size, kernel = self.plan.softmax_period, self.plan.validation_group, self.kernel
        gathered = kernel.gather_softmax_logits(list(enumerate(chunks)),
                                                kernel.diagonals([model], [1.0]), r, size)
        squares = []
        for group in range(-(-len(chunks) // size)):
            deltas = self.deltas(gathered[2 * group], gathered[2 * group + 1],
                                 min(size, len(chunks) - group * size), r)
            squares.append(self.ev.mul(deltas, deltas))
        return self.ev.rotate_and_sum(
            self.ev.add_many(squares),
            self.layout.strides_from(r, self.layout.block // 2) + self.layout.sample_sum_strides)

    def deltas(self, partial_logits: ofhe.Ciphertext, labels: ofhe.Ciphertext, n: int,
               r: int) -> ofhe.Ciphertext:
        """softmax_q - Y_q at slot q r of each block (q = p C + k, chunk p, diagonal k),
        about zero elsewhere, from the gathered partial logits and labels of n chunks:
        the partial logits are summed over their last r slots, masked to the logits' slots
        and refreshed; the exponential runs once (slots without a logit give the series'
        value at the interval's map of 0, taken off as a constant); each chunk's sum over its
        C places is selected at its first place and refreshed; the inverse runs once (slots
        without a sum sit at the interval's centre, their value taken off) and is spread
        right over the C places."""
        kernel, layout, softmax = self.kernel, self.layout, self.softmax
        exp, inverse = self.plan.activation.exp, self.plan.activation.inverse
        width = softmax.class_slots
        places = layout.strides_from(r, r * width // 2)
        logit_slots = layout.window_mask([(p * width + k) * r for p in range(n)
                                          for k in range(softmax.n_classes)])
        sum_slots = layout.window_mask([p * width * r for p in range(n)])
        summed = self.ev.rotate_and_sum(partial_logits, layout.strides_from(1, r // 2))
        logits = kernel.masked(summed, ("softmax logits", r, n), lambda: logit_slots)
        unit = self.ev.add_scalar(self.ev.bootstrap(logits), exp.unit_map[1])
        exps = self._off_slots(self.ev.chebyshev_unit(unit, exp.coefficients),
                               ("softmax exp off", r, n), exp.at_unit(exp.unit_map[1]),
                               logit_slots)
        alpha, beta = inverse.unit_map
        sums = kernel.masked(self.ev.rotate_and_sum(exps, places), ("softmax sums", r, n, alpha),
                             lambda: alpha * sum_slots)
        fresh = self.ev.bootstrap(sums)
        unit = self.ev.add_plain(fresh, self.ev.cached_plaintext(
            ("softmax sum map", r, n, beta), lambda: beta * sum_slots,
            self.ev.effective_level(fresh)))
        inverses = self._off_slots(self.ev.chebyshev_unit(unit, inverse.coefficients),
                                   ("softmax inverse off", r, n), inverse.at_unit(0.0),
                                   sum_slots)
        spread = self.ev.rotate_and_sum(inverses, [-s for s in places])
        return self.ev.sub(self.ev.mul(exps, spread), labels)

    def _off_slots(self, ct: ofhe.Ciphertext, key: tuple, value: float,
                   kept: np.ndarray) -> ofhe.Ciphertext:
        """ct less `value` wherever `kept` is 0 (a series' known value on slots that held no
        input): zero there, for no level."""
        plain = self.ev.cached_plaintext(key + (value,), lambda: -value * (1.0 - kept),
                                         self.ev.effective_level(ct))
        return self.ev.add_plain(ct, plain)
