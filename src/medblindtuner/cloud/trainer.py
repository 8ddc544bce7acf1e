"""Encrypted training of the classifier head on the cloud: CKKS ciphertexts only.

`EncryptedTrainer` runs Nesterov steps with only a public bundle loaded, on the dataset the
hospital encrypted once (`training.artifacts`, `hospital.crypto`) under a public plan
(`training.plan`); the one interactive bit per epoch is the hospital's answer to the
encrypted validation loss.

A step's batch is one or more data ciphertexts ("chunks"); their arithmetic runs in
`cloud.kernel.StepKernel` (here, or on Ray actors holding the chunks: `Shards`), and the
driver below adds their partial results, bootstraps and updates the model, so a step costs its
bootstraps once whatever the number of chunks. Levels are counted from a sparse (2, 2)
bootstrap, which leaves 9 (see `he.params`).

Binary head (model = [W, W_prev], each d-periodic; ONE d-slot bootstrap per step):
    V = (1+m) W - m W_prev                    1
    Z = rotsum(x_dup * V)                     2   log2(d) rotations
    A = (lr/n) sigmoid~(Z)                    8   degree 59 on [-1, 1] (V carries its map)
    G = rotsum(sum over chunks of (A - (lr/n) Y) * x_grad)    9   log2(slots/d) rotations
    W_new = (1 - lr wd) V - G  -> d-slot bootstrap  (the decay is a second combination of
                                                 the model, level 1: no extra level)
In refresh mode "hospital" with several chunks a step (`TrainingPlan.compact_sigmoid`) the
logits are gathered and refreshed and the sigmoid runs once a step (`_compact_terms`;
docs/design.md, "One sigmoid a step").

c-class softmax (model = [M, M_prev] in the class-diagonal layout of `he.packing.SoftmaxLayout`,
c diagonals; sparse bootstraps per step: the model's and one per denominator group, whatever c):
    W_k = diagonal k of a (1+m) M - a m M_prev, k < c        1   a: exp's unit map; masks
    Z_k = rotsum(x_dup * W_k)                               2   sample i sees class_of(i, k)
    e_k = exp~(Z_k); S = sum_k e_k                          6   degree 13 on [-1, 1] (7: the
                                                                saturating exp, degree 27)
    compact = fold(sum_j rot(S_j * b select, -s_j))         7   b: inverse's unit map;
                                                                s_j: place j's shift
    inv_j = rot(inverse~(compact + beta), s_j - d)          5   degree 27 on [-1, 1]
    P_j = spread(inv_j * (lr/n) unfold) * x_grad_j          7
    T_k = sum_j e_jk * P_j - ((lr/n) Y_jk) * x_grad_j       8
    G = periodsum(gather(T_k))                              9   masks (c < C); b -> block b
    M_new = V - (G + rot(G, -d))  -> bootstrap               9
The previous epoch's validation chunk rides in the first step's last denominator bootstrap
when that group leaves its last place free (`step_and_validate`), so it needs no bootstrap of
its own.
Measured costs per step are in docs/results.md.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import openfhe as ofhe

from medblindtuner.cloud.compact import CompactSoftmax
from medblindtuner.cloud.kernel import PlacedChunk, StepKernel
from medblindtuner.failpoints import failpoint
from medblindtuner.he.ciphertexts import (
    atomic_write_json,
    load_ciphertext,
    replace_dir,
    save_ciphertext,
)
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import BundleError
from medblindtuner.he.packing import next_power_of_two
from medblindtuner.training.artifacts import EncryptedChunk, EncryptedDataset
from medblindtuner.training.plain import epoch_batch_order
from medblindtuner.training.plan import (
    COMPACT_FORWARD_LEVELS,
    SOFTMAX_GATHER_LEVELS,
    Decision,
)


class Shards(Protocol):
    """Who computes a step's chunks: the local `StepKernel`, or actors on a cluster holding
    the chunks (same methods, same results)."""

    def binary_terms(self, lookahead: ofhe.Ciphertext, placed: Sequence[PlacedChunk],
                     scale: float) -> ofhe.Ciphertext: ...

    def binary_forward(self, lookahead: ofhe.Ciphertext,
                       placed: Sequence[PlacedChunk]) -> ofhe.Ciphertext: ...

    def binary_backward(self, probabilities: ofhe.Ciphertext, placed: Sequence[PlacedChunk],
                        scale: float) -> ofhe.Ciphertext: ...

    def softmax_forward(self, model: Sequence[ofhe.Ciphertext], weights: Sequence[float],
                        placed: Sequence[PlacedChunk]) -> dict[int, ofhe.Ciphertext]: ...

    def softmax_backward(self, inverses: dict[int, ofhe.Ciphertext],
                         scale: float) -> ofhe.Ciphertext: ...

    def softmax_gather(self, model: Sequence[ofhe.Ciphertext], weights: Sequence[float],
                       placed: Sequence[PlacedChunk]) -> dict[int, ofhe.Ciphertext]: ...

    def softmax_scatter(self, deltas: dict[int, ofhe.Ciphertext],
                        placed: Sequence[PlacedChunk], scale: float) -> ofhe.Ciphertext: ...


@dataclass
class EncryptedState:
    epoch: int = 0
    steps: int = 0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    stopped: bool = False
    wall_time_s: float = 0.0
    # the last epoch's validation rides in the next step's denominator bootstrap (softmax)
    validation_pending: bool = False


class EncryptedTrainer:
    """Cloud-side trainer. Needs only an evaluation context (public bundle) and ciphertexts."""

    def __init__(self, evaluator: Evaluator, dataset: EncryptedDataset, checkpoint_dir: Path,
                 shards: Shards | None = None):
        self.ev = evaluator
        if dataset.plan.config.preconditioned and dataset.decay is None:
            raise ValueError("a preconditioned plan's dataset must carry its feature decay")
        self.data = dataset.adopted(evaluator.adopt)  # ciphertexts read from disk: see adopt
        self.plan = dataset.plan
        # the driver's own kernel (validation, masks); `shards` computes the batches' chunks
        self.kernel = StepKernel(evaluator, self.plan, self.data.train)
        self.shards: Shards = shards or self.kernel
        self.layout = dataset.plan.layout
        self.softmax = dataset.plan.softmax_layout
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.state = EncryptedState()
        self.compact = CompactSoftmax(evaluator, self.kernel) if self.softmax else None
        # [W, W_prev]: d-periodic weight rows (binary) or class-diagonal model cts (softmax)
        self.model: list[ofhe.Ciphertext] = []

    # ---- model layout -------------------------------------------------------------------------
    def rows(self, model: list[ofhe.Ciphertext]) -> list[ofhe.Ciphertext]:
        """The d-periodic weight rows the hospital decrypts and inference uses (softmax: one
        mask and log2(C) rotations per row, one level)."""
        if self.softmax is None:
            return [model[0]]
        return [
            self.ev.rotate_and_sum(
                self.kernel.masked(model[0], ("row", j), lambda j=j: self.softmax.row_mask(j)),
                self.softmax.row_strides)
            for j in range(self.plan.n_classes)
        ]

    @property
    def weights(self) -> list[ofhe.Ciphertext]:
        """Current encrypted weight rows (d-periodic), as returned to the hospital."""
        return self.rows(self.model)

    def _zero_model(self) -> list[ofhe.Ciphertext]:
        """Encrypted zeros derived from a data ciphertext (x - x): no key needed, and no level
        spent, so the first step starts where a refreshed model does (a hospital refresh
        leaves no spare level). A validation chunk's: training chunks' ciphertexts sit at
        the levels the step meets them, above it (`TrainingPlan.train_chunk_levels`)."""
        x = (self.data.val or self.data.train)[0].x_grad
        zero = self.ev.sub(x, x)
        return [zero, zero.Clone()]

    # ---- the step ---------------------------------------------------------------------------
    def _refresh_inverse(self, compact: ofhe.Ciphertext) -> ofhe.Ciphertext:
        """Fold a group's compact denominators, bootstrap them once, invert (softmax)."""
        softmax, inverse = self.softmax, self.plan.activation.inverse
        folded = self.ev.rotate_and_sum(compact, softmax.fold_strides)
        fresh = self.ev.bootstrap(folded, period=softmax.bootstrap_period)
        unit = self.ev.add_scalar(fresh, inverse.unit_map[1])  # alpha came with the selection
        return self.ev.chebyshev_unit(unit, inverse.coefficients)

    def _compact_terms(self, placed: list[PlacedChunk], scale: float) -> ofhe.Ciphertext:
        """Binary terms with ONE sigmoid a step (`TrainingPlan.compact_sigmoid`): the chunks'
        gathered partial logits are summed over their last r slots once for the step
        (`TrainingPlan.compact_period`) and refreshed, then masked to the logits' slots (the
        partial sums between them could leave the sigmoid's interval); the odd part of the
        sigmoid (zero off the logits) runs once, and its output, moved right by d (the
        gradient strides add up to slots - d: no key of its own) and summed over the same r
        slots, goes back to the chunks. Each half starts as high as its levels allow (fewer
        towers): the refresh leaves the mask, the sigmoid, the chunks' mask and product."""
        m, top = self.plan.config.momentum, self.ev.max_level
        r = self.plan.compact_period
        shared = self.layout.strides_from(1, r // 2)
        after_refresh = self.plan.activation.sigmoid.unit_depth + 2 + bool(shared)
        if after_refresh > top:
            raise ValueError(f"one sigmoid a step needs {after_refresh} levels after a "
                             f"refresh; these parameters leave {top}")
        model = [self.ev.drop_to(ct, top - COMPACT_FORWARD_LEVELS) for ct in self.model]
        unit = self.kernel.unit_lookahead(model, [1 + m, -m])
        gathered = self.ev.rotate_and_sum(self.shards.binary_forward(unit, placed), shared)
        compact = self.ev.drop_to(self.ev.bootstrap(gathered), top - after_refresh)
        if shared:
            compact = self._logit_slots(compact, len(placed))
        probabilities = self.ev.rotate_chain(self.kernel.sigmoid_odd(compact, scale),
                                             self.layout.gradient_strides)
        return self.shards.binary_backward(self.ev.rotate_and_sum(probabilities, shared),
                                           placed, scale)

    def _compact_softmax_terms(self, placed: list[PlacedChunk],
                               scale: float) -> ofhe.Ciphertext:
        """Softmax terms with ONE exponential a step per group of chunks
        (`TrainingPlan.compact_softmax`, `softmax_group` chunks a group): the groups'
        gathered logits and labels (`StepKernel.softmax_gather`, the model dropped to where
        the gather ends at the refreshable top) give softmax - label at each logit's slot
        (`CompactSoftmax.deltas`), which, moved right by d and summed over the r slots, go
        back to the chunks (`StepKernel.softmax_scatter`)."""
        m, top = self.plan.config.momentum, self.ev.max_level
        if not self.plan.compact_softmax_fits(self.ev.params):
            raise ValueError("one exponential a step does not fit these parameters' levels")
        r, size = self.plan.softmax_period, self.plan.softmax_group
        model = [self.ev.drop_to(ct, top - SOFTMAX_GATHER_LEVELS) for ct in self.model]
        gathered = self.shards.softmax_gather(model, [1 + m, -m], placed)
        moved = {}
        for group in range(-(-len(placed) // size)):
            chunks = min(size, len(placed) - group * size)
            deltas = self.compact.deltas(gathered[2 * group], gathered[2 * group + 1], chunks, r)
            moved[group] = self.ev.rotate_and_sum(self.ev.rotate(deltas, -self.layout.block),
                                                  self.layout.strides_from(1, r // 2))
        return self.shards.softmax_scatter(moved, placed, scale)

    def _logit_slots(self, gathered: ofhe.Ciphertext, chunks: int) -> ofhe.Ciphertext:
        """Only the step's logits (slot p r of each block for its chunks p), zero elsewhere."""
        r = self.plan.compact_period
        return self.kernel.masked(gathered, ("logit slots", r, chunks),
                                  lambda: self.layout.window_mask(range(0, chunks * r, r)))

    def probabilities(self, chunk: EncryptedChunk,
                      model: ofhe.Ciphertext) -> list[ofhe.Ciphertext]:
        """Probabilities of one chunk under `model` (validation; softmax: its own bootstrap)."""
        kernel = self.kernel
        if self.softmax is None:
            return [kernel.sigmoid(kernel.unit_logit(chunk, model), 1.0)]
        exps = kernel.exponentials_under(chunk, model)
        inverse = self._refresh_inverse(kernel.compact_sums(exps))
        return kernel.softmax_probabilities(inverse, -self.layout.block, exps)

    def step(self, batch: int, validation: EncryptedChunk | None = None):
        """One Nesterov step on training batch `batch` (its chunks: one bootstrap of the model
        whatever their number; softmax: one denominator bootstrap per group of chunks). With
        `validation` (softmax only), that chunk's probabilities under the current (pre-step)
        model ride in the last group's denominator bootstrap when its validation place is free
        (`SoftmaxLayout.validation_rides`) and are returned; otherwise returns None."""
        m = self.plan.config.momentum
        chunk_ids = self.plan.batch_chunks(batch)
        n_samples = sum(self.data.train[t].n_samples for t in chunk_ids)
        scale = self.plan.config.learning_rate / n_samples
        placed = list(enumerate(chunk_ids))
        lookahead = self.ev.linear_combination(self.model, [1 + m, -m])
        ridden = None
        if self.softmax is None and self.plan.compact_sigmoid:
            terms = self._compact_terms(placed, scale)
            gradient = self.ev.rotate_and_sum(terms, self.layout.gradient_strides)
            period = self.layout.block
        elif self.softmax is None:
            terms = self.shards.binary_terms(
                self.kernel.unit_lookahead(self.model, [1 + m, -m]), placed, scale)
            gradient = self.ev.rotate_and_sum(terms, self.layout.gradient_strides)
            period = self.layout.block
        elif self.plan.compact_softmax:
            terms = self._compact_softmax_terms(placed, scale)
            half = self.ev.rotate_and_sum(terms, self.softmax.period_sum_strides)
            gradient = self.ev.add(half, self.ev.rotate(half, -self.layout.block))
            period = self.softmax.bootstrap_period
        else:
            d, softmax = self.layout.block, self.softmax
            compacts = self.shards.softmax_forward(self.model, [1 + m, -m], placed)
            last = softmax.group_of(len(placed) - 1)
            shift = softmax.place_shift(softmax.validation_place)
            if validation is not None and softmax.validation_rides(
                    len(placed) - last * softmax.chunks):
                val_exps = self.kernel.exponentials_under(validation, self.model[0])
                moved = self.ev.rotate(self.kernel.compact_sums(val_exps), -shift)
                compacts[last] = self.ev.add(compacts[last], moved)
            else:
                validation = None
            inverses = {group: self._refresh_inverse(compact)
                        for group, compact in sorted(compacts.items())}
            terms = self.shards.softmax_backward(inverses, scale)
            if validation is not None:
                ridden = self.kernel.softmax_probabilities(inverses[last], shift - d, val_exps)
            half = self.ev.rotate_and_sum(terms, self.softmax.period_sum_strides)
            gradient = self.ev.add(half, self.ev.rotate(half, -d))
            period = self.softmax.bootstrap_period
        failpoint("train.mid_step")
        decay = self.plan.config.decay_factor
        if self.plan.config.preconditioned:  # 1 - lr wd p_j per feature, one level more
            decayed = self.ev.mul(lookahead, self.data.decay)
        else:
            decayed = lookahead if decay == 1.0 else self.ev.linear_combination(
                self.model, [(1 + m) * decay, -m * decay])
        updated = self.ev.bootstrap(self.ev.sub(decayed, gradient), period=period)
        self.model = [updated, self.model[0]]
        self.state.steps += 1
        return ridden

    def step_and_validate(self, batch: int) -> ofhe.Ciphertext:
        """A step on `batch` whose denominator bootstrap also carries the first validation
        chunk under the current (pre-step) model where its last group has a free place: the
        encrypted validation loss of that model then costs no bootstrap of its own."""
        current = self.model[0]
        if self.plan.compact_validation:
            loss = self.compact.loss(current, self.data.val)
            self.step(batch)
            return loss
        first = self.step(batch, validation=self.data.val[0])
        if first is None:  # the step's last denominator group had no free place
            first = self.probabilities(self.data.val[0], current)
        rest = [(chunk, self.probabilities(chunk, current)) for chunk in self.data.val[1:]]
        return self._sum_of_squares([(self.data.val[0], first), *rest])

    def validation_loss_ciphertext(self) -> ofhe.Ciphertext:
        """Encrypted sum over validation samples of sum_j (p_j - y_j)^2, in slot 0.

        Squares of every chunk and class are added first (slot-wise), so the sum over samples
        costs one rotate-and-sum in total.
        """
        if self.softmax is None and 2 <= len(self.data.val) <= self.layout.block:
            return self._gathered_sum_of_squares(self.model[0])
        if self.plan.compact_validation:
            return self.compact.loss(self.model[0], self.data.val)
        return self._sum_of_squares([(chunk, self.probabilities(chunk, self.model[0]))
                                     for chunk in self.data.val])

    def _gathered_sum_of_squares(self, model: ofhe.Ciphertext) -> ofhe.Ciphertext:
        """Binary head, several validation chunks: what `_sum_of_squares` gives, with ONE
        sigmoid. Chunk p's logits are gathered at slot p of each block (the sigmoid's unit
        map in the mask, so no level of its own), its labels alike less the series' value at
        zero, and the odd part of the series (zero off the logits) runs once."""
        kernel, layout = self.kernel, self.layout
        alpha = self.plan.activation.sigmoid.unit_map[0]
        odd, at_zero = self.plan.activation.sigmoid.odd_part()
        logits, labels = [], []
        for p, chunk in enumerate(self.data.val):
            logits.append(kernel.masked(kernel.logit(chunk, model), ("val logit", p, alpha),
                                        lambda p=p: alpha * layout.window_mask([p])))
            labels.append(kernel.masked(self.ev.add_scalar(chunk.labels[0], -at_zero),
                                        ("val label", p), lambda p=p: layout.window_mask([p])))
        diff = self.ev.sub(self.ev.chebyshev_unit(self.ev.add_many(logits), odd),
                           self.ev.add_many(labels))
        places = layout.strides_from(1, next_power_of_two(len(self.data.val)) // 2)
        return self.ev.rotate_and_sum(self.ev.mul(diff, diff),
                                      places + layout.sample_sum_strides)

    def _sum_of_squares(self, chunks) -> ofhe.Ciphertext:
        """(chunk, probabilities) pairs -> the summed squared errors in slot 0."""
        squares = []
        for batch, probs in chunks:
            for j, p in enumerate(probs):
                diff = self.ev.sub(p, batch.labels[j])
                squares.append(self.ev.mul(diff, diff))
        return self.ev.rotate_and_sum(self.ev.add_many(squares), self.layout.sample_sum_strides)

    # ---- epochs, checkpoints ----------------------------------------------------------------
    def _load_model(self, epoch_dir: Path, files: dict) -> list[ofhe.Ciphertext]:
        names = sorted(name for name in files if name.startswith("model_"))
        if not names:
            raise BundleError(f"checkpoint {epoch_dir} holds no model ciphertexts")
        return [self.ev.adopt(load_ciphertext(epoch_dir / name, files[name]))
                for name in names]

    def initialise_or_resume(self) -> bool:
        """Load the last checkpoint if there is one; returns True when resumed."""
        state_path = self.checkpoint_dir / "state.json"
        if state_path.exists():
            saved = json.loads(state_path.read_text())
            self.state = EncryptedState(**saved["state"])
            self.ev.ops.load(saved["ops"])
            epoch_dir = self.checkpoint_dir / f"epoch_{self.state.epoch:04d}"
            self.model = self._load_model(epoch_dir, saved["files"])
            return True
        self.model = self._zero_model()
        return False

    def _checkpoint(self) -> None:
        epoch_dir = self.checkpoint_dir / f"epoch_{self.state.epoch:04d}"
        tmp = self.checkpoint_dir / f".tmp_epoch_{self.state.epoch:04d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {f"model_{k}.bin": save_ciphertext(tmp / f"model_{k}.bin", ct)
                 for k, ct in enumerate(self.model)}
        atomic_write_json(tmp / "manifest.json", {"epoch": self.state.epoch, "files": files})
        failpoint("checkpoint.written")
        replace_dir(tmp, epoch_dir)
        failpoint("checkpoint.moved")
        atomic_write_json(self.checkpoint_dir / "state.json", {
            "state": self.state.__dict__, "ops": self.ev.ops.snapshot(), "files": files,
        })
        if self.ev.refresher is not None:  # refreshes before the checkpoint are in it
            self.ev.refresher.forget_before(self.ev.ops["bootstraps"])
        keep = {self.state.epoch, self.state.best_epoch}
        for old in self.checkpoint_dir.glob("epoch_*"):
            if int(old.name.split("_")[1]) not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def weights_of_epoch(self, epoch: int) -> list[ofhe.Ciphertext]:
        """Encrypted weight rows kept for `epoch` (the latest and the best), checksummed."""
        epoch_dir = self.checkpoint_dir / f"epoch_{epoch:04d}"
        manifest_path = epoch_dir / "manifest.json"
        if not manifest_path.exists():
            raise BundleError(f"no checkpoint kept for epoch {epoch} in {self.checkpoint_dir}")
        files = json.loads(manifest_path.read_text())["files"]
        return self.rows(self._load_model(epoch_dir, files))

    def train(
        self,
        decide: Callable[[int, ofhe.Ciphertext], Decision] | None = None,
        on_step: Callable[[dict], None] | None = None,
        stop_after_epochs: int | None = None,
    ) -> EncryptedState:
        """Run (or resume) training. `decide=None`: fixed number of epochs, no interaction."""
        self.initialise_or_resume()
        config = self.plan.config
        n_batches = len(self.plan.train_batch_sizes)
        done_now = 0
        while not self.state.stopped and self.state.epoch < config.epochs:
            epoch = self.state.epoch + 1
            started = time.perf_counter()
            for position, b in enumerate(epoch_batch_order(n_batches, config.seed, epoch)):
                step_start = time.perf_counter()
                if position == 0 and self.state.validation_pending:
                    if not self._validated_step(int(b), decide):
                        break  # stopped: this step belongs to an epoch that never runs
                else:
                    self.step(int(b))
                if on_step:
                    on_step({"epoch": epoch, "step_in_epoch": position + 1,
                             "steps_per_epoch": n_batches, "steps": self.state.steps,
                             "step_seconds": time.perf_counter() - step_start,
                             "bootstraps": self.ev.ops["bootstraps"]})
            if self.state.stopped:
                self.state.wall_time_s += time.perf_counter() - started
                self._checkpoint()
                break
            record = {"epoch": epoch, "epoch_seconds": time.perf_counter() - started}
            if decide is None:
                self.state.best_epoch = epoch
            elif self.softmax is not None and self.data.val and epoch < config.epochs:
                self.state.validation_pending = True  # decided in the next epoch's first step
            else:
                self._apply(decide(epoch, self.validation_loss_ciphertext()))
            self.state.epoch = epoch
            self.state.wall_time_s += time.perf_counter() - started
            self.state.history.append(record)
            self._checkpoint()
            done_now += 1
            if stop_after_epochs is not None and done_now >= stop_after_epochs:
                break
        return self.state

    def _apply(self, decision: Decision) -> None:
        self.state.best_epoch = decision.best_epoch
        self.state.stopped = not decision.continue_training
        self.state.validation_pending = False

    def _validated_step(self, batch: int, decide) -> bool:
        """First step of an epoch carrying the previous epoch's validation; False (and the
        model and step count rolled back) when the hospital stops training there."""
        if decide is None:  # resumed without a judge: nobody asks for the validation
            self._apply(Decision(True, self.state.epoch))
            self.step(batch)
            return True
        before = (list(self.model), self.state.steps)
        loss = self.step_and_validate(batch)
        self._apply(decide(self.state.epoch, loss))
        if self.state.stopped:
            self.model, self.state.steps = before
            return False
        return True
