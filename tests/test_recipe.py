"""The hospital's derived settings: a reference probe, and defaults that pass the range check
on data they were not tuned on (synthetic scales and class balances, an image folder)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA

from medblindtuner.data.dataset import Dataset
from medblindtuner.experiment import reference_runs, run_plain
from medblindtuner.features.backbones import BackboneInfo
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import (
    BOOTSTRAP,
    HOSPITAL,
    INSECURE_TEST,
    PRODUCTION,
    params_for_mode,
)
from medblindtuner.hospital.budget import (
    MIN_BATCH,
    MIN_EPOCHS,
    affordable_epochs,
    chunks_per_step,
    derived_batch_size,
    epoch_seconds,
    epoch_work,
)
from medblindtuner.hospital.recipe import (
    EXP_BOUNDS,
    LOGIT_HEADROOM,
    SATURATED_EXP_BOUNDS,
    SIGMOID_BOUNDS,
    Overrides,
    RecipeError,
    derive_recipe,
    logit_bounding_weight_decay,
)
from medblindtuner.hospital.reference import fit_probe, published_run
from medblindtuner.hospital.widths import PCA_CANDIDATES, choose_pca_dims
from medblindtuner.training.approx import RangeError
from medblindtuner.training.plain import TrainConfig
from medblindtuner.training.plan import TrainingPlan


def synthetic_features(n: int, dim: int, n_classes: int, scale: float, shift: float,
                       weights: list[float], separation: float = 1.5, seed: int = 0,
                       name: str = "synthetic") -> FeatureSet:
    """Gaussian classes with unequal priors, features of an arbitrary scale and offset."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation, (n_classes, dim))
    splits = {}
    for split, size in (("train", n), ("val", n // 4), ("test", n // 4)):
        labels = rng.choice(n_classes, size=size, p=np.asarray(weights) / np.sum(weights))
        labels[:n_classes] = np.arange(n_classes)  # every class present in every split
        x = means[labels] + rng.normal(0, 1, (size, dim)) * rng.uniform(0.2, 3.0, dim)
        splits[split] = ((scale * x + shift).astype(np.float32), labels.astype(np.int64))
    info = BackboneInfo(name="synthetic", arch="none", feature_dim=dim, weights_source="test",
                        weights_sha256="-", pretrained=False, input_size=28,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return FeatureSet(dataset_name=name, dataset_md5="-", n_classes=n_classes,
                      splits=splits, backbone=info)


def check_plan(data, recipe, params=PRODUCTION):
    """The recipe hands on the plan it checked (Hospital.prepare writes that one): the plan
    of its settings, and it passes the range check."""
    plan = TrainingPlan.create(params, data.x["train"], data.x["val"], data.n_classes,
                               recipe.config, recipe.activation)
    assert recipe.plan == plan
    return recipe.plan.check_ranges(data.x["train"], data.y["train"], data.x["val"],
                                    data.y["val"])


@pytest.mark.parametrize("n_classes,scale,shift,weights", [
    (2, 1000.0, -50.0, [0.9, 0.1]),     # large raw scale, 9:1 imbalance
    (2, 1e-3, 3.0, [0.5, 0.5]),         # tiny scale, big offset
    (4, 30.0, 0.0, [0.55, 0.25, 0.15, 0.05]),
    (7, 1.0, 0.0, [1.0] * 7),
])
def test_defaults_pass_the_range_check_on_unseen_data(n_classes, scale, shift, weights):
    features = synthetic_features(600, 160, n_classes, scale, shift, weights)
    data, recipe = derive_recipe(features, PRODUCTION)
    mirror = check_plan(data, recipe)  # raises RangeError if the product's choice is refused
    assert mirror.max_abs_logit <= 0.9 * recipe.activation.logit_bound
    ladder = SIGMOID_BOUNDS if n_classes == 2 else EXP_BOUNDS + SATURATED_EXP_BOUNDS
    assert recipe.activation.logit_bound in ladder
    assert recipe.pca_dims in PCA_CANDIDATES
    assert all(c.source == "derived" for c in recipe.choices)
    # the encrypted model's plaintext twin is not far below the probe on easy data
    runs = run_plain(data, recipe.config, recipe.activation)
    assert runs["mirror"]["test"]["acc"] >= recipe.probe.test["acc"] - 0.08


def test_nearly_separable_classes_keep_the_probes_prior():
    """Classes far apart: logits beyond the plain exp's [-7, 7] are met by the saturating
    exponential, so the probe's own penalty is kept."""
    features = synthetic_features(3000, 63, 4, 1.0, 0.0, [1.0] * 4, separation=6.0, seed=3)
    data, recipe = derive_recipe(features, PRODUCTION, Overrides(pca_dims=0))
    mirror = check_plan(data, recipe)
    assert EXP_BOUNDS[-1] < mirror.max_abs_logit <= recipe.activation.logit_bound
    assert recipe.activation.exp_saturated
    assert "raised" not in {c.name: c.why for c in recipe.choices}["weight_decay"]
    runs = run_plain(data, recipe.config, recipe.activation)
    assert runs["mirror"]["test"]["acc"] >= 0.95


def test_a_saturating_head_plans_its_epochs_at_its_own_cost(monkeypatch):
    """Were the saturating exponential's chunks 1000x dearer, the allowance would buy the
    minimum of 2 epochs, and the recipe and its plan keep that many."""
    from medblindtuner.hospital import budget

    monkeypatch.setattr(budget, "SATURATED_EXP_CHUNK_COST", 1000.0)
    features = synthetic_features(3000, 63, 4, 1.0, 0.0, [1.0] * 4, separation=6.0, seed=3)
    _data, recipe = derive_recipe(features, PRODUCTION, Overrides(pca_dims=0))
    assert recipe.activation.exp_saturated
    assert recipe.config.epochs == recipe.plan.config.epochs == MIN_EPOCHS


def test_nearly_separable_data_is_not_refused(monkeypatch):
    """Classes far apart and only the plain exp's ladder: raising the prior by the overshoot
    barely shrinks the logits, so the recipe bisects down from the penalty that bounds them by
    construction, and keeps a penalty far below that bound."""
    from medblindtuner.hospital import recipe as recipe_module

    monkeypatch.setattr(recipe_module, "SATURATED_EXP_BOUNDS", ())
    features = synthetic_features(3000, 63, 4, 1.0, 0.0, [1.0] * 4, separation=6.0, seed=3)
    data, recipe = derive_recipe(features, PRODUCTION, Overrides(pca_dims=0))
    mirror = check_plan(data, recipe)
    assert mirror.max_abs_logit <= recipe.activation.logit_bound
    why = {c.name: c.why for c in recipe.choices}["weight_decay"]
    assert "by construction" in why
    bounding = logit_bounding_weight_decay(data.x["train"], 4, LOGIT_HEADROOM * EXP_BOUNDS[-1])
    assert recipe.config.weight_decay < bounding / 8
    runs = run_plain(data, recipe.config, recipe.activation)
    assert runs["mirror"]["test"]["acc"] >= 0.95  # still an (almost) perfect classifier


def test_given_settings_are_kept_and_refused_when_out_of_range():
    features = synthetic_features(400, 40, 2, 1.0, 0.0, [0.5, 0.5], separation=3.0)
    data, recipe = derive_recipe(features, PRODUCTION, Overrides(pca_dims=0, epochs=3,
                                                                 batch_size=100))
    assert recipe.pca_dims is None and data.x["train"].shape[1] == 41
    assert recipe.config.epochs == 3 and recipe.config.batch_size == 100
    given = {c.name: c.source for c in recipe.choices}
    assert given["epochs"] == "given" and given["learning_rate"] == "derived"
    with pytest.raises(RangeError, match="given settings"):
        derive_recipe(features, PRODUCTION, Overrides(learning_rate=30.0, weight_decay=0.0,
                                                      epochs=5))
    with pytest.raises(RecipeError, match="must stay below 1"):
        derive_recipe(features, PRODUCTION, Overrides(learning_rate=1e6, weight_decay=0.1))


def test_derived_batches_are_whole_ciphertexts_and_split_evenly():
    features = synthetic_features(1030, 20, 3, 1.0, 0.0, [1, 1, 1])
    data, recipe = derive_recipe(features, INSECURE_TEST)
    plan = TrainingPlan.create(INSECURE_TEST, data.x["train"], data.x["val"], 3,
                               recipe.config, recipe.activation)
    per_ct = plan.layout.samples_per_ct
    assert recipe.config.batch_size == per_ct * -(-MIN_BATCH // per_ct)  # 16 of 32
    sizes = plan.train_batch_sizes
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1030
    assert plan.chunks_per_step == 11  # 344 samples a step


def test_large_datasets_take_bigger_steps():
    """At most MAX_STEPS_PER_EPOCH steps an epoch: 20,000 samples at 128 per ciphertext need
    11 of them a step, binary or softmax (whose denominators share bootstraps in groups)."""
    layout = PackingLayout(INSECURE_TEST.slots, 8)
    assert layout.samples_per_ct == 128
    assert derived_batch_size(20_000, layout, 2) == 11 * 128
    assert derived_batch_size(20_000, layout, 5) == 11 * 128
    assert derived_batch_size(100, layout, 2) == 128  # never more than the data holds


def test_epochs_run_until_the_validation_loss_stops_within_the_allowance():
    """Epochs come from the data (the exact head's early stop), capped by what the time
    allowance buys: a large allowance on a slowly converging set gives more epochs than a
    fixed step budget's 3, a tiny allowance gives MIN_EPOCHS."""
    features = synthetic_features(6000, 60, 2, 1.0, 0.0, [0.5, 0.5], separation=0.4)
    data, recipe = derive_recipe(features, PRODUCTION, Overrides(pca_dims=31,
                                                                 time_allowance_h=2.0))
    layout = PackingLayout(PRODUCTION.slots, 32)
    cap = affordable_epochs(6000, 1500, layout, 2, hours=2.0)
    why = {c.name: c.why for c in recipe.choices}["epochs"]
    assert MIN_EPOCHS <= recipe.config.epochs <= cap and "allowance" in why
    exact = run_plain(data, recipe.config, recipe.activation)["plaintext"]
    assert recipe.config.epochs > 3 and exact["best_epoch"] >= 2
    _, short = derive_recipe(features, PRODUCTION, Overrides(pca_dims=31,
                                                             time_allowance_h=1e-4))
    assert short.config.epochs == MIN_EPOCHS
    assert epoch_seconds(6000, 1500, layout, 2) * MIN_EPOCHS > 3600 * 1e-4


def test_probe_and_published_reference():
    features = synthetic_features(300, 30, 2, 1.0, 0.0, [0.5, 0.5], separation=2.0)
    probe = fit_probe(features.splits, 2)
    assert probe.test["acc"] > 0.9 and probe.c > 0
    assert published_run("BreastMNIST")["test"] == {"acc": 0.863, "auc": 0.901}
    assert published_run("my-folder") is None
    data, recipe = derive_recipe(features, PRODUCTION)
    runs = reference_runs(data, recipe)
    assert set(runs) == {"probe"} and runs["probe"]["c"] == probe.c


def test_defaults_pass_on_an_image_folder(tmp_path, feature_cache_dir):
    """A user's own image folder (3 classes of real retina images, saved as PNG files)."""
    if not (SHARED_DATA / "retinamnist.npz").exists():
        pytest.skip("RetinaMNIST not available in ../shared/data/medmnist")
    from PIL import Image

    from medblindtuner.data import load_image_folder
    from medblindtuner.features import extract_features

    with np.load(SHARED_DATA / "retinamnist.npz") as z:
        images, labels = z["train_images"], z["train_labels"].reshape(-1)
    for cls, name in ((0, "normal"), (2, "moderate"), (4, "proliferative")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(labels == cls)[:40]):
            Image.fromarray(images[index]).save(tmp_path / "imgs" / name / f"{i}.png")
    dataset: Dataset = load_image_folder(tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2)
    features = extract_features(dataset, backbone="efficientnet_lite0",
                                cache_dir=feature_cache_dir, progress=False)
    data, recipe = derive_recipe(features, PRODUCTION)
    check_plan(data, recipe)
    assert data.n_classes == 3 and recipe.activation.sum_bound is not None


def test_width_rule_weighs_every_affordable_width_and_takes_the_widest_tied():
    """Every candidate width whose MIN_EPOCHS encrypted epochs fit the time allowance is
    weighed; widths the validation split cannot tell apart go to the widest one; the recipe
    takes the first preferred width whose settings keep the probe's prior."""
    features = synthetic_features(1000, 600, 2, 1.0, 0.0, [0.5, 0.5], separation=0.15)
    probe = fit_probe(features.splits, 2)
    preferred, why = choose_pca_dims(features, 2, probe.c, PRODUCTION.slots)
    tied = [int(k) for k in why.split("tied: [")[1].split("]")[0].split(", ")]
    assert "511:" in why.split("tied:")[0]  # 511 was weighed (the old rule stopped at 63)
    assert len(tied) >= 2 and preferred == sorted(tied, reverse=True)
    _, recipe = derive_recipe(features, PRODUCTION, Overrides(time_allowance_h=2.0))
    assert recipe.pca_dims == preferred[0]  # the widest keeps the prior on this data
    # the default allowance (bootstrap mode's costs) cuts the widest short while its twin
    # still improves: the widest tied width whose early stop fits it is taken instead
    _, quick = derive_recipe(features, PRODUCTION)
    why = {c.name: c.why for c in quick.choices}["pca_dims"]
    assert quick.pca_dims in tied and quick.pca_dims < preferred[0]
    assert "still improved when the time allowance ran out" in why
    # a tiny allowance leaves only the narrowest width
    narrow, _ = choose_pca_dims(features, 2, probe.c, PRODUCTION.slots, hours=1e-3)
    assert narrow == [31]


def test_epoch_work_counts_chunk_passes_and_steps():
    """Doubling the width doubles the chunk passes, not the steps (BreastMNIST's sizes)."""
    narrow, wide = (epoch_work(546, 78, PackingLayout(PRODUCTION.slots, k + 1), 2)
                    for k in (255, 511))
    assert narrow < wide < 2 * narrow
    assert epoch_work(1080, 120, PackingLayout(PRODUCTION.slots, 32), 5) > 0


def test_a_softmax_chunk_costs_in_proportion_to_its_classes(monkeypatch):
    """A chunk's work is per class diagonal: at the same layout and sizes, 10 classes are
    twice the chunk passes of 5 (measured 26.63 against 14.1 s a step), the steps' serial
    work is not scaled (an exponential a chunk: one a step is tested below)."""
    from medblindtuner.hospital import budget

    monkeypatch.setattr(budget, "compact_softmax_group", lambda *args: 0)

    layout = PackingLayout(PRODUCTION.slots, 64)
    passes = sum(budget.batch_chunks(2000, layout, 5)) + -(-500 // layout.samples_per_ct)
    five, ten = (epoch_work(2000, 500, layout, c, HOSPITAL) for c in (5, 10))
    assert ten - five == pytest.approx(passes)
    assert epoch_seconds(2000, 500, layout, 10, HOSPITAL) > 1.8 * epoch_seconds(
        2000, 500, layout, 5, HOSPITAL)


def test_the_saturating_exponential_costs_more_and_buys_fewer_epochs(monkeypatch):
    """Its degree-27 series makes a softmax chunk ~16 % dearer (benchmarks/scale.py): the
    passes are scaled, the steps' serial work is not, and the same allowance buys fewer
    epochs; a recipe that picks it plans with that cost (an exponential a chunk)."""
    from medblindtuner.hospital import budget

    monkeypatch.setattr(budget, "compact_softmax_group", lambda *args: 0)

    layout = PackingLayout(PRODUCTION.slots, 32)
    plain, wide = (epoch_work(7000, 1000, layout, 7, HOSPITAL, saturated=s) for s in (0, 1))
    passes = (sum(budget.batch_chunks(7000, layout, 7)) + -(-1000 // layout.samples_per_ct))
    assert wide - plain == pytest.approx(passes * 7 / 5 * (budget.SATURATED_EXP_CHUNK_COST - 1))
    hours = 0.5
    assert affordable_epochs(7000, 1000, layout, 7, hours, HOSPITAL, saturated=True) < \
        affordable_epochs(7000, 1000, layout, 7, hours, HOSPITAL)


@pytest.mark.parametrize("n_classes", [3, 5, 10])
@pytest.mark.parametrize("n_val", [1000, 300])  # 4 validation chunks; 2
def test_one_exponential_a_step_is_planned_at_its_own_cost(monkeypatch, n_classes, n_val):
    """Refresh mode "hospital", where the plan takes one exponential a step: its training and
    validation chunks and its gathered groups at their measured cost, below the cost of an
    exponential a chunk; bootstrap mode is unchanged. The budget's rules are the plan's."""
    from medblindtuner.hospital import budget

    params = params_for_mode(HOSPITAL)
    layout = PackingLayout(params.slots, 32)
    chunks = budget.batch_chunks(7000, layout, n_classes)
    x = np.zeros((7000, 32))
    plan = TrainingPlan.create(params, x, x[:n_val], n_classes, TrainConfig(
        learning_rate=1.0, batch_size=budget.derived_batch_size(7000, layout, n_classes)))
    assert plan.chunks_per_step == max(chunks) and plan.compact_softmax
    val = len(plan.val_batch_sizes)
    groups = (sum(-(-c // plan.softmax_group) for c in chunks)
              + -(-val // plan.validation_group))
    compact = epoch_work(7000, n_val, layout, n_classes, HOSPITAL)
    assert compact == pytest.approx(n_classes / 5 * budget.COMPACT_SOFTMAX_CHUNK_COST
                                    * (sum(chunks) + val)
                                    + groups * budget.COMPACT_SOFTMAX_STEP_COST)
    bootstrap = epoch_work(7000, n_val, layout, n_classes, BOOTSTRAP)
    monkeypatch.setattr(budget, "compact_softmax_group", lambda *args: 0)
    assert compact < epoch_work(7000, n_val, layout, n_classes, HOSPITAL)
    assert bootstrap == epoch_work(7000, n_val, layout, n_classes, BOOTSTRAP)


def test_epoch_work_counts_each_extra_denominator_group(monkeypatch):
    """50,000 samples, 5 classes at PCA 31: 7 chunks a step, refreshed in groups of 4 (the
    2048-slot cap, two places per compact period), so each step pays 1 more denominator
    bootstrap."""
    from medblindtuner.hospital import budget

    layout = PackingLayout(PRODUCTION.slots, 32)
    with_groups = epoch_work(50_000, 5_000, layout, 5)
    per_group = budget.EXTRA_DENOMINATOR_GROUP_IN_CHUNKS[BOOTSTRAP]
    monkeypatch.setattr(budget, "EXTRA_DENOMINATOR_GROUP_IN_CHUNKS",
                        {mode: 0.0 for mode in budget.EXTRA_DENOMINATOR_GROUP_IN_CHUNKS})
    without = epoch_work(50_000, 5_000, layout, 5)
    batches = budget.batch_chunks(50_000, layout, 5)
    assert max(batches) == 7
    extra = sum(-(-c // 4) - 1 for c in batches)
    assert extra == len(batches)
    assert with_groups - without == pytest.approx(per_group * extra)


def test_softmax_width_rule_adds_no_chunks_to_a_step():
    """A softmax step bootstraps the denominators of all its chunks at once (its memory grows
    with them): a wider tied width is preferred only if a step keeps its chunk count."""
    features = synthetic_features(1100, 300, 5, 1.0, 0.0, [1.0] * 5, separation=0.1)
    probe = fit_probe(features.splits, 5)
    preferred, why = choose_pca_dims(features, 5, probe.c, PRODUCTION.slots)
    tied = [int(k) for k in why.split("tied: [")[1].split("]")[0].split(", ")]
    n_train = len(features.splits["train"][1])

    def layout(k):
        return PackingLayout(PRODUCTION.slots, k + 1)

    fewest = min(chunks_per_step(n_train, layout(k), 5) for k in tied)
    assert preferred and all(chunks_per_step(n_train, layout(k), 5) == fewest
                             for k in preferred)
