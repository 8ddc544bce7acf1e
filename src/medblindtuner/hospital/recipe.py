"""Hospital side, in the clear: every training setting the product chooses, derived from data.

The cloud runs a fixed number of encrypted gradient steps, so the settings must be right before
anything is encrypted, on any dataset. Each one follows from train/validation statistics (the
test split is never read here) and is recorded with its reason:

- **Reference probe** (`hospital.reference`): scikit-learn logistic regression on the
  standardised full features, `C` chosen on validation. Its `C` is the L2 prior of the head.
- **PCA width** (`hospital.widths`): among `PCA_CANDIDATES` whose encrypted epochs fit the
  time allowance (at least `MIN_EPOCHS` of them, `hospital.budget`), those whose probe (same
  `C`) is tied with the best on validation (mean log-loss within one paired standard error
  of the best's); of these the widest whose settings keep the probe's prior (softmax: with
  no more data ciphertexts a step) and whose early stop comes within the allowance (a width
  the allowance would cut while it still improves gives way to a narrower tied one). Wider
  is preferred because the reference probe uses every feature (a small validation split
  cannot see the difference the test split may).
- **Weight decay** `wd = s^2 / (C n)`: the probe's penalty ||w||^2 / (2 C n) per sample,
  expressed in the scaled coordinates (features multiplied by `s`).
- **Preconditioning**: each feature column steps by `lr p_j`, `p_j = 1 / (h mean x_j^2 + wd)`
  (`training.plain.jacobi_preconditioner`; the same optimum, every principal direction at the
  same pace: the 10-class stress set reaches the probe in 1 epoch instead of 11).
- **Step size** `lr = STEP_SIZE_FRACTION / L`, `L = h * lambda_max(P^1/2 X^T X P^1/2 / n) +
  wd max p`, the curvature bound of the loss in the preconditioned metric (`h` = 1/4 for the
  sigmoid, 1/2 for softmax). The bias column is balanced with the features
  (`FeatureScaler.bias_`), so L is set by the data, not the 1s.
- **Momentum** `(1 - sqrt(q)) / (1 + sqrt(q))`, `q = wd min p / L` (Nesterov's constant for a
  q-conditioned problem), at most `MAX_MOMENTUM`.
- **Batch**: whole data ciphertexts, >= `MIN_BATCH` samples, <= `MAX_STEPS_PER_EPOCH` steps.
- **Epochs**: the exact head's early stop (the judge's rule, `patience`), capped by what the
  time allowance buys at the job's refresh mode's costs (`hospital.budget`).
- **Approximation intervals**: the smallest rung of a ladder that leaves `LOGIT_HEADROOM`
  above the exact head's largest logit slot (and, for softmax, `SUM_HEADROOM` above its
  largest sum of exponentials); the range check on the polynomial mirror then confirms them,
  and a failed check moves up the ladder. The ladders reach the logits a weak prior gives on
  well-separated data (sigmoid up to 96, `training.approx`); only beyond them is the prior
  raised. A setting the user gave is never changed: if it fails the check, the refusal stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.features.extract import FeatureSet
from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import PRODUCTION, CkksParams
from medblindtuner.hospital.budget import (
    MAX_EPOCHS,
    MAX_STEPS_PER_EPOCH,
    MIN_BATCH,
    MIN_EPOCHS,
    TIME_ALLOWANCE_HOURS,
    affordable_epochs,
    derived_batch_size,
)
from medblindtuner.hospital.reference import (
    ProbeResult,
    fit_probe,
)
from medblindtuner.hospital.widths import choose_pca_dims
from medblindtuner.training.approx import ActivationPlan, RangeError
from medblindtuner.training.plain import TrainConfig, make_batches, step_bounds, train_head
from medblindtuner.training.plan import RANGE_MARGIN, TrainingPlan, max_batch_size

STEP_SIZE_FRACTION = 0.5
MAX_MOMENTUM = 0.9
LOGIT_HEADROOM = 0.8
SUM_HEADROOM = 1.5
# Degree 59 (6 levels on the unit interval): max error 5e-6 at 16, 2.5e-4 at 24, 1.8e-3 at
# 32, 1.2e-2 at 48, 3.3e-2 at 64, 8e-2 at 96 (values within [-0.08, 1.08]).
SIGMOID_BOUNDS = (8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0)
# Degree 13 (4 levels on the unit interval): max abs error 9e-9 at 3 ... 2.9e-4 at 6, 3.3e-3 at 7.
EXP_BOUNDS = (3.0, 4.0, 5.0, 6.0, 7.0)
# Beyond, the saturating exp exp(6 tanh(x / 6)) at degree 27 (5 levels): max abs error 8.5e-8
# at 8, 3.7e-3 at 16, 0.18 at 24, 1.2 at 32 (values up to e^6 = 403; `ActivationPlan.softmax_for`)
SATURATED_EXP_BOUNDS = (8.0, 12.0, 16.0, 24.0, 32.0)
WD_RAISES, WD_BISECTIONS = 3, 4  # range checks spent raising the prior (each one plain run)
# Rows are scaled to L2 norm <= FEATURE_NORM. The logits do not depend on it (the step size
# scales with 1 / FEATURE_NORM^2), but the weights the cloud bootstraps shrink with it, and the
# sparse bootstrap's error grows fast with its inputs (benchmarks/probe_bootstrap.py).
FEATURE_NORM = 4.0


class RecipeError(MedBlindTunerError, ValueError):
    """No settings that keep the encrypted run inside its approximations were found."""


@dataclass
class PreparedData:
    """Scaled, bias-augmented splits, ready for the plaintext and encrypted trainers."""

    name: str
    n_classes: int
    x: dict[str, np.ndarray]  # split -> (n, k+1) with bias
    y: dict[str, np.ndarray]
    scaler: dict
    backbone: dict
    feature_scaler: FeatureScaler | None = None  # the fitted transform (new images, predict)


def prepare_features(features: FeatureSet, pca_dims: int | None,
                     max_norm: float = FEATURE_NORM) -> PreparedData:
    """Standardise, PCA to `pca_dims`, bound row norms by `max_norm`, append the balanced
    bias column (every statistic fitted on the training split only)."""
    x_train, _ = features.splits["train"]
    scaler = FeatureScaler(standardize=True, n_components=pca_dims,
                           max_norm=max_norm).fit(x_train)
    labels = np.concatenate([y for _, y in features.splits.values()])
    meta = features.meta()
    return PreparedData(
        name=str(meta.get("dataset_name", "dataset")),
        n_classes=int(meta.get("n_classes") or labels.max() + 1),
        x={s: scaler.augment(x) for s, (x, _) in features.splits.items()},
        y={s: np.asarray(y).astype(int) for s, (_, y) in features.splits.items()},
        scaler=scaler.to_dict(),
        backbone=dict(meta.get("backbone", {})),
        feature_scaler=scaler,
    )


@dataclass(frozen=True)
class Overrides:
    """Settings the user gave; None: derive it. `pca_dims=0` keeps every feature."""

    pca_dims: int | None = None
    learning_rate: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    patience: int = 4
    seed: int = 0
    # a step of lr p_j per feature column (`jacobi_preconditioner`); a given learning rate
    # keeps the plain step, whose metric it was chosen in
    preconditioned: bool = True
    time_allowance_h: float = TIME_ALLOWANCE_HOURS  # encrypted training the recipe plans for

    def command_line(self) -> str:
        """The options that reproduce these overrides (for reports)."""
        names = {"pca_dims": "--pca", "learning_rate": "--lr", "momentum": "--momentum",
                 "weight_decay": "--weight-decay", "epochs": "--epochs",
                 "batch_size": "--batch-size"}
        parts = [f"{flag} {getattr(self, name)}" for name, flag in names.items()
                 if getattr(self, name) is not None]
        parts += [f"--patience {self.patience}"] if self.patience != 4 else []
        parts += ([f"--time-allowance {self.time_allowance_h:g}"]
                  if self.time_allowance_h != TIME_ALLOWANCE_HOURS else [])
        return " ".join(parts)


@dataclass(frozen=True)
class Choice:
    """One setting, where it came from ("derived" or "given") and why."""

    name: str
    value: object
    source: str
    why: str


@dataclass
class Recipe:
    """Everything chosen for one dataset, with the reasons."""

    pca_dims: int | None
    config: TrainConfig
    activation: ActivationPlan
    probe: ProbeResult
    plan: TrainingPlan  # the public plan whose mirror passed the range check
    choices: list[Choice] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{c.name} = {_fmt(c.value)} ({c.source}: {c.why})" for c in self.choices]

    def to_dict(self) -> dict:
        return {"pca_dims": self.pca_dims, "config": self.config.to_dict(),
                "activation": self.activation.to_dict(), "probe_c": self.probe.c,
                "choices": [asdict(c) for c in self.choices]}


@dataclass
class _AtWidth:
    """The settings derived at one PCA width (`derive_recipe` compares widths with it)."""

    dims: int | None
    data: PreparedData
    layout: PackingLayout
    steps_per_epoch: int
    config: TrainConfig
    activation: ActivationPlan
    plan: TrainingPlan
    wd_why: str
    raised: bool
    epochs_why: str = ""
    # the plaintext twin still improved when the time allowance's epochs ran out, and its
    # best validation loss within them (compared when every width is cut short)
    capped: bool = False
    capped_val_loss: float = math.inf


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class _Job:
    """What every width's derivation shares: the data, the probe and the user's settings."""

    features: FeatureSet
    params: CkksParams
    given: Overrides
    n_classes: int
    probe: ProbeResult


def derive_recipe(
    features: FeatureSet,
    params: CkksParams = PRODUCTION,
    given: Overrides | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[PreparedData, Recipe]:
    """Probe, PCA width, scaling and every training setting not `given`.

    Raises `RangeError` when a given setting fails the range check and `RecipeError` when no
    derived setting passes it.
    """
    given = given or Overrides()
    n_classes = int(features.n_classes or 1 + max(int(np.max(y)) for _, y in
                                                  features.splits.values()))
    choices: list[Choice] = []

    def note(name: str, value: object, was_given: bool, why: str) -> None:
        choices.append(Choice(name, value, "given" if was_given else "derived", why))
        if log is not None:
            log(f"  {choices[-1].name} = {_fmt(value)}: {why}")

    probe = fit_probe(features.splits, n_classes)
    note("probe_C", probe.c, False, f"validation log-loss {probe.val_log_loss:.4f} (best of "
         "the grid); the probe is the reference and its C the head's L2 prior")
    job = _Job(features, params, given, n_classes, probe)
    if given.pca_dims is None:
        widths, dims_why = choose_pca_dims(features, n_classes, probe.c, params.slots,
                                           hours=given.time_allowance_h, refresh=params.refresh)
    else:
        widths, dims_why = [given.pca_dims if given.pca_dims > 0 else None], "given"
    # Widest preferred width whose settings keep the probe's prior (a raised prior pulls the
    # head away from the reference) and whose early stop fits the time allowance; if the
    # allowance cuts every one short, the one whose plaintext twin gets furthest (lowest
    # validation loss) within it; if every one needs a raise, the widest.
    tried: list[_AtWidth] = []
    for dims in widths:
        tried.append(_derive_at(job, dims))
        if not tried[-1].raised and not tried[-1].capped:
            break
    kept = [t for t in tried if not t.raised]
    chosen = next((t for t in kept if not t.capped),
                  min(kept, key=lambda t: t.capped_val_loss) if kept else tried[0])
    skipped = [t.dims for t in tried if t.raised and t is not chosen]
    cut = [t.dims for t in tried if t.capped and not t.raised and t is not chosen]
    note("pca_dims", chosen.dims, given.pca_dims is not None,
         dims_why + (f"; {skipped} needed a raised prior" if skipped else "")
         + (f"; {cut} still improved when the time allowance ran out" if cut else "")
         + ("; every width was cut short by the allowance: the lowest validation loss "
            "within it" if kept and all(t.capped for t in kept) else ""))
    _note_settings(job, chosen, note)
    recipe = Recipe(pca_dims=chosen.dims, config=chosen.config, activation=chosen.activation,
                    probe=probe, plan=chosen.plan, choices=choices)
    return chosen.data, recipe


def _note_settings(job: _Job, chosen: _AtWidth, note: Callable[..., None]) -> None:
    """Record every setting of the chosen width with its reason."""
    given, config, layout = job.given, chosen.config, chosen.layout
    smoothness, strong = step_bounds(chosen.data.x["train"], job.n_classes,
                                     config.weight_decay, config.preconditioned)
    note("weight_decay", config.weight_decay, given.weight_decay is not None, chosen.wd_why)
    note("learning_rate", config.learning_rate, given.learning_rate is not None,
         f"{STEP_SIZE_FRACTION} / L, L = {smoothness:.4g} (curvature bound of the loss on "
         "these features" + (", each feature column preconditioned by 1 / (h mean x_j^2 + "
                             "wd)" if config.preconditioned else "") + ")")
    note("momentum", config.momentum, given.momentum is not None,
         f"Nesterov's (1 - sqrt q)/(1 + sqrt q) for q = mu / L = {strong / smoothness:.3g}, "
         f"at most {MAX_MOMENTUM}")
    note("batch_size", config.batch_size, given.batch_size is not None,
         f"{-(-config.batch_size // layout.samples_per_ct)} whole data ciphertexts of "
         f"{layout.samples_per_ct} samples ({job.params.slots} slots / {2 * layout.block}): "
         f"at least {MIN_BATCH} samples a step and at most {MAX_STEPS_PER_EPOCH} steps an "
         "epoch; batches are split evenly")
    note("epochs", config.epochs, given.epochs is not None, chosen.epochs_why)
    note("logit_bound", chosen.activation.logit_bound, False,
         "smallest rung of the ladder with headroom above the exact head's largest logit "
         f"slot, confirmed by the mirror's range check (levels: {chosen.activation.levels})"
         + ("; beyond [-7, 7] the saturating exponential exp(6 tanh(z/6))"
            if chosen.activation.exp_saturated else ""))
    if chosen.activation.sum_bound is not None:
        note("softmax_sum_bound", chosen.activation.sum_bound, False,
             f"{SUM_HEADROOM} x the exact head's largest sum of the head's exponentials, "
             "confirmed by the mirror")


def _derive_at(job: _Job, dims: int | None) -> _AtWidth:
    """Every setting at one PCA width; `raised` when the probe's prior had to grow."""
    given, n_classes = job.given, job.n_classes
    data = prepare_features(job.features, dims)
    x_train, n = data.x["train"], len(data.x["train"])
    layout = PackingLayout(job.params.slots, x_train.shape[1])
    preconditioned = given.preconditioned and given.learning_rate is None
    batch = given.batch_size if given.batch_size is not None else derived_batch_size(
        n, layout, n_classes)
    batch = min(batch, max_batch_size(layout, n_classes))
    steps_per_epoch = len(make_batches(n, batch, given.seed))
    cap = given.epochs if given.epochs is not None else affordable_epochs(
        n, len(data.x["val"]), layout, n_classes, given.time_allowance_h, job.params.refresh)

    def settings(wd: float) -> TrainConfig:
        """Step size and momentum follow from the curvature and the weight decay (in the
        preconditioned metric unless the user gave the step size)."""
        smoothness, strong = step_bounds(x_train, n_classes, wd, preconditioned)
        lr = given.learning_rate if given.learning_rate is not None else (
            STEP_SIZE_FRACTION / smoothness)
        q = strong / smoothness
        mom = given.momentum if given.momentum is not None else min(
            MAX_MOMENTUM, (1 - math.sqrt(q)) / (1 + math.sqrt(q)))
        try:
            return TrainConfig(learning_rate=float(lr), momentum=float(mom), epochs=int(cap),
                               batch_size=int(batch), patience=given.patience,
                               seed=given.seed, weight_decay=float(wd),
                               preconditioned=preconditioned).checked()
        except ValueError as err:
            raise RecipeError(str(err)) from err

    def confirmed(wd: float) -> tuple[TrainConfig, ActivationPlan, TrainingPlan]:
        config = settings(wd)
        return _confirmed_activation(data, config, layout, job.params, n_classes,
                                     derive_epochs=given.epochs is None)

    wd = given.weight_decay if given.weight_decay is not None else (
        data.feature_scaler.scale_**2 / (job.probe.c * n))
    wd_why = (f"the probe's penalty in scaled units, s^2/(C n) with s = "
              f"{data.feature_scaler.scale_:.4g}, n = {n}")
    try:
        config, activation, plan = confirmed(wd)
        raised = False
    except RangeError as err:
        if given.weight_decay is not None:
            raise RangeError(f"the given settings leave the approximation intervals: "
                             f"{err}") from err
        config, activation, plan, wd_why = _raised_weight_decay(
            confirmed, wd, err, logit_bounding_weight_decay(
                x_train, n_classes, LOGIT_HEADROOM * _ladder(n_classes)[-1]))
        raised = True
    if given.epochs is None and activation.exp_saturated:  # a costlier chunk: fewer epochs fit
        cap = affordable_epochs(n, len(data.x["val"]), layout, n_classes,
                                given.time_allowance_h, job.params.refresh, saturated=True)
        if config.epochs > cap:  # the first `cap` epochs of the confirmed run: ranges hold
            config = replace(config, epochs=cap)
            plan = replace(plan, config=config)
    epochs_why = ("given" if given.epochs is not None else _epochs_why(
        config.epochs, cap, steps_per_epoch, given))
    capped = given.epochs is None and config.epochs >= cap and cap < MAX_EPOCHS
    capped_loss = math.inf
    if capped:
        twin = train_head(data.x["train"], data.y["train"], data.x["val"], data.y["val"],
                          n_classes, config, layout=layout)
        capped_loss = min(record["val_loss"] for record in twin.history)
    return _AtWidth(dims, data, layout, steps_per_epoch, config, activation, plan,
                    wd_why, raised, epochs_why, capped, capped_loss)


def _epochs_why(epochs: int, cap: int, steps_per_epoch: int, given: Overrides) -> str:
    stopped = epochs < cap
    return ((f"the plaintext twin's validation loss stopped improving: its best epoch plus the "
             f"patience of {given.patience}" if stopped else
             "the validation loss still improved at the cap")
            + f" ({steps_per_epoch} steps an epoch; cap {cap}: {MIN_EPOCHS} to {MAX_EPOCHS} "
            f"epochs, as many as fit the {given.time_allowance_h:g} h allowance at the "
            "measured encrypted costs); the judge's early stop ends the encrypted run")


def logit_bounding_weight_decay(x_train: np.ndarray, n_classes: int, bound: float) -> float:
    """The L2 penalty under which the regularised optimum's logits stay within `bound`.

    The loss at w = 0 is ln K, so the optimum has wd/2 |W|^2 <= ln K, and each logit
    |w_k . x| <= |W| max|x|: wd >= 2 ln K max|x|^2 / bound^2 bounds them by construction.
    Used only when the probe's own penalty lets them outgrow every interval (nearly
    separable data), since it pulls the head away from the probe.
    """
    max_sq_norm = float(np.max(np.einsum("ij,ij->i", x_train, x_train)))
    return 2.0 * math.log(max(2, n_classes)) * max_sq_norm / bound**2


def _ladder(n_classes: int) -> tuple[float, ...]:
    return SIGMOID_BOUNDS if n_classes == 2 else EXP_BOUNDS + SATURATED_EXP_BOUNDS


def _raised_weight_decay(
    confirmed: Callable[[float], tuple[TrainConfig, ActivationPlan, TrainingPlan]],
    failing: float, err: RangeError, bounding: float,
) -> tuple[TrainConfig, ActivationPlan, TrainingPlan, str]:
    """Settings with a penalty above `failing` whose logits fit, close to the smallest such.

    A stronger prior shrinks the logits: first raised by the overshoot squared (logits scale
    about linearly with |W|); on nearly separable data they shrink only logarithmically, so
    then the bounding penalty (a fit by construction). Either way a geometric bisection
    between the last penalty that failed and the one that fits comes back down (a raise by
    4x can overshoot: 10 classes -2.8 ACC points instead of -3.9, docs/results.md).
    Returns (config, activation, plan, why); RecipeError if even the bounding penalty fails.
    """
    first = failing
    found = None
    for _ in range(WD_RAISES):
        wd = failing * max(4.0, getattr(err, "overshoot", 1.0) ** 2)
        if wd >= bounding:
            break
        try:
            found = confirmed(wd)
            break
        except RangeError as exc:
            failing, err = wd, exc
    how = f"raised from the probe's penalty s^2/(C n) = {first:.3g}"
    if found is None:
        try:
            found = confirmed(bounding)
        except RangeError as exc:
            raise RecipeError(f"no settings keep this dataset's logits inside the "
                              f"approximation intervals: {exc}") from exc
        how += (f" towards {bounding:.3g}, the penalty under which the optimum's logits fit "
                "the widest interval by construction (nearly separable data)")
    for _ in range(WD_BISECTIONS):  # back down towards the smallest penalty that fits
        wd = math.sqrt(failing * found[0].weight_decay)
        try:
            found = confirmed(wd)
        except RangeError:
            failing = wd
    return (*found, f"{how}: with less, the logits leave every approximation interval "
            f"({err})")


def _confirmed_activation(data: PreparedData, config: TrainConfig, layout: PackingLayout,
                          params: CkksParams, n_classes: int, derive_epochs: bool
                          ) -> tuple[TrainConfig, ActivationPlan, TrainingPlan]:
    """Epochs and intervals from the exact head, the intervals confirmed (or widened along
    the ladder) by the mirror's range check, with the plan that passed it; RangeError when
    the top of the ladder fails too.

    With `derive_epochs`, `config.epochs` is a cap: the exact head runs until its validation
    loss stops improving for `patience` epochs (the judge's rule), and the run keeps that
    many epochs."""
    splits = (data.x["train"], data.y["train"], data.x["val"], data.y["val"])
    exact = train_head(*splits, n_classes, config, layout=layout)
    if derive_epochs:
        config = replace(config, epochs=max(MIN_EPOCHS, exact.epochs_run))
    ladder = _ladder(n_classes)
    if exact.max_abs_logit > RANGE_MARGIN * ladder[-1]:
        err = RangeError(f"the exact head's logits reach {exact.max_abs_logit:.2f}, beyond "
                         f"the widest interval [-{ladder[-1]}, {ladder[-1]}]")
        err.overshoot = exact.max_abs_logit / (LOGIT_HEADROOM * ladder[-1])
        raise err
    # softmax: the inverse's upper end from the exact head's sums of the rung's exponential
    # (plain or saturating), widened after each failed check
    sums = {False: exact.max_softmax_sum, True: exact.max_saturated_sum}
    widen = {False: 1.0, True: 1.0}
    failure = ""
    start = next((i for i, bound in enumerate(ladder)
                  if bound >= exact.max_abs_logit / LOGIT_HEADROOM), len(ladder) - 1)
    for bound in ladder[start:]:
        if n_classes == 2:
            activation = ActivationPlan(n_classes=n_classes, logit_bound=bound)
        else:
            saturated = ActivationPlan.saturates(bound)
            activation = ActivationPlan.softmax_for(n_classes, bound, sum_bound=max(
                2.0 * n_classes, SUM_HEADROOM * widen[saturated] * sums[saturated]))
        plan = TrainingPlan.create(params, data.x["train"], data.x["val"], n_classes, config,
                                   activation)
        try:
            plan.check_ranges(*splits)
            return config, activation, plan
        except RangeError as err:
            failure = str(err)
            if n_classes > 2:
                widen[activation.exp_saturated] *= SUM_HEADROOM
    raise RangeError(failure)
