"""Strict schemas of the manifests a client uploads, and the checks that run before parsing.

A manifest is the first thing an untrusted client sends, and everything else (file sizes,
the CKKS parameters the worker builds a context from, the plan it trains with) comes from
it. So the raw bytes are bounded before `json` sees them (size, nesting depth, digits of an
integer: Python's parser would otherwise spend seconds and memory on them, or raise a
`ValueError` nobody expects), and the parsed object is validated by pydantic models in strict
mode: a bool is not an int, a string is not a number, unknown fields are refused, and every
number that sizes work later (ring dimension, depth, epochs, batches, polynomial degrees) has a
range. Refusals are `CloudError`s: 413 for size, 422 for shape and values.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medblindtuner.formats import DECAY_FILE_NAME, dataset_file_name
from medblindtuner.service.errors import BadRequest, TooLarge, Unprocessable
from medblindtuner.service.limits import ServiceLimits
from medblindtuner.training.plan import TrainingPlan

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NON_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INTEGER = re.compile(rb"-?\d+")


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """True if the JSON text nests arrays/objects deeper than `limit` (strings skipped)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NON_BRACKETS)
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


def parse_json(raw: bytes, limits: ServiceLimits, what: str) -> Any:
    """JSON within the size, depth and integer-length limits; 413/422/400 otherwise."""
    if len(raw) > limits.max_manifest_bytes:
        raise TooLarge(f"{what} is {len(raw)} bytes; the limit is {limits.max_manifest_bytes}")
    if json_depth_exceeds(raw, limits.max_json_depth):
        raise Unprocessable(f"{what} nests deeper than {limits.max_json_depth} levels")

    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > limits.max_json_int_digits:
            raise Unprocessable(f"{what} holds an integer of {len(text)} digits; at most "
                                f"{limits.max_json_int_digits} are accepted")
        return int(text)

    def no_constant(name: str) -> float:
        raise Unprocessable(f"{what} holds {name}, which is not JSON")

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise Unprocessable(f"{what} holds a number out of range ({text[:20]}...)")
        return value

    try:
        return json.loads(raw, parse_int=bounded_int, parse_float=finite_float,
                          parse_constant=no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # e.g. a float literal of 10^6 digits
        raise Unprocessable(f"{what} could not be read: {str(exc)[:200]}") from exc


# ---- schemas ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=1, le=1 << 20)]


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class FileEntry(_Strict):
    """One listed file: its digest and size (zero-byte files are never a valid artifact)."""

    sha256: Sha256
    bytes: Annotated[int, Field(ge=1, le=1 << 50)]
    level: Annotated[int, Field(ge=0, le=128)] | None = None  # ciphertext files: information


class ParamsModel(_Strict):
    """CKKS parameters: what the worker builds a crypto context from, so all bounded."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    ring_dim: Annotated[int, Field(ge=1 << 10, le=1 << 17)]
    security: Literal["HEStd_128_classic", "HEStd_192_classic", "HEStd_256_classic",
                      "HEStd_NotSet"]
    scaling_bits: Annotated[int, Field(ge=20, le=60)]
    first_mod_bits: Annotated[int, Field(ge=20, le=60)]
    depth: Annotated[int, Field(ge=1, le=64)]
    level_budget: Annotated[list[Annotated[int, Field(ge=1, le=6)]],
                            Field(min_length=2, max_length=2)]
    sparse_level_budget: Annotated[list[Annotated[int, Field(ge=1, le=6)]],
                                   Field(min_length=2, max_length=2)]
    secret_key_dist: Literal["UNIFORM_TERNARY", "SPARSE_TERNARY", "SPARSE_ENCAPSULATED"]
    bootstrap_slots: Annotated[list[Annotated[int, Field(ge=1, le=1 << 16)]],
                               Field(max_length=8)]
    refresh: Literal["bootstrap", "hospital"] = "bootstrap"

    @field_validator("ring_dim")
    @classmethod
    def _ring_power_of_two(cls, value: int) -> int:
        if not _power_of_two(value):
            raise ValueError("the ring dimension must be a power of two")
        return value

    @field_validator("bootstrap_slots")
    @classmethod
    def _slots_power_of_two(cls, value: list[int]) -> list[int]:
        if not all(_power_of_two(v) for v in value):
            raise ValueError("bootstrap slot counts must be powers of two")
        return value


class BundleManifest(_Strict):
    format: str
    params: ParamsModel
    params_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    rotation_indices: Annotated[list[Annotated[int, Field(ge=-(1 << 17), le=1 << 17)]],
                                Field(max_length=4096)] = []
    # the step kernel's rotations, whose keys `shard_keys.bin` holds (Ray shard actors)
    shard_rotation_indices: Annotated[list[Annotated[int, Field(ge=-(1 << 17), le=1 << 17)]],
                                      Field(max_length=4096)] = []
    files: dict[str, FileEntry]


class TrainConfigModel(_Strict):
    learning_rate: Annotated[float, Field(gt=0, le=1e6)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1, le=1 << 20)]
    patience: Annotated[int, Field(ge=1, le=10_000)]
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)]
    weight_decay: Annotated[float, Field(ge=0, le=1e6)]
    preconditioned: bool = False


class ApproxModel(BaseModel):
    """One polynomial approximation; its degree sizes the worker's evaluation."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    degree: Annotated[int, Field(ge=1, le=255)]


class ActivationModel(_Strict):
    n_classes: Annotated[int, Field(ge=2, le=1024)]
    logit_bound: Annotated[float, Field(gt=0, le=1e4)]
    sum_bound: Annotated[float, Field(gt=0, le=1e9)] | None = None
    exp_saturated: bool = False  # softmax: the saturating exponential (training.approx)
    sigmoid: ApproxModel | None = None
    exp: ApproxModel | None = None
    inverse: ApproxModel | None = None


class PlanModel(_Strict):
    n_classes: Annotated[int, Field(ge=2, le=1024)]
    n_features: Annotated[int, Field(ge=1, le=1 << 16)]
    slots: Annotated[int, Field(ge=1, le=1 << 16)]
    config: TrainConfigModel
    activation: ActivationModel
    train_batch_sizes: Annotated[list[Count], Field(min_length=1)]
    val_batch_sizes: list[Count]
    denominator_chunks: Annotated[int, Field(ge=1, le=1024)] | None = None
    compact_sigmoid: bool = False  # binary head, refresh mode: one sigmoid a step
    compact_softmax: bool = False  # softmax head, refresh mode: one exponential a step


class DatasetManifest(_Strict):
    format: str
    params_fingerprint: str
    plan: PlanModel
    files: dict[str, FileEntry]


class QueriesManifest(_Strict):
    format: str
    params_fingerprint: str
    sizes: Annotated[list[Count], Field(min_length=1)]
    files: dict[str, FileEntry]


SCHEMAS: dict[str, type[_Strict]] = {"bundle": BundleManifest, "dataset": DatasetManifest,
                                     "queries": QueriesManifest}


def validate_manifest(data: Any, schema: str, limits: ServiceLimits, what: str) -> _Strict:
    """The manifest as its schema's model; 422 with the first problems otherwise."""
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise Unprocessable(f"{what} must be a JSON object with a 'files' object")
    if len(data["files"]) > limits.max_files_per_artifact:
        raise TooLarge(f"{what} lists {len(data['files'])} files; the limit is "
                       f"{limits.max_files_per_artifact}")
    try:
        model = SCHEMAS[schema].model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(root)'}: {error['msg']}"
            for error in exc.errors()[:5])
        raise Unprocessable(f"{what} does not fit its schema: {problems}") from exc
    if isinstance(model, DatasetManifest):
        _check_plan_bounds(model.plan, limits, what)
    return model


def _check_plan_bounds(plan: PlanModel, limits: ServiceLimits, what: str) -> None:
    """The numbers that size the worker's work, against the service's limits."""
    if plan.config.epochs > limits.max_epochs:
        raise Unprocessable(f"{what}: {plan.config.epochs} epochs; the limit is "
                            f"{limits.max_epochs}")
    for field in ("train_batch_sizes", "val_batch_sizes"):
        if len(getattr(plan, field)) > limits.max_batches:
            raise Unprocessable(f"{what}: {len(getattr(plan, field))} {field}; the limit is "
                                f"{limits.max_batches}")
    if plan.activation.n_classes != plan.n_classes:
        raise Unprocessable(f"{what}: the activation is for {plan.activation.n_classes} "
                            f"classes, the plan for {plan.n_classes}")
    if plan.compact_sigmoid and plan.n_classes != 2:
        raise Unprocessable(f"{what}: compact_sigmoid is for a binary head, the plan has "
                            f"{plan.n_classes} classes")
    if plan.compact_softmax and plan.n_classes == 2:
        raise Unprocessable(f"{what}: compact_softmax is for a softmax head, the plan has "
                            "2 classes")


def dataset_files(plan: TrainingPlan) -> set[str]:
    """The exact file set of an encrypted dataset made for `plan` (what the hospital saves)."""
    kinds = ["x_dup", "x_grad"] + [f"y{j}" for j in range(plan.label_cts)]
    return {dataset_file_name(split, index, kind)
            for split, count in (("train", len(plan.train_chunk_sizes)),
                                 ("val", len(plan.val_batch_sizes)))
            for index in range(count) for kind in kinds} | (
        {DECAY_FILE_NAME} if plan.config.preconditioned else set())
