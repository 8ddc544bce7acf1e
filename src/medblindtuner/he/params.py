"""CKKS parameter sets, defined once and shared by every role and artifact.

The production set is 128-bit secure (HE standard, ring dimension 2^16). The insecure test set
uses a tiny ring so tests run in seconds; it is only reachable by name (`INSECURE_TEST`) or with
an explicit `allow_insecure=True`, and every artifact records which set made it so that a
mismatch is refused on load.

Two refresh modes (`CkksParams.refresh`): "bootstrap" (the cloud bootstraps alone: bootstrap
depth and keys) and "hospital" (the key holder refreshes interactively, `he.refresh`: no
bootstrapping keys, depth = a step's levels + the protocol's headroom, and the smallest ring
that stays 128-bit for that modulus: `params_for_mode`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError


class ParameterError(MedBlindTunerError, ValueError):
    """Raised when CKKS parameters are unsafe or do not match an artifact."""


BOOTSTRAP = "bootstrap"  # the cloud bootstraps alone (bootstrapping keys in the bundle)
HOSPITAL = "hospital"  # the key holder refreshes interactively (he.refresh)
REFRESH_MODES = (HOSPITAL, BOOTSTRAP)

# Largest log2(Q) for 128-bit classic security per ring dimension (HE standard, ternary
# secret; OpenFHE's table); the key-switching primes count too, so OpenFHE may need the next
# ring: `params_for_mode` asks OpenFHE itself.
HE_STANDARD_128_MAX_BITS = {1 << 13: 218, 1 << 14: 438, 1 << 15: 881, 1 << 16: 1761,
                            1 << 17: 3524}


def min_secure_ring(modulus_bits: int) -> int:
    """Smallest ring dimension the HE standard allows for a modulus of this many bits."""
    for ring, bits in sorted(HE_STANDARD_128_MAX_BITS.items()):
        if modulus_bits <= bits:
            return ring
    raise ParameterError(f"no ring dimension is 128-bit secure for a {modulus_bits}-bit modulus")


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
    refresh: str = BOOTSTRAP  # who refreshes ciphertexts: BOOTSTRAP (cloud) or HOSPITAL
    # a joint (threshold) key of several hospitals (he.threshold); left out of `to_dict` when
    # False, so every one-key fingerprint and manifest stays as it was
    joint_key: bool = False

    @property
    def slots(self) -> int:
        """Full CKKS slot count (N/2): the layout of data ciphertexts."""
        return self.ring_dim // 2

    @property
    def is_secure(self) -> bool:
        """128-bit classic (HE standard) and a ring at least as large as the standard's
        table asks for this modulus (OpenFHE checks the same when it builds the context)."""
        return (self.security == "HEStd_128_classic"
                and self.ring_dim >= min_secure_ring(self.modulus_bits))

    @property
    def modulus_bits(self) -> int:
        """Bits of the ciphertext modulus Q (the key-switching primes come on top)."""
        return self.first_mod_bits + self.depth * self.scaling_bits

    @property
    def refreshed_by_hospital(self) -> bool:
        return self.refresh == HOSPITAL

    @property
    def refresh_headroom(self) -> int:
        """Levels a refresh input keeps (REFRESH_HEADROOM_LEVELS; one more under a joint key,
        JOINT_REFRESH_EXTRA_LEVELS)."""
        return REFRESH_HEADROOM_LEVELS + (JOINT_REFRESH_EXTRA_LEVELS if self.joint_key else 0)

    def with_bootstrap_slots(self, slots: tuple[int, ...]) -> CkksParams:
        """Same parameters with the sparse bootstrap slot counts a training plan needs (none
        when the hospital refreshes: no bootstrapping keys at all)."""
        values = asdict(self)
        values["bootstrap_slots"] = () if self.refreshed_by_hospital else tuple(sorted(set(slots)))
        values["level_budget"] = tuple(self.level_budget)
        values["sparse_level_budget"] = tuple(self.sparse_level_budget)
        return CkksParams(**values)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["level_budget"] = list(self.level_budget)
        data["sparse_level_budget"] = list(self.sparse_level_budget)
        data["bootstrap_slots"] = list(self.bootstrap_slots)
        if not self.joint_key:
            del data["joint_key"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CkksParams:
        values = dict(data)
        values["level_budget"] = tuple(values.get("level_budget", (3, 3)))
        values["sparse_level_budget"] = tuple(values.get("sparse_level_budget", (2, 2)))
        values["bootstrap_slots"] = tuple(values.get("bootstrap_slots", ()))
        values.setdefault("refresh", BOOTSTRAP)
        if values["refresh"] not in REFRESH_MODES:
            raise ParameterError(f"unknown refresh mode {values['refresh']!r} "
                                 f"(known: {', '.join(REFRESH_MODES)})")
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


# Levels a training step uses between two refreshes (cloud.trainer: 9 for both heads).
STEP_LEVELS = 9
# Interactive refresh (OpenFHE IntMPBoot*, FLEXIBLEAUTO): the input must keep at least 4 towers
# once its pending rescale is done, i.e. its effective level is at most depth - 3 (measured:
# tests/test_refresh.py; one tower fewer throws or, per environment-measurements.md, decrypts
# to garbage).
REFRESH_HEADROOM_LEVELS = 3
# Under a joint key of n >= 2 parties (he.joint_refresh) 3 towers decrypt to garbage for every
# n measured (2, 3, 5), 4 towers to ~1.3e-5: one level more (a joint refresh set has depth 13,
# still ring 2^15 at 128 bits with 45-bit scaling: benchmarks/joint_refresh_towers.py,
# docs/results.md).
JOINT_REFRESH_EXTRA_LEVELS = 1
# Scaling bits in hospital-refresh mode: 45 bits keep depth 12 (Q = 593 bits) inside ring 2^15
# with OpenFHE's key-switching primes; 46 bits already need ring 2^16 (measured with
# GenCryptoContext, docs/results.md).
REFRESH_SCALING_BITS = 45
REFRESH_FIRST_MOD_BITS = 53


def _refresh_params(name: str, security: str, ring_dim: int) -> CkksParams:
    return CkksParams(name=name, ring_dim=ring_dim, security=security,
                      scaling_bits=REFRESH_SCALING_BITS, first_mod_bits=REFRESH_FIRST_MOD_BITS,
                      depth=STEP_LEVELS + REFRESH_HEADROOM_LEVELS,
                      secret_key_dist="UNIFORM_TERNARY", refresh=HOSPITAL)


def smallest_openfhe_ring(params: CkksParams) -> int:
    """The ring dimension OpenFHE picks for `params`' modulus (and its key-switching primes)
    at 128-bit classic security when none is given: the smallest that stays secure."""
    cc_params = _context_parameters(params)
    cc_params.SetRingDim(0)
    return int(ofhe.GenCryptoContext(cc_params).GetRingDimension())


def params_for_mode(mode: str, insecure: bool = False) -> CkksParams:
    """The parameter set of a refresh mode: PRODUCTION (or INSECURE_TEST) for "bootstrap";
    for "hospital" depth STEP_LEVELS + REFRESH_HEADROOM_LEVELS, no bootstrapping, and the
    smallest ring OpenFHE accepts as 128-bit (2^15; the insecure set keeps ring 2^12)."""
    if mode not in REFRESH_MODES:
        raise ParameterError(f"unknown refresh mode {mode!r} (choose {' or '.join(REFRESH_MODES)})")
    if mode == BOOTSTRAP:
        return INSECURE_TEST if insecure else PRODUCTION
    if insecure:
        return _refresh_params("INSECURE-test-only-refresh", "HEStd_NotSet", 1 << 12)
    probe = _refresh_params("production-128-refresh", "HEStd_128_classic", 1 << 16)
    return _refresh_params(probe.name, probe.security, smallest_openfhe_ring(probe))


# The refresh mode used when none is given, one rule for every entry point (train-encrypted,
# experiments, the API local or remote, `hospital keygen`/`fetch`, the demo): the service
# relays refresh requests (docs/service.md, "Refresh requests"). HOSPITAL: binary N = 10,000,
# quiet, both modes in one run: 4.5x faster per sample-epoch with one sigmoid a step, 6.8x
# smaller bundle, 5.7x faster key generation (docs/results.md, "One sigmoid a step" and
# "Refresh by the key holder").
DEFAULT_REFRESH = HOSPITAL


def default_refresh() -> str:
    """The refresh mode used when none is given (`DEFAULT_REFRESH`, the same in one process
    and over the service)."""
    return DEFAULT_REFRESH


def require_secure(params: CkksParams, allow_insecure: bool = False) -> None:
    """Refuse insecure parameters unless the caller opted in explicitly."""
    if params.is_secure:
        return
    if not allow_insecure:
        raise ParameterError(
            f"CKKS parameter set {params.name!r} (ring {params.ring_dim}, {params.security}) is "
            "not 128-bit secure; it is only allowed with the explicit insecure test option."
        )


def _context_parameters(params: CkksParams) -> ofhe.CCParamsCKKSRNS:
    cc_params = ofhe.CCParamsCKKSRNS()
    cc_params.SetSecretKeyDist(getattr(ofhe, params.secret_key_dist))
    cc_params.SetSecurityLevel(getattr(ofhe, params.security))
    cc_params.SetRingDim(params.ring_dim)
    cc_params.SetScalingModSize(params.scaling_bits)
    cc_params.SetFirstModSize(params.first_mod_bits)
    cc_params.SetScalingTechnique(ofhe.FLEXIBLEAUTO)
    cc_params.SetMultiplicativeDepth(params.depth)
    return cc_params


def build_context(params: CkksParams) -> ofhe.CryptoContext:
    """Create the CryptoContext for `params` with every feature training needs enabled
    (hospital refresh: the interactive bootstrapping of OpenFHE's MULTIPARTY feature instead
    of FHE's bootstrapping)."""
    context = ofhe.GenCryptoContext(_context_parameters(params))
    last = ofhe.MULTIPARTY if params.refreshed_by_hospital else ofhe.FHE
    for feature in (ofhe.PKE, ofhe.KEYSWITCH, ofhe.LEVELEDSHE, ofhe.ADVANCEDSHE, last):
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
    """Level at which data is encrypted: where the refreshed model meets it (smaller files;
    a hospital refresh returns a ciphertext at level 0)."""
    if params.refreshed_by_hospital:
        return 0
    return BOOTSTRAP_OUTPUT_LEVEL[tuple(params.sparse_level_budget)]


def setup_bootstrapping(context: ofhe.CryptoContext, params: CkksParams) -> None:
    """Public bootstrapping precomputation; must be redone in every process (not serialized)."""
    for slots in params.bootstrap_slots:
        context.EvalBootstrapSetup(list(level_budget_for(params, slots)), [0, 0], slots)


# Largest log2(Q) the HE standard allows for 128-bit classical security with a ternary
# secret, per ring dimension (HomomorphicEncryption.org standard, table of OpenFHE's
# StdLatticeParm; Q·P must stay below it, so Q alone is a necessary condition).
MAX_LOG_Q_128 = {1 << 10: 27, 1 << 11: 54, 1 << 12: 109, 1 << 13: 218, 1 << 14: 438,
                 1 << 15: 881, 1 << 16: 1747, 1 << 17: 3523}


def _crypto_parameters_tree(context: ofhe.CryptoContext) -> dict:
    """OpenFHE's own JSON serialisation of a context: the Python bindings have no getters
    for the security level, the secret-key distribution or the modulus chain."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "context.json"
        if not ofhe.SerializeToFile(str(path), context, ofhe.JSON):
            raise ParameterError("the context cannot be re-serialised to read its parameters")
        return json.loads(path.read_text())


def _first_dict_with(tree: object, key: str) -> dict:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if key in node:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise ParameterError(f"the context's serialisation has no {key!r}")


def context_facts(context: ofhe.CryptoContext) -> dict:
    """What a (deserialised) context is, read from the context itself, never declared."""
    tree = _crypto_parameters_tree(context)
    crypto = _first_dict_with(tree, "slv")
    towers = _first_dict_with(_first_dict_with(tree, "elp")["elp"], "p")["p"]
    moduli = [int(_first_dict_with(t, "cm")["cm"]["v"]) for t in towers]
    return {
        "ring_dim": int(context.GetRingDimension()),
        "security": ofhe.SecurityLevel(int(crypto["slv"])).name,
        "secret_key_dist": ofhe.SecretKeyDist(int(crypto["mo"])).name,
        "depth": int(context.GetMultiplicativeDepth()),
        "scaling_bits": int(context.GetPlaintextModulus()),
        "scaling_technique": context.GetScalingTechnique().name,
        "tower_bits": [m.bit_length() for m in moduli],
        "log_q": sum(m.bit_length() for m in moduli),
    }


def context_mismatches(context: ofhe.CryptoContext, params: CkksParams) -> list[str]:
    """Every way the context differs from the declared `params` (empty: it is what it
    claims): ring, security level, key distribution, depth and modulus chain, scaling,
    and whether the declared bootstrapping level budgets fit its depth (none in refresh mode
    "hospital": nothing bootstraps)."""
    facts = context_facts(context)
    labels = {"ring_dim": "ring dimension", "security": "security level",
              "secret_key_dist": "secret-key distribution", "depth": "multiplicative depth",
              "scaling_bits": "scaling bits"}
    found = [f"{label} {facts[name]} (declared {getattr(params, name)})"
             for name, label in labels.items() if facts[name] != getattr(params, name)]
    if facts["scaling_technique"] != "FLEXIBLEAUTO":
        found.append(f"scaling technique {facts['scaling_technique']} (FLEXIBLEAUTO expected)")
    bits = facts["tower_bits"]
    if len(bits) != params.depth + 1:
        found.append(f"{len(bits)} moduli (declared depth {params.depth} needs "
                     f"{params.depth + 1})")
    if bits and abs(bits[0] - params.first_mod_bits) > 1:
        found.append(f"first modulus of {bits[0]} bits (declared {params.first_mod_bits})")
    if any(abs(b - params.scaling_bits) > 1 for b in bits[1:]):
        found.append(f"scaling moduli of {sorted(set(bits[1:]))} bits (declared "
                     f"{params.scaling_bits})")
    bound = MAX_LOG_Q_128.get(facts["ring_dim"], 0)
    if params.security == "HEStd_128_classic" and facts["log_q"] > bound:
        found.append(f"a {facts['log_q']}-bit modulus, beyond the {bound} bits of 128-bit "
                     f"security at ring {facts['ring_dim']}")
    dist = getattr(ofhe, params.secret_key_dist)
    budgets = {tuple(params.level_budget), tuple(params.sparse_level_budget)}
    for budget in () if params.refreshed_by_hospital else budgets:  # nothing bootstraps
        if tuple(budget) not in BOOTSTRAP_OUTPUT_LEVEL:
            found.append(f"bootstrapping level budget {list(budget)} (known: "
                         f"{sorted(BOOTSTRAP_OUTPUT_LEVEL)})")
        elif context.GetBootstrapDepth(list(budget), dist) >= facts["depth"]:
            found.append(f"bootstrapping level budget {list(budget)} needs more than the "
                         f"context's depth {facts['depth']}")
    return found
