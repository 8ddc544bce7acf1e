"""Polynomial approximations, defined once for the encrypted step and its plaintext mirror.

Each approximation is a Chebyshev series on an interval [a, b] in OpenFHE's convention
p(x) = c0/2 + sum_k c_k T_k(t), t = (2x - a - b) / (b - a). The encrypted trainer passes the same
coefficients to `EvalChebyshevSeries`; the mirror evaluates them with numpy in float64, so the
two differ only by CKKS noise. Outside [a, b] a polynomial diverges: the hospital keeps inputs
inside by construction (feature rows have L2 norm <= 1, so |logit| <= ||w||) and checks the
plan with the mirror before anything is encrypted (`check_ranges`).

Depths (levels including OpenFHE's pending lazy rescale, measured with OpenFHE 1.6, see
tests/test_he_engine.py): degree <= 5: 4, <= 13: 5, <= 27: 6, <= 59: 7; one less when the
input is already mapped onto [-1, 1] (`ChebyshevApprox.unit_map`, `unit_depth`). Every series
is evaluated on [-1, 1] (the map folded into a product made anyway), so a head's degrees are
the highest whose unit series fit the levels the step leaves it (`unit_degree_for`):
`SIGMOID_LEVELS` = 6 (binary step: look-ahead 1, logit 2, sigmoid, gradient term 9 of the 9
levels between two sparse (2, 2) bootstraps) gives degree 59; the softmax's exp and inverse
have 4 levels each, degree 13 (cloud/trainer.py accounts for the levels of each step).

Why wide intervals: the head must reach the logits its prior gives (a well-separated set
has logits far beyond 24), not a prior raised to fit the polynomial. The gradient needs
sigma(z) - y accurate near the decision boundary and bounded far from it. A polynomial of
degree n bounded on [-R, R] has slope at most n / R at 0 (Bernstein), so R is set by the
degree, i.e. by the levels: degree 59 keeps sigma within 1.2e-2 on [-48, 48] and within 0.11
(bounded in [-0.11, 1.11]) on [-128, 128], against 1.6e-2 on [-24, 24] for degree 27 at the
same 6 levels (`SIGMOID_BOUNDS` in hospital/recipe.py). Reaching +-10^3 (domain-extension
polynomials, Cheon-Kim-Kim-Song, IEEE TIFS 2022) needs more levels than a step has.

The softmax's exponential cannot be bounded that way, and its sums of exponentials are what
the inverse must cover: at the probe's prior a well-separated 7-class set has logits of 14
and sums of 1.7e6. Beyond [-7, 7] the head therefore uses a saturating exponential,
exp(A tanh(x / A)) with A = `EXP_SATURATION`: e^x near the decision boundary, at most e^A
far from it, so the sums stay below c e^A and the inverse keeps its accuracy, while a
confident sample's probabilities stay near 0 and 1 (its gradient term near 0). Degree 27
(one level more than the plain exp's 13) keeps it within 3.7e-3 on [-16, 16] and 0.18 on
[-24, 24] (values up to e^6 = 403, so that error is small beside the sums it enters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medblindtuner.errors import MedBlindTunerError

_DEPTHS = ((5, 4), (13, 5), (27, 6), (59, 7), (119, 8))
SIGMOID_LEVELS = 6  # levels the binary step leaves its sigmoid (see the module docstring)
EXP_LEVELS = 4  # levels the softmax step leaves its plain exp (saturating exp: one more)
INVERSE_LEVELS = 5  # levels the refreshed denominators leave the inverse
EXP_SATURATION = 6.0  # A of the saturating exponential exp(A tanh(x / A))
PLAIN_EXP_BOUND = 7.0  # widest interval of the plain exp (degree 13: 3.3e-3 on [-7, 7])


def chebyshev_depth(degree: int) -> int:
    """Multiplicative levels OpenFHE's EvalChebyshevSeries consumes for this degree."""
    for limit, depth in _DEPTHS:
        if degree <= limit:
            return depth
    raise ValueError(f"degree {degree} too high")


def unit_degree_for(levels: int) -> int:
    """The highest degree whose series on [-1, 1] costs at most `levels` levels."""
    fitting = [limit for limit, depth in _DEPTHS if depth - 1 <= levels]
    if not fitting:
        raise ValueError(f"no Chebyshev series fits {levels} levels")
    return max(fitting)


@dataclass(frozen=True)
class ChebyshevApprox:
    """f(x) ~ Chebyshev series on [a, b]; `scale` multiplies the result at no level cost."""

    name: str
    a: float
    b: float
    degree: int
    scale: float = 1.0

    @property
    def coefficients(self) -> tuple[float, ...]:
        """Interpolation at Chebyshev nodes, in OpenFHE's c0/2 convention, times `scale`."""
        nodes = np.cos(np.pi * (np.arange(self.degree + 1) + 0.5) / (self.degree + 1))
        x = 0.5 * (self.b - self.a) * nodes + 0.5 * (self.b + self.a)
        values = _FUNCTIONS[self.name](x)
        coeffs = np.polynomial.chebyshev.chebfit(nodes, values, self.degree)
        coeffs[0] *= 2.0
        return tuple(float(c) * self.scale for c in coeffs)

    @property
    def depth(self) -> int:
        """Levels of the series with OpenFHE's own linear map (input on [a, b])."""
        return chebyshev_depth(self.degree)

    @property
    def unit_depth(self) -> int:
        """Levels of the series on an input already mapped onto [-1, 1] (how the encrypted
        step evaluates it: `unit_map`)."""
        return self.depth - 1

    @property
    def unit_map(self) -> tuple[float, float]:
        """(alpha, beta) with t = alpha x + beta on [-1, 1]. A caller that folds alpha into a
        product it makes anyway evaluates the series on [-1, 1], where OpenFHE skips its own
        linear map and the polynomial costs one level less (`Evaluator.chebyshev_unit`)."""
        width = self.b - self.a
        return 2.0 / width, -(self.a + self.b) / width

    def odd_part(self) -> tuple[tuple[float, ...], float]:
        """(the series' odd coefficients, its value at t = 0): the odd part is exactly 0 where
        its input is 0, and odd part + value at 0 is the series wherever its even
        coefficients past c0 vanish (a sigmoid on a symmetric interval: they are rounding
        noise), so slots holding zero stay zero through it (`cloud.trainer`)."""
        coeffs = np.array(self.coefficients)
        even, odd = coeffs.copy(), coeffs.copy()
        even[1::2], odd[0::2] = 0.0, 0.0
        at_zero = float(np.polynomial.chebyshev.chebval(0.0, even) - 0.5 * even[0])
        return tuple(float(c) for c in odd), at_zero

    def at_unit(self, t: float) -> float:
        """The series' value at t on [-1, 1] (what `chebyshev_unit` gives for an input t)."""
        coeffs = np.array(self.coefficients)
        return float(np.polynomial.chebyshev.chebval(t, coeffs) - 0.5 * coeffs[0])

    def scaled(self, factor: float) -> ChebyshevApprox:
        return ChebyshevApprox(self.name, self.a, self.b, self.degree, self.scale * factor)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Evaluate exactly the polynomial the encrypted path evaluates (no clipping)."""
        coeffs = np.array(self.coefficients)
        t = (2.0 * np.asarray(x, dtype=np.float64) - self.a - self.b) / (self.b - self.a)
        return np.polynomial.chebyshev.chebval(t, coeffs) - 0.5 * coeffs[0]

    def exact(self, x: np.ndarray) -> np.ndarray:
        return self.scale * _FUNCTIONS[self.name](np.asarray(x, dtype=np.float64))

    def max_error(self, samples: int = 4001) -> float:
        x = np.linspace(self.a, self.b, samples)
        return float(np.max(np.abs(self(x) - self.exact(x))))

    def to_dict(self) -> dict:
        return {"name": self.name, "interval": [self.a, self.b], "degree": self.degree,
                "scale": self.scale, "depth": self.depth, "unit_depth": self.unit_depth,
                "max_error": self.max_error()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def saturated_exp(x: np.ndarray) -> np.ndarray:
    """exp(A tanh(x / A)), A = EXP_SATURATION: e^x for |x| well below A, at most e^A."""
    return np.exp(EXP_SATURATION * np.tanh(np.asarray(x, dtype=np.float64) / EXP_SATURATION))


_FUNCTIONS = {"sigmoid": _sigmoid, "exp": np.exp, "saturated_exp": saturated_exp,
              "inverse": lambda x: 1.0 / x}


@dataclass(frozen=True)
class ActivationPlan:
    """Which approximations a head uses: sigmoid for 2 classes, exp + inverse for softmax.

    `logit_bound` R: logits must stay in [-R, R]. For softmax the class weights start at zero
    and the gradient sums to (almost) zero over classes, so the logits of a sample sum to ~0.
    Then S = sum_j e^z_j >= c (Jensen) and S <= max_softmax_sum (half the classes at +R, half
    at -R), and the inverse is fitted on [c/2, 1.2 max_softmax_sum]: for c = 5, R = 3 that is
    [2.5, 49.5], where degree 13 has a relative error of 3.4e-3 (degree 5 on the naive
    [0.8, 1.1 c e^R] was off by up to 64 %). `sum_bound`, when the hospital derived it from
    the data (`hospital.recipe`), replaces that worst case: a narrower interval is a more
    accurate inverse. With `exp_saturated` the head's exponential is `saturated_exp` (wide
    intervals, `softmax_for`). The hospital's range check verifies both intervals on the
    mirror before anything is encrypted.
    """

    n_classes: int
    logit_bound: float = 12.0
    sigmoid_degree: int = unit_degree_for(SIGMOID_LEVELS)
    exp_degree: int = unit_degree_for(EXP_LEVELS)
    inverse_degree: int = unit_degree_for(INVERSE_LEVELS)
    sum_bound: float | None = None  # upper end of the inverse's interval (softmax)
    exp_saturated: bool = False  # softmax: exp(A tanh(x / A)) instead of e^x

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    @property
    def levels(self) -> dict[str, int]:
        """Levels each approximation of this head costs in the encrypted step (inputs on the
        unit interval): what a step's level accounting asks for."""
        parts = {"sigmoid": self.sigmoid} if self.binary else {
            "exp": self.exp, "inverse": self.inverse}
        return {name: approx.unit_depth for name, approx in parts.items()}

    @property
    def sigmoid(self) -> ChebyshevApprox:
        return ChebyshevApprox("sigmoid", -self.logit_bound, self.logit_bound, self.sigmoid_degree)

    @property
    def exp(self) -> ChebyshevApprox:
        name = "saturated_exp" if self.exp_saturated else "exp"
        return ChebyshevApprox(name, -self.logit_bound, self.logit_bound, self.exp_degree)

    @property
    def max_softmax_sum(self) -> float:
        """Largest sum of the head's exponentials of c logits in [-R, R] that sum to zero."""
        r, c = self.logit_bound, self.n_classes
        f = _FUNCTIONS[self.exp.name]
        return float((c // 2) * (f(r) + f(-r)) + (c % 2) * f(0.0))

    @property
    def inverse(self) -> ChebyshevApprox:
        upper = self.sum_bound if self.sum_bound is not None else 1.2 * self.max_softmax_sum
        return ChebyshevApprox("inverse", 0.5 * self.n_classes, upper, self.inverse_degree)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Mirror of the encrypted head: (n, 1) sigmoid or (n, c) approximate softmax."""
        if self.binary:
            return self.sigmoid(logits)
        e = self.exp(logits)
        return e * self.inverse(e.sum(axis=1, keepdims=True))

    @staticmethod
    def saturates(logit_bound: float) -> bool:
        """Whether a softmax head on [-R, R] uses the saturating exponential."""
        return logit_bound > PLAIN_EXP_BOUND

    @classmethod
    def softmax_for(cls, n_classes: int, logit_bound: float,
                    sum_bound: float | None = None) -> ActivationPlan:
        """A softmax head on [-R, R]: the plain exp (degree 13) up to `PLAIN_EXP_BOUND`, the
        saturating one (degree 27, one level more) beyond."""
        if not cls.saturates(logit_bound):
            return cls(n_classes, logit_bound, sum_bound=sum_bound)
        return cls(n_classes, logit_bound, sum_bound=sum_bound, exp_saturated=True,
                   exp_degree=unit_degree_for(EXP_LEVELS + 1))

    @classmethod
    def default(cls, n_classes: int) -> ActivationPlan:
        return cls(n_classes=n_classes, logit_bound=12.0 if n_classes == 2 else 3.0)

    def to_dict(self) -> dict:
        parts = {"sigmoid": self.sigmoid} if self.binary else {
            "exp": self.exp, "inverse": self.inverse}
        return {"n_classes": self.n_classes, "logit_bound": self.logit_bound,
                "sum_bound": self.sum_bound, "exp_saturated": self.exp_saturated,
                **{k: v.to_dict() for k, v in parts.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> ActivationPlan:
        return cls(
            n_classes=int(data["n_classes"]),
            logit_bound=float(data["logit_bound"]),
            sigmoid_degree=int(data.get("sigmoid", {}).get("degree", 27)),
            exp_degree=int(data.get("exp", {}).get("degree", 9)),
            inverse_degree=int(data.get("inverse", {}).get("degree", 13)),
            sum_bound=None if data.get("sum_bound") is None else float(data["sum_bound"]),
            exp_saturated=bool(data.get("exp_saturated", False)),
        )


def exact_probabilities(logits: np.ndarray, n_classes: int) -> np.ndarray:
    """Reference head: exact sigmoid (binary, (n,1)) or exact softmax."""
    if n_classes == 2:
        return _sigmoid(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


class RangeError(MedBlindTunerError, ValueError):
    """Logits left the approximation interval: the encrypted polynomial would diverge."""
