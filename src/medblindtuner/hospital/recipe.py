"""Hospital side, in the clear: every training setting the product chooses, derived from data.

The cloud runs a fixed number of encrypted gradient steps, so the settings must be right before
anything is encrypted, on any dataset. Each one follows from train/validation statistics (the
test split is never read here) and is recorded with its reason:

- **Reference probe** (`hospital.reference`): scikit-learn logistic regression on the
  standardised full features, `C` chosen on validation. Its `C` is the L2 prior of the head.
- **PCA width**: among `PCA_CANDIDATES`, those whose probe (same `C`) is statistically tied
  with the best on validation (mean log-loss within one paired standard error of the best's)
  are equally good as far as the data can tell; of these, the widest whose encrypted work is
  at most `WIDTH_COST_ALLOWANCE` times the cheapest tied width's (softmax: with no more data
  ciphertexts a step) and whose settings keep the probe's prior. Wider is preferred because
  the reference probe uses every feature (a small validation split cannot see the difference
  the test split may); the allowance keeps a tie from buying a much longer run.
- **Weight decay** `wd = s^2 / (C n)`: the probe's penalty ||w||^2 / (2 C n) per sample,
  expressed in the scaled coordinates (features multiplied by `s`).
- **Step size** `lr = STEP_SIZE_FRACTION / L`, `L = h * lambda_max(X^T X / n) + wd`, the
  curvature bound of the loss (`h` = 1/4 for the sigmoid, 1/2 for softmax). The bias column is
  balanced with the features (`FeatureScaler.bias_`), so L is set by the data, not the 1s.
- **Momentum** `(1 - sqrt(q)) / (1 + sqrt(q))`, `q = wd / L` (Nesterov's constant for a
  q-conditioned problem), at most `MAX_MOMENTUM`.
- **Batch**: whole data ciphertexts, as few as hold `MIN_BATCH` samples (a step's gradient
  averages enough samples) and as many as keep an epoch within `STEP_BUDGET / MIN_EPOCHS`
  steps (a large dataset takes bigger steps: the model's bootstraps are paid once per step
  whatever its chunks), split into equal batches (`plain.make_batches`).
- **Epochs**: about `STEP_BUDGET` steps, between `MIN_EPOCHS` and `MAX_EPOCHS`.
- **Approximation intervals**: the smallest rung of a ladder that leaves `LOGIT_HEADROOM`
  above the exact head's largest logit slot (and, for softmax, `SUM_HEADROOM` above its
  largest sum of exponentials); the range check on the polynomial mirror then confirms them,
  and a failed check moves up the ladder. A setting the user gave is never changed: if it
  fails the check, the refusal stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.features.extract import FeatureSet
from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import PRODUCTION, CkksParams
from medblindtuner.hospital.reference import (
    ProbeResult,
    fit_logistic,
    fit_probe,
)
from medblindtuner.training.approx import ActivationPlan, RangeError
from medblindtuner.training.plain import TrainConfig, make_batches, train_head
from medblindtuner.training.plan import denominator_group_chunks, max_batch_size

PCA_CANDIDATES = (31, 63, 127, 255, 511)
WIDTH_COST_ALLOWANCE = 1.5
# A step's serial work (model update and bootstraps) in units of one data ciphertext's
# per-chunk work, binary and softmax heads (benchmarks/scale.py: serial s / step over
# s / chunk, docs/results.md); used only to compare widths' costs.
STEP_COST_IN_CHUNKS = {"binary": 5.5, "softmax": 3.1}
# Each further softmax denominator group of a step: one more bootstrap at the shared slot
# count (15.6 s at 2048 slots, benchmarks/bootstrap_memory.py, against 8.6 s a softmax chunk,
# benchmarks/scale.py; docs/results.md).
EXTRA_DENOMINATOR_GROUP_IN_CHUNKS = 1.8
STEP_SIZE_FRACTION = 0.5
MAX_MOMENTUM = 0.9
STEP_BUDGET = 30
MIN_EPOCHS, MAX_EPOCHS = 2, 10
MIN_BATCH = 256
LOGIT_HEADROOM = 0.8
SUM_HEADROOM = 1.5
SIGMOID_BOUNDS = (8.0, 12.0, 16.0, 20.0, 24.0)  # degree 27: max error 1.4e-5 ... 1.6e-2
EXP_BOUNDS = (3.0, 3.5, 4.0, 4.5, 5.0)  # degree 9: max abs error 5e-5 ... 1.4e-2
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

    def command_line(self) -> str:
        """The options that reproduce these overrides (for reports)."""
        names = {"pca_dims": "--pca", "learning_rate": "--lr", "momentum": "--momentum",
                 "weight_decay": "--weight-decay", "epochs": "--epochs",
                 "batch_size": "--batch-size"}
        parts = [f"{flag} {getattr(self, name)}" for name, flag in names.items()
                 if getattr(self, name) is not None]
        parts += [f"--patience {self.patience}"] if self.patience != 4 else []
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
    curvature: float
    steps_per_epoch: int
    config: TrainConfig
    activation: ActivationPlan
    wd_why: str
    raised: bool


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def choose_pca_dims(features: FeatureSet, n_classes: int, c: float, slots: int,
                    candidates: tuple[int, ...] = PCA_CANDIDATES
                    ) -> tuple[list[int | None], str]:
    """Widths to try, preferred first: those tied with the best on validation and within the
    cost allowance, widest first (`derive_recipe` takes the first that keeps the probe's prior).

    Tied: the mean paired difference of per-sample validation log-losses to the best width is
    at most its standard error. Affordable at all: one epoch holds at most `STEP_BUDGET` data
    ciphertexts (a ciphertext holds slots / (2 next_pow2(k + 1)) samples). A softmax head's
    step bootstraps the denominators of all its chunks at once, so its memory grows with the
    chunks of a step: a wider softmax width may not add chunks to a step.
    """
    x_train, y_train = features.splits["train"]
    x_val, y_val = features.splits["val"]
    y_train = np.asarray(y_train).reshape(-1).astype(int)
    y_val = np.asarray(y_val).reshape(-1).astype(int)
    n = len(x_train)

    def layout(k: int) -> PackingLayout:
        return PackingLayout(slots, k + 1)

    usable = [k for k in candidates if k < min(x_train.shape[1], n)
              and (k == candidates[0] or -(-n // layout(k).samples_per_ct) <= STEP_BUDGET)]
    if not usable:
        return [None], f"{x_train.shape[1]} features: no PCA needed"
    losses = {}
    for k in usable:
        scaler = FeatureScaler(standardize=True, n_components=k).fit(x_train)
        model = fit_logistic(scaler.project(x_train), y_train, c, n_classes)
        losses[k] = sample_log_losses(model, scaler.project(x_val), y_val)
    best = min(losses, key=lambda k: losses[k].mean())
    tied = [k for k in usable if _tied(losses[k] - losses[best])]
    cost = {k: encrypted_work(n, len(y_val), layout(k), n_classes) for k in tied}
    cheapest = min(tied, key=lambda k: cost[k])
    chunks = {k: chunks_per_step(n, layout(k), n_classes) for k in tied}
    preferred = sorted((k for k in tied if cost[k] <= WIDTH_COST_ALLOWANCE * cost[cheapest]
                        and (n_classes == 2 or chunks[k] <= chunks[cheapest])), reverse=True)
    table = ", ".join(f"{k}: {losses[k].mean():.4f}" for k in usable)
    work = ", ".join(f"{k}: {cost[k]:.0f}" for k in tied)
    return preferred, (f"widest width whose probe's validation log-loss is within one paired "
                       f"standard error of the best ({table}; tied: {tied}), whose encrypted "
                       f"work is at most {WIDTH_COST_ALLOWANCE}x the cheapest tied width's "
                       f"(chunk-equivalents: {work})"
                       + ("" if n_classes == 2 else ", with no more chunks per step")
                       + " and whose settings keep the probe's prior")


def _derived_batch_chunks(n_train: int, layout: PackingLayout, n_classes: int) -> list[int]:
    """Data ciphertexts of each batch under the derived batch rule."""
    batches = make_batches(n_train, derived_batch_size(n_train, layout, n_classes), 0)
    return [-(-len(b) // layout.samples_per_ct) for b in batches]


def chunks_per_step(n_train: int, layout: PackingLayout, n_classes: int) -> int:
    """Data ciphertexts in the largest batch under the derived batch rule."""
    return max(_derived_batch_chunks(n_train, layout, n_classes))


def sample_log_losses(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample log-loss of a fitted scikit-learn classifier (labels 0..K-1)."""
    proba = model.predict_proba(x)
    return -np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))


def _tied(differences: np.ndarray) -> bool:
    """Mean paired difference within one standard error of zero (the best is tied with
    itself)."""
    if len(differences) < 2 or not np.any(differences):
        return True
    return float(differences.mean()) <= float(differences.std(ddof=1) /
                                              math.sqrt(len(differences)))


def encrypted_work(n_train: int, n_val: int, layout: PackingLayout, n_classes: int) -> float:
    """Encrypted work of a run at this layout under the derived batch and epoch rules, in
    data-ciphertext passes: every training and validation chunk of every epoch, plus each
    step's serial work (`STEP_COST_IN_CHUNKS`)."""
    batch_chunks = _derived_batch_chunks(n_train, layout, n_classes)
    chunks = sum(batch_chunks) + -(-n_val // layout.samples_per_ct)
    serial = len(batch_chunks) * STEP_COST_IN_CHUNKS["binary" if n_classes == 2 else "softmax"]
    if n_classes > 2:
        group = denominator_group_chunks(layout, max(batch_chunks))
        serial += EXTRA_DENOMINATOR_GROUP_IN_CHUNKS * sum(-(-c // group) - 1
                                                          for c in batch_chunks)
    return float(planned_epochs(len(batch_chunks)) * (chunks + serial))


def planned_epochs(steps_per_epoch: int) -> int:
    """About `STEP_BUDGET` steps, between `MIN_EPOCHS` and `MAX_EPOCHS`."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, round(STEP_BUDGET / steps_per_epoch))))


def derived_batch_size(n_samples: int, layout: PackingLayout, n_classes: int) -> int:
    """Whole ciphertexts: at least MIN_BATCH samples, at most STEP_BUDGET / MIN_EPOCHS steps
    an epoch, no more than a step takes (`plan.max_batch_size`) or the data holds."""
    per_ct = layout.samples_per_ct
    wanted = max(-(-MIN_BATCH // per_ct),
                 -(-n_samples // (per_ct * (STEP_BUDGET // MIN_EPOCHS))))
    chunks = min(wanted, max_batch_size(layout, n_classes) // per_ct, -(-n_samples // per_ct))
    return chunks * per_ct


def _ladder_start(ladder: tuple[float, ...], needed: float) -> int:
    for i, bound in enumerate(ladder):
        if bound >= needed:
            return i
    return len(ladder) - 1


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
    pca_dims, learning_rate, momentum = given.pca_dims, given.learning_rate, given.momentum
    weight_decay, epochs, batch_size = given.weight_decay, given.epochs, given.batch_size
    patience, seed = given.patience, given.seed
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

    if pca_dims is None:
        widths, dims_why = choose_pca_dims(features, n_classes, probe.c, params.slots)
    else:
        widths, dims_why = [pca_dims if pca_dims > 0 else None], "given"

    def derive_at(dims: int | None) -> _AtWidth:
        """Every setting at one PCA width; `raised` when the probe's prior had to grow."""
        data = prepare_features(features, dims)
        scaler = data.feature_scaler
        x_train, n = data.x["train"], len(data.x["train"])
        curvature = (0.25 if n_classes == 2 else 0.5) * float(
            np.linalg.norm(x_train, ord=2)**2 / n)
        layout = PackingLayout(params.slots, x_train.shape[1])
        batch = batch_size if batch_size is not None else derived_batch_size(n, layout,
                                                                             n_classes)
        batch = min(batch, max_batch_size(layout, n_classes))
        steps_per_epoch = len(make_batches(n, batch, seed))
        n_epochs = epochs if epochs is not None else planned_epochs(steps_per_epoch)
        derived_wd = scaler.scale_**2 / (probe.c * n)
        wd_why = (f"the probe's penalty in scaled units, s^2/(C n) with s = "
                  f"{scaler.scale_:.4g}, n = {n}")

        def settings(wd: float) -> TrainConfig:
            """Step size and momentum follow from the curvature and the weight decay."""
            smoothness = curvature + wd
            lr = learning_rate if learning_rate is not None else STEP_SIZE_FRACTION / smoothness
            q = wd / smoothness
            mom = momentum if momentum is not None else min(
                MAX_MOMENTUM, (1 - math.sqrt(q)) / (1 + math.sqrt(q)))
            try:
                return TrainConfig(learning_rate=float(lr), momentum=float(mom),
                                   epochs=int(n_epochs), batch_size=int(batch),
                                   patience=patience, seed=seed,
                                   weight_decay=float(wd)).checked()
            except ValueError as err:
                raise RecipeError(str(err)) from err

        def confirmed(wd: float) -> tuple[TrainConfig, ActivationPlan]:
            config = settings(wd)
            return config, _confirmed_activation(data, config, layout, params, n_classes)

        wd = weight_decay if weight_decay is not None else derived_wd
        try:
            config, activation = confirmed(wd)
            raised = False
        except RangeError as err:
            if weight_decay is not None:
                raise RangeError(f"the given settings leave the approximation intervals: "
                                 f"{err}") from err
            config, activation, wd_why = _raised_weight_decay(
                confirmed, wd, err, logit_bounding_weight_decay(
                    x_train, n_classes, LOGIT_HEADROOM * _ladder(n_classes)[-1]))
            raised = True
        return _AtWidth(dims, data, layout, curvature, steps_per_epoch, config, activation,
                        wd_why, raised)

    # Widest preferred width whose settings keep the probe's prior (a raised prior pulls the
    # head away from the reference); if every one needs a raise, the widest.
    tried = []
    for dims in widths:
        tried.append(derive_at(dims))
        if not tried[-1].raised:
            break
    chosen = next((t for t in tried if not t.raised), tried[0])
    skipped = [t.dims for t in tried if t.raised and t is not chosen]
    note("pca_dims", chosen.dims, pca_dims is not None,
         dims_why + (f"; {skipped} needed a raised prior" if skipped else ""))
    data, layout, curvature = chosen.data, chosen.layout, chosen.curvature
    steps_per_epoch, config, activation = chosen.steps_per_epoch, chosen.config, chosen.activation
    wd_why, dims = chosen.wd_why, chosen.dims

    smoothness = curvature + config.weight_decay
    note("weight_decay", config.weight_decay, weight_decay is not None, wd_why)
    note("learning_rate", config.learning_rate, learning_rate is not None,
         f"{STEP_SIZE_FRACTION} / L, L = {smoothness:.4g} (curvature bound of the loss on "
         "these features)")
    q = config.weight_decay / smoothness
    note("momentum", config.momentum, momentum is not None,
         f"Nesterov's (1 - sqrt q)/(1 + sqrt q) for q = wd / L = {q:.3g}, at most "
         f"{MAX_MOMENTUM}")
    note("batch_size", config.batch_size, given.batch_size is not None,
         f"{-(-config.batch_size // layout.samples_per_ct)} whole data ciphertexts of "
         f"{layout.samples_per_ct} samples ({params.slots} slots / {2 * layout.block}): at "
         f"least {MIN_BATCH} samples a step and at most {STEP_BUDGET // MIN_EPOCHS} steps an "
         "epoch; batches are split evenly")
    note("epochs", config.epochs, given.epochs is not None,
         f"about {STEP_BUDGET} steps at {steps_per_epoch} steps per epoch (between "
         f"{MIN_EPOCHS} and {MAX_EPOCHS})")
    note("logit_bound", activation.logit_bound, False,
         "smallest rung of the ladder with headroom above the exact head's largest logit "
         "slot, confirmed by the mirror's range check")
    if activation.sum_bound is not None:
        note("softmax_sum_bound", activation.sum_bound, False,
             f"{SUM_HEADROOM} x the exact head's largest sum of exponentials, confirmed by "
             "the mirror")
    recipe = Recipe(pca_dims=dims, config=config, activation=activation, probe=probe,
                    choices=choices)
    return data, recipe


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
    return SIGMOID_BOUNDS if n_classes == 2 else EXP_BOUNDS


def _raised_weight_decay(
    confirmed: Callable[[float], tuple[TrainConfig, ActivationPlan]],
    failing: float, err: RangeError, bounding: float,
) -> tuple[TrainConfig, ActivationPlan, str]:
    """Settings with a penalty above `failing` whose logits fit, close to the smallest such.

    A stronger prior shrinks the logits: first raised by the overshoot squared (logits scale
    about linearly with |W|); on nearly separable data they shrink only logarithmically, so
    then the bounding penalty (a fit by construction) and a geometric bisection back down.
    Returns (config, activation, why); RecipeError if even the bounding penalty fails.
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
        for _ in range(WD_BISECTIONS):
            wd = math.sqrt(failing * found[0].weight_decay)
            try:
                found = confirmed(wd)
            except RangeError:
                failing = wd
        how += (f" towards {bounding:.3g}, the penalty under which the optimum's logits fit "
                "the widest interval by construction (nearly separable data)")
    return (*found, f"{how}: with less, the logits leave every approximation interval "
            f"({err})")


def _confirmed_activation(data: PreparedData, config: TrainConfig, layout: PackingLayout,
                          params: CkksParams, n_classes: int) -> ActivationPlan:
    """Intervals from the exact head, confirmed (or widened along the ladder) by the mirror's
    range check; RangeError when the top of the ladder fails too."""
    from medblindtuner.training.plan import RANGE_MARGIN, TrainingPlan

    splits = (data.x["train"], data.y["train"], data.x["val"], data.y["val"])
    exact = train_head(*splits, n_classes, config, layout=layout)
    ladder = _ladder(n_classes)
    if exact.max_abs_logit > RANGE_MARGIN * ladder[-1]:
        err = RangeError(f"the exact head's logits reach {exact.max_abs_logit:.2f}, beyond "
                         f"the widest interval [-{ladder[-1]}, {ladder[-1]}]")
        err.overshoot = exact.max_abs_logit / (LOGIT_HEADROOM * ladder[-1])
        raise err
    sum_bound = None
    if n_classes > 2:
        sum_bound = max(2.0 * n_classes, SUM_HEADROOM * exact.max_softmax_sum)
    failure = ""
    for bound in ladder[_ladder_start(ladder, exact.max_abs_logit / LOGIT_HEADROOM):]:
        activation = ActivationPlan(n_classes=n_classes, logit_bound=bound,
                                    sum_bound=sum_bound)
        plan = TrainingPlan.create(params, data.x["train"], data.x["val"], n_classes, config,
                                   activation)
        try:
            plan.check_ranges(*splits)
            return activation
        except RangeError as err:
            failure = str(err)
            if sum_bound is not None:
                sum_bound *= SUM_HEADROOM
    raise RangeError(failure)
