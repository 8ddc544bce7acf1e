"""Homomorphic evaluator with operation counters and a level-aware bootstrapping manager.

Every encrypted computation goes through `Evaluator` so benchmarks can report bootstraps,
rotations and multiplications per step, and so bootstrapping happens in exactly one place:
`ensure_levels` refreshes a ciphertext only when the next operation needs more levels than
remain (OpenFHE, FLEXIBLEAUTO: one multiplicative level per ct x ct, ct x plaintext or
non-integer scalar product). `bootstrap` is the one refresh: OpenFHE's bootstrapping, or, when
the parameters say the hospital refreshes (`CkksParams.refresh`), a `he.refresh.CloudRefresher`
that asks the key holder (counted as "bootstraps" either way, and as "refreshes").
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import openfhe as ofhe

from medblindtuner.he.params import CkksParams
from medblindtuner.he.refresh import CloudRefresher, max_refresh_level


@dataclass
class OpCounter:
    """Counts of homomorphic operations and the wall time spent in each kind.

    `seconds` keys are op kinds ("rotations", "chebyshev", ...); snapshots flatten them to
    `seconds_<kind>` so benchmarks can report where a step's time goes.
    """

    counts: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)

    @property
    def bootstrap_seconds(self) -> float:
        return float(self.seconds["bootstraps"])

    def snapshot(self) -> dict:
        data: dict = {name: int(value) for name, value in sorted(self.counts.items())}
        data["bootstrap_seconds"] = round(self.bootstrap_seconds, 3)
        data.update({f"seconds_{kind}": round(float(value), 3)
                     for kind, value in sorted(self.seconds.items())})
        return data

    def load(self, data: dict) -> None:
        self.counts = Counter({k: int(v) for k, v in data.items()
                               if k != "bootstrap_seconds" and not k.startswith("seconds_")})
        self.seconds = Counter({k[len("seconds_"):]: float(v) for k, v in data.items()
                                if k.startswith("seconds_")})
        if "bootstraps" not in self.seconds and "bootstrap_seconds" in data:
            self.seconds["bootstraps"] = float(data["bootstrap_seconds"])

    def __getitem__(self, name: str) -> int:
        return int(self.counts[name])

    @contextmanager
    def timed(self, kind: str, count: int = 1):
        self.counts[kind] += count
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] += time.perf_counter() - start


# OpenFHE bootstraps inputs up to level depth - 1 (23 at depth 24); see BOOTSTRAP_OUTPUT_LEVEL in
# he/params.py for where refreshed ciphertexts start (tests/test_he_engine.py checks both).
BOOTSTRAP_MAX_INPUT_LEVEL_MARGIN = 1


class Evaluator:
    """Thin, counted wrapper over an OpenFHE CryptoContext holding only evaluation keys."""

    def __init__(self, context: ofhe.CryptoContext, params: CkksParams,
                 public_key: ofhe.PublicKey | None = None,
                 refresher: CloudRefresher | None = None) -> None:
        self.context = context
        self.params = params
        self.public_key = public_key
        self.refresher = refresher
        self.ops = OpCounter()
        self._plain_cache: dict[tuple, ofhe.Plaintext] = {}
        self._zeros: dict[int, ofhe.Ciphertext] = {}

    def adopt(self, ct: ofhe.Ciphertext) -> ofhe.Ciphertext:
        """Re-home a ciphertext read from disk into this context, for speed.

        OpenFHE gives a deserialized ciphertext its own copies of the ring parameters, and every
        operation on it, and on results that inherit parameters from their first operand, runs
        markedly slower (docs/results.md: benchmarks/probe_step.py --compare-loaded).
        Adding an encryption of zero made in this context, as the first operand, gives the
        same values with the context's parameters. Needs only the public key; without one the
        ciphertext is returned as is.
        """
        if self.public_key is None:
            return ct
        level = ct.GetLevel()
        if level not in self._zeros:
            plain = self.context.MakeCKKSPackedPlaintext(
                np.zeros(self.params.slots), 1, level, None, self.params.slots)
            self._zeros[level] = self.context.Encrypt(self.public_key, plain)
        return self.context.EvalAdd(self._zeros[level], ct)

    # ---- levels ----------------------------------------------------------------------------
    @property
    def max_level(self) -> int:
        """Highest level a ciphertext may reach and still be bootstrapped (or refreshed)."""
        if self.params.refreshed_by_hospital:
            return max_refresh_level(self.params)
        return self.params.depth - BOOTSTRAP_MAX_INPUT_LEVEL_MARGIN

    def levels_left(self, ct: ofhe.Ciphertext) -> int:
        """Levels usable before a refresh, counting a pending (lazy) rescale as spent."""
        return self.max_level - (ct.GetLevel() + ct.GetNoiseScaleDeg() - 1)

    def ensure_levels(self, ct: ofhe.Ciphertext, needed: int, period: int | None = None):
        """Bootstrap `ct` only if fewer than `needed` levels remain.

        `period`: the ciphertext's values repeat with this period, so it is bootstrapped as a
        sparsely packed ciphertext of `period` slots (cheaper); must be one of the parameter
        set's bootstrap slot counts.
        """
        if self.levels_left(ct) >= needed:
            return ct
        return self.bootstrap(ct, period)

    def bootstrap(self, ct: ofhe.Ciphertext, period: int | None = None) -> ofhe.Ciphertext:
        """A fresh ciphertext of the same values. `period`: the values repeat with it, so
        OpenFHE bootstraps `period` slots; a hospital refresh covers every slot anyway. The
        refresh's index in the job is the count of refreshes so far (checkpointed with the
        counters, so a resumed run asks for the same indices)."""
        if self.params.refreshed_by_hospital:
            return self._refresh_by_hospital(ct)
        slots = period or self.params.slots
        if slots not in self.params.bootstrap_slots:
            raise ValueError(
                f"no bootstrapping keys for {slots} slots (have {self.params.bootstrap_slots})"
            )
        work = ct.Clone()
        work.SetSlots(slots)
        with self.ops.timed("bootstraps"), self.ops.timed(f"bootstraps_{slots}_slots"):
            fresh = self.context.EvalBootstrap(work)
        fresh.SetSlots(self.params.slots)
        return fresh

    def _refresh_by_hospital(self, ct: ofhe.Ciphertext) -> ofhe.Ciphertext:
        if self.refresher is None:
            raise RuntimeError("these parameters refresh through the hospital, but this "
                               "evaluator was given no refresher")
        index = self.ops["bootstraps"]
        with self.ops.timed("bootstraps"), self.ops.timed("refreshes"):
            return self.refresher.refresh(ct, index)

    # ---- arithmetic --------------------------------------------------------------------------
    def plaintext(self, values: np.ndarray, level: int = 0) -> ofhe.Plaintext:
        """Encode a full-slot vector (at `level`: fewer towers, for ciphertexts that are
        already there)."""
        return self.context.MakeCKKSPackedPlaintext(
            np.ascontiguousarray(values, dtype=np.float64), 1, level, None, self.params.slots
        )

    def cached_plaintext(self, key: tuple, make: Callable[[], np.ndarray],
                         level: int = 0) -> ofhe.Plaintext:
        """A mask encoded once per process, since masks repeat every step (`make` runs only
        on the first request for `key` and `level`)."""
        if (key, level) not in self._plain_cache:
            self._plain_cache[key, level] = self.plaintext(make(), level)
        return self._plain_cache[key, level]

    @staticmethod
    def effective_level(ct: ofhe.Ciphertext) -> int:
        """The ciphertext's level once its pending (lazy) rescale is done."""
        return ct.GetLevel() + ct.GetNoiseScaleDeg() - 1

    def drop_to(self, ct: ofhe.Ciphertext, level: int) -> ofhe.Ciphertext:
        """A fresh (no pending rescale) ciphertext at `level` rather than below it: the same
        values in fewer towers, so that what follows is cheaper (OpenFHE's Compress; nothing
        to do at or past `level`)."""
        if ct.GetNoiseScaleDeg() != 1 or ct.GetLevel() >= level:
            return ct
        return self.context.Compress(ct, self.params.depth + 1 - level)

    def add(self, a, b):
        with self.ops.timed("additions"):
            return self.context.EvalAdd(a, b)

    def sub(self, a, b):
        with self.ops.timed("additions"):
            return self.context.EvalSub(a, b)

    def add_scalar(self, a: ofhe.Ciphertext, value: float) -> ofhe.Ciphertext:
        with self.ops.timed("additions"):
            return self.context.EvalAdd(a, float(value))

    def add_plain(self, a: ofhe.Ciphertext, plain: ofhe.Plaintext) -> ofhe.Ciphertext:
        with self.ops.timed("additions"):
            return self.context.EvalAdd(a, plain)

    def add_many(self, cts: Sequence[ofhe.Ciphertext]) -> ofhe.Ciphertext:
        with self.ops.timed("additions", max(len(cts) - 1, 0)):
            return self.context.EvalAddMany(list(cts))

    def mul(self, a: ofhe.Ciphertext, b: ofhe.Ciphertext) -> ofhe.Ciphertext:
        with self.ops.timed("ct_ct_multiplications"):
            return self.context.EvalMult(a, b)

    def mul_plain(self, a: ofhe.Ciphertext, plain: ofhe.Plaintext) -> ofhe.Ciphertext:
        with self.ops.timed("ct_pt_multiplications"):
            return self.context.EvalMult(a, plain)

    def mul_scalar(self, a: ofhe.Ciphertext, scalar: float) -> ofhe.Ciphertext:
        with self.ops.timed("scalar_multiplications"):
            return self.context.EvalMult(a, float(scalar))

    def linear_combination(self, cts: Sequence[ofhe.Ciphertext], weights: Iterable[float]):
        """sum_i w_i ct_i for one level (each term is a scalar product)."""
        terms = [self.mul_scalar(ct, w) for ct, w in zip(cts, weights, strict=True)]
        return self.add_many(terms)

    def rotate(self, ct: ofhe.Ciphertext, steps: int) -> ofhe.Ciphertext:
        with self.ops.timed("rotations"):
            return self.context.EvalRotate(ct, int(steps))

    def rotate_and_sum(self, ct: ofhe.Ciphertext, strides: Sequence[int]) -> ofhe.Ciphertext:
        """ct + rot(ct, s) for each stride s in turn: a log-depth slot sum costing no level."""
        total = ct
        for stride in strides:
            total = self.add(total, self.rotate(total, stride))
        return total

    def rotate_chain(self, ct: ofhe.Ciphertext, steps: Sequence[int]) -> ofhe.Ciphertext:
        """ct rotated by sum(steps), one key-switch per step (a rotation without a key of
        its own, composed from keys there are)."""
        for step in steps:
            ct = self.rotate(ct, step)
        return ct

    def chebyshev(self, ct: ofhe.Ciphertext, coefficients: Sequence[float], a: float, b: float):
        """OpenFHE's Chebyshev series (Paterson-Stockmeyer): the polynomial's depth in levels."""
        with self.ops.timed("polynomial_evaluations"):
            return self.context.EvalChebyshevSeries(ct, list(map(float, coefficients)), a, b)

    def chebyshev_unit(self, ct: ofhe.Ciphertext, coefficients: Sequence[float]):
        """The same series for an input already mapped onto [-1, 1]: OpenFHE then skips its
        linear map, one level less (`training.approx.ChebyshevApprox.unit_map`)."""
        return self.chebyshev(ct, coefficients, -1.0, 1.0)
