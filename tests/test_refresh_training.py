"""Encrypted training in refresh mode "hospital" vs its plaintext mirror (insecure test ring).

Same checks and tolerance as tests/test_encrypted_training.py (weights within 2e-3 of the
mirror, validation losses within 1e-3); the refreshes go through the hospital's ledger as
bytes, as they would over the service, and there is no bootstrapping key anywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_he import plan_and_keys, toy_problem

from medblindtuner.cloud.trainer import EncryptedTrainer
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.he.refresh import CloudRefresher
from medblindtuner.hospital.crypto import HospitalJudge, decrypt_weights, encrypt_dataset
from medblindtuner.hospital.refresher import HospitalRefresher
from medblindtuner.training.approx import ActivationPlan
from medblindtuner.training.plain import TrainConfig

WEIGHT_TOL = 2e-3
PARAMS = params_for_mode(HOSPITAL, insecure=True)


def trainer_for(keys, plan, dataset, directory, judge=None) -> EncryptedTrainer:
    stopped = (lambda: judge.stopped) if judge is not None else (lambda: False)
    holder = HospitalRefresher(keys, plan, directory / "hospital", stopped=stopped)
    refresher = CloudRefresher(keys.context, keys.params, keys.public_key, holder, holder.job,
                               directory / "journal")
    evaluator = Evaluator(keys.context, keys.params, keys.public_key, refresher)
    return EncryptedTrainer(evaluator, dataset, directory / "ckpt")


@pytest.mark.parametrize(("n_classes", "n_train", "batch", "epochs", "n_val"),
                         [(2, 150, 64, 3, 30), (2, 300, 300, 2, 30), (5, 64, 64, 2, 30),
                          (2, 150, 150, 2, 30),  # 2 chunks a step: windows of r = d/2 slots
                          (5, 300, 300, 2, 30),
                          # 5 chunks a step (8 places of 1 slot: every slot summed by the
                          # step), 3 validation chunks gathered under one sigmoid
                          (2, 600, 600, 2, 300)])
def test_refresh_mode_matches_mirror(tmp_path, n_classes, n_train, batch, epochs, n_val):
    check_against_mirror(tmp_path, n_classes, n_train, batch, epochs, n_val)


@pytest.mark.parametrize(("n_classes", "n_train", "n_val", "groups"),
                         [(5, 128, 30, (1, 1)),  # 2 chunks: 16 places of 1 slot, gather masks
                          (3, 128, 30, (1, 1)),  # 2 chunks of 4 places of r = 2 slots
                          (4, 192, 30, (1, 1)),  # 3 chunks (4 of 4 places), no gather mask
                          (3, 256, 100, (1, 1)),  # 2 validation chunks gathered too
                          (3, 128, 130, (1, 2)),  # 3 validation chunks: two groups
                          (5, 192, 30, (2, 1))])  # 3 chunks of 8 places: groups of 2 and 1
def test_one_exponential_a_step_matches_mirror(tmp_path, n_classes, n_train, n_val, groups):
    """Several chunks a step share one exponential and one inverse (`compact_softmax`), up to
    d / C of them (`softmax_group`), and the validation chunks alike (`validation_group`)."""
    plan = check_against_mirror(tmp_path, n_classes, n_train, n_train, 2, n_val, dim=15)
    assert plan.chunks_per_step > 1 and plan.compact_softmax and plan.compact_validation
    assert (-(-plan.chunks_per_step // plan.softmax_group),
            -(-len(plan.val_batch_sizes) // plan.validation_group)) == groups
    softmax = plan.softmax_layout  # no key for a validation chunk riding a step: none does
    rides = set(softmax.place_moves([softmax.validation_place]))
    assert not (rides - set(softmax.driver_rotation_indices(False))) & set(plan.rotation_indices)


@pytest.mark.parametrize(("n_classes", "n_train", "batch"),
                         [(2, 150, 64), (2, 150, 150), (5, 192, 192)])
def test_preconditioned_steps_match_mirror(tmp_path, n_classes, n_train, batch):
    """Each feature column steps by lr p_j (`TrainConfig.preconditioned`): the hospital
    encrypts x_grad as x p and the decay 1 - lr wd p_j as a vector the cloud multiplies the
    look-ahead by; a strong decay makes a wrong column visible."""
    plan = check_against_mirror(tmp_path, n_classes, n_train, batch, 2, 30,
                                learning_rate=0.1, weight_decay=0.05, preconditioned=True)
    assert plan.config.preconditioned


def check_against_mirror(tmp_path, n_classes, n_train, batch, epochs, n_val, dim=7,
                         **config_fields):
    """Train in refresh mode on a toy problem; the weights and validation losses must match
    the mirror's and the refreshes and polynomials be the plan's. Returns the plan."""
    data = toy_problem(n_classes, n_train=n_train, n_val=n_val, seed=5, dim=dim)
    lr = 2.0 if n_classes == 2 else 1.0
    config = TrainConfig(**{"learning_rate": lr, "momentum": 0.9, "epochs": epochs,
                            "batch_size": batch, "patience": 3, **config_fields})
    plan, keys = plan_and_keys(n_classes, config, data, base=PARAMS)
    assert keys.params.bootstrap_slots == () and keys.params.refreshed_by_hospital
    mirror = plan.check_ranges(*data)
    judge = HospitalJudge(keys, plan, len(data[3]))
    dataset = encrypt_dataset(keys, plan, *data)
    # each training ciphertext is encrypted where the step first meets it: one sigmoid a
    # step meets all of a chunk below the top; otherwise x_dup one level down, the labels
    # and x_grad where the probabilities are
    levels = plan.train_chunk_levels(keys.params)
    if plan.compact_sigmoid:
        assert levels.x_dup == levels.x_grad == levels.labels > 1
    elif plan.compact_softmax:  # the gather 4 below the top; the labels where the inverse
        # is (degree 27 on the refreshed sums), x_grad after the product and the window mask
        assert (levels.x_dup, levels.labels, levels.x_grad) == (9 - 4 + 1, 5, 7)
    else:  # binary: look-ahead, product, degree-59 sigmoid; softmax: where the spread
        # inverse is (degree-27 inverse on the refreshed denominators, unfold mask)
        assert levels.x_dup == 1
        assert levels.x_grad == levels.labels + 1 == (2 + 6 if n_classes == 2 else 5 + 1)
    for chunk in dataset.train:
        assert chunk.x_dup.GetLevel() == levels.x_dup
        assert chunk.x_grad.GetLevel() == levels.x_grad
        assert {ct.GetLevel() for ct in chunk.labels} == {levels.labels}
    assert {ct.GetLevel() for c in dataset.val for ct in c.files().values()} == {0}
    trainer = trainer_for(keys, plan, dataset, tmp_path, judge)
    state = trainer.train(decide=judge)
    assert state.epoch == epochs
    weights = decrypt_weights(keys, plan, trainer.weights_of_epoch(epochs))
    assert np.max(np.abs(weights - mirror.weights)) < WEIGHT_TOL
    for record in mirror.history:
        assert abs(judge.losses[record["epoch"]] - record["val_loss"]) < 1e-3
    ops = trainer.ev.ops
    assert ops["refreshes"] == ops["bootstraps"] <= plan.max_refreshes
    if n_classes == 2:  # several chunks a step: their logits share one refresh and sigmoid
        assert plan.compact_sigmoid == (plan.chunks_per_step > 1)
        assert ops["refreshes"] == plan.max_refreshes
        validation = len(plan.val_batch_sizes)
        assert ops["polynomial_evaluations"] == (
            state.steps * (1 if plan.compact_sigmoid else plan.chunks_per_step)
            + epochs * (1 if validation > 1 else validation))
    assert plan.compact_softmax == (n_classes > 2 and plan.softmax_period > 0)
    if plan.compact_softmax:  # one exponential and one inverse (and two refreshes) a group
        # of a step's chunks and of the validation chunks, whatever their number
        groups = epochs * (sum(-(-len(plan.batch_chunks(b)) // plan.softmax_group)
                               for b in range(len(plan.train_batch_sizes)))
                           + -(-len(plan.val_batch_sizes) // plan.validation_group))
        assert ops["refreshes"] == state.steps + 2 * groups == plan.max_refreshes
        assert ops["polynomial_evaluations"] == 2 * groups
    assert not any(key.startswith("bootstraps_") for key in ops.counts)  # no OpenFHE bootstrap
    return plan


def test_saturating_exponential_fits_a_refreshed_step(tmp_path):
    """Refresh mode: the saturating exp's extra level fits between two refreshes (the
    refreshed denominators meet x_grad first, the exponentials one product later)."""
    data = toy_problem(5, n_train=64, n_val=30, seed=5)
    config = TrainConfig(learning_rate=16.0, momentum=0.9, epochs=3, batch_size=64,
                         patience=3)
    plan, keys = plan_and_keys(5, config, data, base=PARAMS,
                               activation=ActivationPlan.softmax_for(5, 12.0))
    mirror = plan.check_ranges(*data)
    assert mirror.max_abs_logit > 8.0 and plan.activation.exp_saturated
    judge = HospitalJudge(keys, plan, len(data[3]))
    trainer = trainer_for(keys, plan, encrypt_dataset(keys, plan, *data), tmp_path, judge)
    trainer.train(decide=judge)
    weights = decrypt_weights(keys, plan, trainer.weights_of_epoch(3))
    assert np.max(np.abs(weights - mirror.weights)) < WEIGHT_TOL
    for record in mirror.history:
        assert abs(judge.losses[record["epoch"]] - record["val_loss"]) < 1e-3


@pytest.mark.parametrize("batch", [64, 150])  # one chunk a step; two (compact sigmoid)
def test_refresh_mode_resumes_with_the_same_weights(tmp_path, batch):
    """Killed after epoch 1's checkpoint and again in the middle of a refresh (answered by the
    hospital, never received): the re-run finishes with the uninterrupted run's weights."""
    data = toy_problem(2, n_train=150, n_val=30, seed=4)
    config = TrainConfig(learning_rate=2.0, momentum=0.9, epochs=2, batch_size=batch,
                         patience=3)
    plan, keys = plan_and_keys(2, config, data, base=PARAMS)
    assert plan.compact_sigmoid == (batch > plan.layout.samples_per_ct)
    dataset = encrypt_dataset(keys, plan, *data)
    straight = trainer_for(keys, plan, dataset, tmp_path / "straight")
    straight.train()
    first = trainer_for(keys, plan, dataset, tmp_path / "resumed")
    first.train(stop_after_epochs=1)
    crashing = trainer_for(keys, plan, dataset, tmp_path / "resumed")
    holder = crashing.ev.refresher.key_holder

    def answered_then_killed(request: bytes) -> bytes:
        holder(request)
        raise KeyboardInterrupt("killed between the hospital's answer and its receipt")

    crashing.ev.refresher.key_holder = answered_then_killed
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    resumed = trainer_for(keys, plan, dataset, tmp_path / "resumed")
    state = resumed.train()
    assert state.epoch == 2 and state.steps == straight.state.steps
    a, b = (decrypt_weights(keys, plan, t.weights) for t in (straight, resumed))
    assert np.max(np.abs(a - b)) < WEIGHT_TOL


def test_api_trains_in_refresh_mode_through_the_hospital_ledger(tmp_path):
    """The Python API with a local cloud: refresh mode "hospital" by default, every refresh
    answered by the hospital folder's ledger (and only the planned number)."""
    from medblindtuner import EncryptedHeadClassifier
    from medblindtuner.hospital.refresher import HospitalRefresher

    x, y, x_val, y_val = toy_problem(2, n_train=150, n_val=40, seed=3)
    clf = EncryptedHeadClassifier(insecure_test_params=True, workdir=tmp_path, pca_dims=0,
                                  epochs=2)
    clf.fit(x[:, :-1], y, x_val[:, :-1], y_val)
    hospital = clf.hospital_
    assert hospital.params.refresh == "hospital" and hospital.params.bootstrap_slots == ()
    ledger = HospitalRefresher(hospital.keys, hospital.plan, hospital.folder.refresh_state)
    assert 0 < ledger.answered <= hospital.plan.max_refreshes
    assert clf.score(x_val[:, :-1], y_val) > 0.8
