"""CKKS parameter sets, defined once and shared by every role and artifact.

The production set is 128-bit secure (HE standard, ring dimension 2^16). The insecure test set
uses a tiny ring so tests run in seconds; it is only reachable by name (`INSECURE_TEST`) or with
an explicit `allow_insecure=True`, and every artifact records which set made it so that a
mismatch is refused on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError


class ParameterError(MedBlindTunerError, ValueError):
    """Raised when CKKS parameters are unsafe or do not match an artifact."""


@dataclass(frozen=True)
class CkksParams:
    """Everything needed to rebuild the same CryptoContext in another process.

    `bootstrap_slots`: the sparse slot counts a plan bootstraps at (`TrainingPlan.
    bootstrap_slots`; one per plan): bootstrapping a ciphertext with few slots is cheaper and
    consumes fewer levels than a full one, and each count has its own precomputation and keys.
    """

    name: str
    ring_dim: int
    security: str  # an openfhe SecurityLevel name
    scaling_bits: int
    first_mod_bits: int
    depth: int
    level_budget: tuple[int, int] = (3, 3)  # full-slot bootstrapping
    sparse_level_budget: tuple[int, int] = (2, 2)  # few-slot (model) bootstrapping
    secret_key_dist: str = "SPARSE_ENCAPSULATED"
    bootstrap_slots: tuple[int, ...] = field(default_factory=tuple)

    @property
    def slots(self) -> int:
        """Full CKKS slot count (N/2): the layout of data ciphertexts."""
        return self.ring_dim // 2

    @property
    def is_secure(self) -> bool:
        return self.security == "HEStd_128_classic" and self.ring_dim >= 1 << 16

    def with_bootstrap_slots(self, slots: tuple[int, ...]) -> CkksParams:
        """Same parameters with the sparse bootstrap slot counts a training plan needs."""
        values = asdict(self)
        values["bootstrap_slots"] = tuple(sorted(set(slots)))
        values["level_budget"] = tuple(self.level_budget)
        values["sparse_level_budget"] = tuple(self.sparse_level_budget)
        return CkksParams(**values)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["level_budget"] = list(self.level_budget)
        data["sparse_level_budget"] = list(self.sparse_level_budget)
        data["bootstrap_slots"] = list(self.bootstrap_slots)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CkksParams:
        values = dict(data)
        values["level_budget"] = tuple(values.get("level_budget", (3, 3)))
        values["sparse_level_budget"] = tuple(values.get("sparse_level_budget", (2, 2)))
        values["bootstrap_slots"] = tuple(values.get("bootstrap_slots", ()))
        return cls(**values)

    def fingerprint(self) -> str:
        """Short stable hash used to match ciphertexts, keys and bundles to one parameter set."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_matches(self, other: CkksParams, what: str) -> None:
        if self.fingerprint() != other.fingerprint():
            raise ParameterError(
                f"{what} was made with CKKS parameters {other.name!r} ({other.fingerprint()}), "
                f"but this job uses {self.name!r} ({self.fingerprint()}): refusing to mix them."
            )


PRODUCTION = CkksParams(
    name="production-128",
    ring_dim=1 << 16,
    security="HEStd_128_classic",
    scaling_bits=50,
    first_mod_bits=58,
    depth=24,
)

# Tiny ring, NOT secure: for tests and `--insecure-test-params` only.
INSECURE_TEST = CkksParams(
    name="INSECURE-test-only",
    ring_dim=1 << 12,
    security="HEStd_NotSet",
    scaling_bits=50,
    first_mod_bits=58,
    depth=24,
)


def require_secure(params: CkksParams, allow_insecure: bool = False) -> None:
    """Refuse insecure parameters unless the caller opted in explicitly."""
    if params.is_secure:
        return
    if not allow_insecure:
        raise ParameterError(
            f"CKKS parameter set {params.name!r} (ring {params.ring_dim}, {params.security}) is "
            "not 128-bit secure; it is only allowed with the explicit insecure test option."
        )


def build_context(params: CkksParams) -> ofhe.CryptoContext:
    """Create the CryptoContext for `params` with every feature training needs enabled."""
    cc_params = ofhe.CCParamsCKKSRNS()
    cc_params.SetSecretKeyDist(getattr(ofhe, params.secret_key_dist))
    cc_params.SetSecurityLevel(getattr(ofhe, params.security))
    cc_params.SetRingDim(params.ring_dim)
    cc_params.SetScalingModSize(params.scaling_bits)
    cc_params.SetFirstModSize(params.first_mod_bits)
    cc_params.SetScalingTechnique(ofhe.FLEXIBLEAUTO)
    cc_params.SetMultiplicativeDepth(params.depth)
    context = ofhe.GenCryptoContext(cc_params)
    for feature in (ofhe.PKE, ofhe.KEYSWITCH, ofhe.LEVELEDSHE, ofhe.ADVANCEDSHE, ofhe.FHE):
        context.Enable(feature)
    if context.GetRingDimension() != params.ring_dim:
        raise ParameterError(
            f"OpenFHE chose ring dimension {context.GetRingDimension()} for {params.name!r}, "
            f"expected {params.ring_dim}"
        )
    return context


# Level of a freshly bootstrapped ciphertext at depth 24, per level budget (measured with
# OpenFHE 1.6; a rescale is still pending, and inputs up to level 23 can be bootstrapped).
BOOTSTRAP_OUTPUT_LEVEL = {(1, 1): 11, (2, 2): 13, (3, 3): 15}


def level_budget_for(params: CkksParams, slots: int) -> tuple[int, int]:
    """Few slots: budget (2, 2) leaves 9 levels (vs 7 for (3, 3)), bootstraps faster and
    with smaller keys than (1, 1) (measurements: docs/results.md, "CKKS engine")."""
    return params.sparse_level_budget if slots < params.slots else params.level_budget


def data_level(params: CkksParams) -> int:
    """Level at which data is encrypted: where the refreshed model meets it (smaller files)."""
    return BOOTSTRAP_OUTPUT_LEVEL[tuple(params.sparse_level_budget)]


def setup_bootstrapping(context: ofhe.CryptoContext, params: CkksParams) -> None:
    """Public bootstrapping precomputation; must be redone in every process (not serialized)."""
    for slots in params.bootstrap_slots:
        context.EvalBootstrapSetup(list(level_budget_for(params, slots)), [0, 0], slots)
