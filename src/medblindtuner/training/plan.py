"""The public plan of a training job: fixed by the hospital, shared with the cloud.

Everything in it is public (batch sizes, schedule, layout, approximations); it travels inside
the encrypted dataset's manifest. `check_ranges` is the hospital's proof, on the plaintext
mirror, that the encrypted polynomials stay inside their intervals.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np

from medblindtuner.he.packing import PackingLayout, SoftmaxLayout, next_power_of_two
from medblindtuner.he.params import CkksParams, data_level
from medblindtuner.he.refresh import max_refresh_level
from medblindtuner.training.approx import ActivationPlan, RangeError
from medblindtuner.training.plain import (
    TrainConfig,
    make_batches,
    n_weight_rows,
    train_head,
)

# The hospital refuses a plan whose mirror logits pass this share of the approximation interval.
RANGE_MARGIN = 0.9
# A step's transient ciphertexts grow with its chunks (a softmax keeps C exponentials each):
# at most 32 data ciphertexts' worth of ring 2^16 (2^15 slots) a step, in slots, so a smaller
# ring (refresh mode: 2^15, ciphertexts half the size) takes as many samples a step (a cap in
# chunks halved RetinaMNIST "moderate or worse" steps at PCA 1023 to 256 samples: -1.25 ACC
# against -0.75 at 512, docs/results.md).
MAX_STEP_SLOTS = 32 << 15
# Most slots of a softmax denominator bootstrap: OpenFHE's bootstrap precomputation and keys
# grow with the slot count (docs/results.md), so a step's chunks share bootstraps in groups
# whose folded denominators fit this many slots, however many chunks the step has.
MAX_DENOMINATOR_SLOTS = 2048


@dataclass
class Decision:
    """The hospital's answer after reading one epoch's validation loss."""

    continue_training: bool
    best_epoch: int


def split_into_chunks(n_samples: int, per_chunk: int) -> list[int]:
    """Consecutive chunks of `per_chunk` samples and a last, shorter one (the mirror's range
    check walks the logit slots in the same pieces)."""
    return [min(per_chunk, n_samples - start) for start in range(0, n_samples, per_chunk)]


def max_batch_size(layout: PackingLayout, n_classes: int) -> int:
    """Largest batch one step takes."""
    return max(1, MAX_STEP_SLOTS // layout.slots) * layout.samples_per_ct


def denominator_group_chunks(layout: PackingLayout, chunks_per_step: int) -> int:
    """Chunks per softmax denominator bootstrap: all of a step's, up to what one bootstrap of
    at most MAX_DENOMINATOR_SLOTS slots (and at most half the slots) holds, two per compact
    period; at least one."""
    fitting = max(1, 2 * (MAX_DENOMINATOR_SLOTS // SoftmaxLayout.compact_period_of(layout)))
    return max(1, min(chunks_per_step, SoftmaxLayout.max_chunks(layout), fitting))


# Levels a step with one sigmoid spends from its model to the refresh of the gathered logits:
# the look-ahead, the product with x_dup and the chunk's window mask (`cloud.trainer`).
COMPACT_FORWARD_LEVELS = 3
# The same for one exponential a step (softmax): the diagonals, the product with x_dup, the
# chunk's window mask and the mask to the logits' slots.
SOFTMAX_GATHER_LEVELS = 4


def compact_sigmoid_fits(layout: PackingLayout, chunks_per_step: int) -> bool:
    """Whether a binary step's logits fit one ciphertext: a window of slots per chunk in the
    first half of each block (`TrainingPlan.compact_period`), a block of at least 2 slots,
    and more than one chunk (one chunk has one sigmoid anyway: a second refresh would not
    pay)."""
    return 2 <= layout.block and 2 <= chunks_per_step <= layout.block


def compact_softmax_group(layout: PackingLayout, n_classes: int, chunks_per_step: int) -> int:
    """Chunks whose logits one exponential a step gathers into one ciphertext: a step's
    chunks, at most d / C of them (C classes padded to a power of two, each chunk's C places
    in a block's first half); a step with more has several such groups. 0: C > d."""
    return min(layout.block // next_power_of_two(n_classes), chunks_per_step)


def compact_softmax_period(layout: PackingLayout, n_classes: int, chunks_per_step: int) -> int:
    """r for one exponential a step: logit q = p C + k (chunk p of its group, diagonal k)
    owns slots q r .. q r + r - 1 of each block's first half (`compact_softmax_group`);
    0 when C > d."""
    group = compact_softmax_group(layout, n_classes, chunks_per_step)
    places = next_power_of_two(n_classes) * next_power_of_two(group)
    return layout.block // places if group else 0


def compact_softmax_levels(activation: ActivationPlan, cyclic: bool) -> tuple[int, int, int]:
    """Levels one exponential a step spends (`cloud.trainer`) after the logits' refresh, after
    the denominators' refresh, and where the probabilities are formed (counted from a
    refresh): the exponential's or the inverse's series, then the probabilities (one
    product), the chunk's window mask, x_grad, and the diagonals' gather masks unless the
    classes are a power of two; the exponentials also meet the sums' selection mask."""
    probabilities = max(activation.exp.unit_depth, activation.inverse.unit_depth) + 1
    tail = probabilities + 2 + (0 if cyclic else 1)
    return max(tail, activation.exp.unit_depth + 1), tail, probabilities


@dataclass(frozen=True)
class ChunkLevels:
    """Levels at which a chunk's ciphertexts are encrypted (`TrainingPlan.train_chunk_levels`)."""

    x_dup: int
    x_grad: int
    labels: int

    @classmethod
    def uniform(cls, level: int) -> ChunkLevels:
        return cls(level, level, level)


@dataclass(frozen=True)
class TrainingPlan:
    """Everything public about a training job: fixed by the hospital, shared with the cloud."""

    n_classes: int
    n_features: int  # incl. bias
    slots: int
    config: TrainConfig
    activation: ActivationPlan
    train_batch_sizes: tuple[int, ...]
    val_batch_sizes: tuple[int, ...]
    # softmax: chunks per denominator bootstrap (None: `denominator_group_chunks`)
    denominator_chunks: int | None = None
    # binary head, hospital refresh: a step's logits are gathered into one ciphertext that the
    # key holder refreshes, so the sigmoid runs once a step, not once a chunk (`cloud.trainer`)
    compact_sigmoid: bool = False
    # softmax head, hospital refresh: a step's logits of every chunk and class are gathered
    # into one ciphertext, so the exponential (and the inverse) runs once a step
    # (`cloud.trainer`, docs/design.md "One exponential a step")
    compact_softmax: bool = False

    @property
    def layout(self) -> PackingLayout:
        return PackingLayout(self.slots, self.n_features)

    @property
    def rows(self) -> int:
        return n_weight_rows(self.n_classes)

    @property
    def softmax_layout(self) -> SoftmaxLayout | None:
        """Class-rotation layout of a softmax head (None for a binary head)."""
        if self.activation.binary:
            return None
        group = self.denominator_chunks or denominator_group_chunks(self.layout,
                                                                    self.chunks_per_step)
        return SoftmaxLayout(self.layout, self.n_classes, min(group, self.chunks_per_step))

    # ---- batches and their chunks ---------------------------------------------------------
    def chunk_sizes(self, batch_size: int) -> list[int]:
        """A batch's data ciphertexts ("chunks"): consecutive full ones, then the rest."""
        return split_into_chunks(batch_size, self.layout.samples_per_ct)

    @property
    def chunks_per_step(self) -> int:
        return max(len(self.chunk_sizes(n)) for n in self.train_batch_sizes)

    @property
    def train_chunk_sizes(self) -> list[int]:
        """Samples in each training chunk, in file order (batch by batch)."""
        return [c for n in self.train_batch_sizes for c in self.chunk_sizes(n)]

    @property
    def n_chunks(self) -> int:
        """Data ciphertexts the hospital encrypts: every training and validation chunk."""
        return len(self.train_chunk_sizes) + len(self.val_batch_sizes)

    def batch_chunks(self, batch: int) -> list[int]:
        """File indices of the chunks of training batch `batch`."""
        start = sum(len(self.chunk_sizes(n)) for n in self.train_batch_sizes[:batch])
        return list(range(start, start + len(self.chunk_sizes(self.train_batch_sizes[batch]))))

    def train_chunk_levels(self, params: CkksParams, base: int | None = None) -> ChunkLevels:
        """Level of each of a training chunk's ciphertexts: where the step first meets it
        (fewer towers to upload, hold and multiply; encrypted = mirror either way).

        With one sigmoid a step in refresh mode, all where the look-ahead of the model, dropped
        `COMPACT_FORWARD_LEVELS` below the refreshable top (`cloud.trainer`), meets them.
        Otherwise x_dup one level above `base` (the look-ahead) in the logit products, x_grad
        at the probabilities (binary: look-ahead, logit product, the sigmoid's series;
        softmax: where the spread inverse is, from a refreshed denominator: its series and
        the unfold mask), the labels one level before them (times the step size, one
        level). `base`: where a fresh model meets the data
        (`he.params.data_level` unless given: a joint key's is
        `he.threshold.joint_data_level`); validation chunks stay there."""
        if self.compact_sigmoid and params.refreshed_by_hospital:
            return ChunkLevels.uniform(max_refresh_level(params) - COMPACT_FORWARD_LEVELS + 1)
        if self.compact_softmax and params.refreshed_by_hospital:
            probabilities = compact_softmax_levels(self.activation,
                                                   self.softmax_layout.cyclic)[2]
            return ChunkLevels(x_dup=max_refresh_level(params) - SOFTMAX_GATHER_LEVELS + 1,
                               x_grad=probabilities + 1, labels=probabilities - 1)
        base = data_level(params) if base is None else base
        if self.activation.binary:
            probabilities = base + 2 + self.activation.sigmoid.unit_depth
        else:  # x_grad meets the spread inverse: the refresh, the series, the unfold mask
            probabilities = base + self.activation.inverse.unit_depth + 1
        return ChunkLevels(x_dup=base + 1, x_grad=probabilities, labels=probabilities - 1)

    @property
    def compact_period(self) -> int:
        """r: with one sigmoid a step (`compact_sigmoid`), chunk p of a step owns slots
        p r .. p r + r - 1 of each block's first half, r = d / (chunks a step rounded up to a
        power of two). A chunk sums its logits' products over strides r .. d/2 alone
        (log2(d / r) rotations), the step adds the last r slots once for all its chunks, and
        the way back mirrors it (`cloud.kernel.StepKernel.binary_forward`)."""
        return self.layout.block // next_power_of_two(self.chunks_per_step)

    @property
    def softmax_period(self) -> int:
        """r of one exponential a step (`compact_softmax_period`)."""
        return compact_softmax_period(self.layout, self.n_classes, self.chunks_per_step)

    @property
    def softmax_group(self) -> int:
        """Chunks of a step gathered into one ciphertext (`compact_softmax_group`)."""
        return compact_softmax_group(self.layout, self.n_classes, self.chunks_per_step)

    @property
    def validation_group(self) -> int:
        """Validation chunks gathered into one ciphertext at the step's r (the same keys)."""
        r = self.softmax_period
        return self.layout.block // (next_power_of_two(self.n_classes) * r) if r else 0

    @property
    def bootstrap_slots(self) -> tuple[int, ...]:
        softmax = self.softmax_layout
        if softmax is None:
            return (self.layout.block,)
        return (softmax.bootstrap_period,)

    @property
    def refreshes_per_step(self) -> int:
        """Refreshes (bootstraps) of one training step: the model's, and for a softmax head
        one per denominator group (one exponential a step: the gathered logits' and their
        denominators'), for a compact sigmoid the gathered logits'."""
        softmax = self.softmax_layout
        if softmax is None:
            return 2 if self.compact_sigmoid else 1
        if self.compact_softmax:  # the model's, and two for each gathered group of chunks
            return 1 + 2 * -(-self.chunks_per_step // self.softmax_group)
        return 1 + -(-self.chunks_per_step // softmax.chunks)

    @property
    def max_refreshes(self) -> int:
        """Most refreshes the whole job may ask for: every step's, and for a softmax head one
        per validation chunk and epoch (chunks that ride in a step's group need fewer; two
        per gathered group with `compact_validation`). The key holder answers no refresh beyond
        it (`hospital.refresher`)."""
        steps = self.config.epochs * len(self.train_batch_sizes)
        validation = 0 if self.softmax_layout is None else len(self.val_batch_sizes)
        if self.compact_validation:
            validation = 2 * -(-len(self.val_batch_sizes) // self.validation_group)
        return steps * self.refreshes_per_step + self.config.epochs * validation

    @property
    def compact_validation(self) -> bool:
        """With one exponential a step, the validation loss takes one exponential and one
        inverse per `validation_group` chunks (`cloud.compact`)."""
        return self.compact_softmax and bool(self.val_batch_sizes)

    def job_tag(self, params: CkksParams) -> str:
        """Public name of this plan under these parameters: a refresh request carries it, and
        the key holder refuses one made for another job."""
        blob = json.dumps({"plan": self.to_dict(), "params": params.fingerprint()},
                          sort_keys=True, default=float).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def rotation_indices(self) -> list[int]:
        """Every rotation the cloud's training uses (the driver's and the kernels')."""
        softmax = self.softmax_layout
        extra = [] if softmax is None else softmax.driver_rotation_indices(
            validation_rides=not self.compact_softmax)
        if self.compact_softmax:  # the inverse's spread over a chunk's classes (rightwards)
            r = self.softmax_period
            extra = extra + [-s for s in self.layout.strides_from(r, r * softmax.class_slots // 2)]
        return sorted(set(self.layout.rotation_indices + extra))

    @property
    def kernel_rotation_indices(self) -> list[int]:
        """The rotations of `cloud.kernel.StepKernel` alone: the keys a shard worker gets
        (the driver's gradient sums, fold, period sums and bootstraps stay with the driver)."""
        softmax = self.softmax_layout
        extra = softmax.kernel_rotation_indices if softmax is not None else []
        if self.compact_sigmoid:  # the way back spreads over the whole block (d)
            extra = [self.layout.block]
        return sorted(set(self.layout.logit_strides + extra))

    def label_vectors(self, targets: np.ndarray) -> list[np.ndarray]:
        """Slot vectors of one batch's labels: one (binary) or one per class diagonal."""
        softmax = self.softmax_layout
        if softmax is None:
            return [self.layout.encode_per_sample(targets[:, 0])]
        return softmax.encode_labels(targets)

    @property
    def label_cts(self) -> int:
        softmax = self.softmax_layout
        return 1 if softmax is None else softmax.n_classes

    def batch_hint(self) -> str | None:
        """Advice when the batch leaves data ciphertexts part-empty: a step's bootstraps cost
        the same whatever its batch fills, so full ciphertexts are cheaper per sample
        (measurements: docs/results.md)."""
        full = self.layout.samples_per_ct
        if self.config.batch_size >= full or len(self.train_batch_sizes) < 2:
            return None
        return (f"batches of {self.config.batch_size} fill {self.config.batch_size / full:.0%} "
                f"of a ciphertext ({full} samples at {self.n_features} features): a step "
                f"over {full} or a multiple of it costs less per sample")

    def padding_loss(self, n_padding: int) -> float:
        """Brier contribution of all-zero padding samples (public; subtracted by the hospital)."""
        probs = self.activation.probabilities(np.zeros((1, self.rows)))
        return float(n_padding * np.sum(probs**2))

    def to_dict(self) -> dict:
        return {
            "n_classes": self.n_classes,
            "n_features": self.n_features,
            "slots": self.slots,
            "config": self.config.to_dict(),
            "activation": self.activation.to_dict(),
            "train_batch_sizes": list(self.train_batch_sizes),
            "val_batch_sizes": list(self.val_batch_sizes),
            "denominator_chunks": self.denominator_chunks,
            "compact_sigmoid": self.compact_sigmoid,
            "compact_softmax": self.compact_softmax,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TrainingPlan:
        return cls(
            n_classes=int(data["n_classes"]),
            n_features=int(data["n_features"]),
            slots=int(data["slots"]),
            config=TrainConfig(**data["config"]),
            activation=ActivationPlan.from_dict(data["activation"]),
            train_batch_sizes=tuple(data["train_batch_sizes"]),
            val_batch_sizes=tuple(data["val_batch_sizes"]),
            denominator_chunks=(None if data.get("denominator_chunks") is None
                                else int(data["denominator_chunks"])),
            compact_sigmoid=bool(data.get("compact_sigmoid", False)),
            compact_softmax=bool(data.get("compact_softmax", False)),
        )

    @classmethod
    def create(
        cls,
        params: CkksParams,
        x_train: np.ndarray,
        x_val: np.ndarray,
        n_classes: int,
        config: TrainConfig,
        activation: ActivationPlan | None = None,
        denominator_chunks: int | None = None,
    ) -> TrainingPlan:
        """`denominator_chunks` (softmax): chunks per denominator bootstrap; by default
        `denominator_group_chunks`, written into the plan so every role uses the same."""
        layout = PackingLayout(params.slots, x_train.shape[1])
        config = config.checked()
        batch = min(config.batch_size, max_batch_size(layout, n_classes))
        if batch != config.batch_size:
            config = TrainConfig(**{**config.to_dict(), "batch_size": batch})
        train_sizes = tuple(len(b) for b in make_batches(len(x_train), batch, config.seed))
        val_sizes = tuple(
            min(layout.samples_per_ct, len(x_val) - i)
            for i in range(0, len(x_val), layout.samples_per_ct)
        )
        plan = cls(
            n_classes=n_classes,
            n_features=x_train.shape[1],
            slots=params.slots,
            config=config,
            activation=activation or ActivationPlan.default(n_classes),
            train_batch_sizes=train_sizes,
            val_batch_sizes=val_sizes,
            denominator_chunks=denominator_chunks,
        )
        if n_classes == 2 and params.refreshed_by_hospital:
            plan = replace(plan, compact_sigmoid=compact_sigmoid_fits(layout,
                                                                      plan.chunks_per_step))
        if n_classes > 2 and denominator_chunks is None:
            plan = replace(plan, denominator_chunks=denominator_group_chunks(
                layout, plan.chunks_per_step))
        if n_classes > 2 and params.refreshed_by_hospital:
            plan = replace(plan, compact_softmax=plan.compact_softmax_fits(params))
        return plan

    def compact_softmax_fits(self, params: CkksParams) -> bool:
        """Whether one exponential a step fits: a chunk's C places in a block's first half
        (`softmax_period`) and its levels between refreshes (`compact_softmax_levels`)."""
        softmax = self.softmax_layout
        if softmax is None or not params.refreshed_by_hospital or not self.softmax_period:
            return False
        top = max_refresh_level(params)
        after_logits, after_sums, _ = compact_softmax_levels(self.activation, softmax.cyclic)
        return max(after_logits, after_sums, SOFTMAX_GATHER_LEVELS) <= top

    def check_ranges(self, x_train, y_train, x_val, y_val, margin: float = RANGE_MARGIN):
        """Hospital-side check with the mirror: logits stay inside the approximation interval.

        The encrypted run equals the mirror up to CKKS noise, so if the mirror's logits (and
        softmax sums) stay inside the fitted intervals, so do the encrypted ones.
        """
        mirror = train_head(x_train, y_train, x_val, y_val, self.n_classes, self.config,
                            activation=self.activation, layout=self.layout)
        bound = margin * self.activation.logit_bound
        if mirror.max_abs_logit > bound:
            raise RangeError(
                f"logits reach {mirror.max_abs_logit:.2f} but the approximations are fitted on "
                f"[-{self.activation.logit_bound}, {self.activation.logit_bound}] (margin "
                f"{margin}): lower the learning rate/epochs or raise the logit bound"
            )
        if not self.activation.binary:
            inverse = self.activation.inverse
            if mirror.max_softmax_sum > inverse.b or mirror.min_softmax_sum < inverse.a:
                raise RangeError(
                    f"softmax sums span [{mirror.min_softmax_sum:.3f}, "
                    f"{mirror.max_softmax_sum:.3f}], outside [{inverse.a:.3f}, {inverse.b:.3f}]"
                )
        return mirror
