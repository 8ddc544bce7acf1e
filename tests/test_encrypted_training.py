"""Encrypted training vs its plaintext mirror (insecure test ring; binary and 5-class heads).

Tolerance: decrypted weights within 2e-3 of the mirror's (CKKS noise ~1e-5 per sparse bootstrap,
accumulated over the steps; measured ~1e-4 for these runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers_he import plan_and_keys, toy_problem

from medblindtuner.cloud.trainer import EncryptedTrainer
from medblindtuner.he.engine import Evaluator
from medblindtuner.hospital.crypto import HospitalJudge, decrypt_weights, encrypt_dataset
from medblindtuner.training.approx import ActivationPlan, RangeError
from medblindtuner.training.artifacts import EncryptedDataset
from medblindtuner.training.plain import TrainConfig, train_head
from medblindtuner.training.plan import Decision

WEIGHT_TOL = 2e-3
CONFIG = TrainConfig(learning_rate=2.0, momentum=0.9, epochs=3, batch_size=64, patience=3)


@pytest.fixture(scope="module")
def setup():
    data = toy_problem(2, n_train=150, n_val=50, seed=4)
    plan, keys = plan_and_keys(2, CONFIG, data)
    dataset = encrypt_dataset(keys, plan, *data)
    return data, plan, keys, dataset


def make_trainer(keys, dataset, directory):
    trainer = EncryptedTrainer(Evaluator(keys.context, keys.params, keys.public_key), dataset,
                               directory)
    return trainer


def train_and_check_mirror(n_classes, data, config, directory, denominator_chunks=None,
                           activation=None, loss_tol=1e-3, weight_tol=WEIGHT_TOL):
    """Train to the end with the hospital's judge; the last epoch's weights and every
    validation loss must match the plaintext mirror. Returns (plan, trainer, state)."""
    plan, keys = plan_and_keys(n_classes, config, data, denominator_chunks,
                               activation=activation)
    mirror = plan.check_ranges(*data)
    trainer = make_trainer(keys, encrypt_dataset(keys, plan, *data), directory)
    judge = HospitalJudge(keys, plan, len(data[3]))
    state = trainer.train(decide=judge)
    weights = decrypt_weights(keys, plan, trainer.weights_of_epoch(config.epochs))
    assert np.max(np.abs(weights - mirror.weights)) < weight_tol
    for record in mirror.history:
        assert abs(judge.losses[record["epoch"]] - record["val_loss"]) < loss_tol
    return plan, trainer, state


def test_one_step_equals_mirror(setup, tmp_path):
    data, plan, keys, dataset = setup
    trainer = make_trainer(keys, dataset, tmp_path)
    trainer.initialise_or_resume()
    first = int(np.random.default_rng([plan.config.seed, 1]).permutation(
        len(plan.train_batch_sizes))[0])
    trainer.step(first)
    one_step = TrainConfig(**{**CONFIG.to_dict(), "epochs": 1})
    # mirror of exactly that step: train one epoch with one batch == the same first batch
    x, y = data[0], data[1]
    from medblindtuner.training.plain import make_batches
    idx = make_batches(len(x), plan.config.batch_size, plan.config.seed)[first]
    w = np.zeros((1, x.shape[1]))
    look = w  # (1 + m) 0 - m 0
    logits = x[idx] @ look.T
    probs = plan.activation.probabilities(logits)
    expected = look - (one_step.learning_rate / len(idx)) * (probs - y[idx, None]).T @ x[idx]
    got = decrypt_weights(keys, plan, trainer.weights)
    assert np.max(np.abs(got - expected)) < WEIGHT_TOL
    assert trainer.ev.ops["bootstraps"] == 1  # one refresh per step for a binary head


def test_training_converges_and_matches_mirror(setup, tmp_path):
    data, plan, keys, dataset = setup
    trainer = make_trainer(keys, dataset, tmp_path)
    judge = HospitalJudge(keys, plan, len(data[3]))
    state = trainer.train(decide=judge)
    mirror = train_head(*data, 2, plan.config, activation=plan.activation, layout=plan.layout)
    assert state.best_epoch == mirror.best_epoch
    for record in mirror.history:
        assert abs(judge.losses[record["epoch"]] - record["val_loss"]) < 1e-3
    assert judge.losses[state.epoch] < 0.5 * 0.25  # Brier well below the untrained 0.25
    weights = decrypt_weights(keys, plan, trainer.weights_of_epoch(state.best_epoch))
    assert np.max(np.abs(weights - mirror.weights)) < WEIGHT_TOL


def test_resume_after_interruption_gives_same_weights(setup, tmp_path):
    data, plan, keys, dataset = setup
    straight = make_trainer(keys, dataset, tmp_path / "straight")
    straight.train()
    interrupted = make_trainer(keys, dataset, tmp_path / "resumed")
    interrupted.train(stop_after_epochs=1)  # "killed" after the first epoch's checkpoint
    resumed = make_trainer(keys, dataset, tmp_path / "resumed")
    assert resumed.initialise_or_resume() and resumed.state.epoch == 1
    state = resumed.train()
    assert state.epoch == plan.config.epochs and state.steps == straight.state.steps
    a = decrypt_weights(keys, plan, straight.weights)
    b = decrypt_weights(keys, plan, resumed.weights)
    # Same schedule and state; only CKKS noise differs (a reloaded ciphertext bootstraps with a
    # different ~1e-5 approximation error), so the runs agree to the weight tolerance.
    assert np.max(np.abs(a - b)) < WEIGHT_TOL


def test_trainer_runs_with_only_the_public_bundle(setup, tmp_path):
    data, plan, keys, dataset = setup
    keys.save_public_bundle(tmp_path / "bundle")
    dataset.save(tmp_path / "data", keys.params)
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from medblindtuner.he.keys import CloudCrypto
        from medblindtuner.he.engine import Evaluator
        from medblindtuner.training.artifacts import EncryptedDataset
        from medblindtuner.cloud.trainer import EncryptedTrainer
        cloud = CloudCrypto.load({str(tmp_path / 'bundle')!r}, allow_insecure=True)
        data = EncryptedDataset.load(Path({str(tmp_path / 'data')!r}), cloud.params)
        trainer = EncryptedTrainer(Evaluator(cloud.context, cloud.params, cloud.public_key), data,
                                   Path({str(tmp_path / 'ckpt')!r}))
        state = trainer.train()
        print(json.dumps({{"epoch": state.epoch, "ops": trainer.ev.ops.snapshot()}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["epoch"] == plan.config.epochs
    assert report["ops"]["bootstraps"] == report["ops"]["bootstraps_8_slots"]
    cloud_trainer = make_trainer(keys, EncryptedDataset.load(tmp_path / "data", keys.params),
                                 tmp_path / "ckpt")
    weights = decrypt_weights(keys, plan, cloud_trainer.weights_of_epoch(plan.config.epochs))
    # fixed-epoch mode ends at the last epoch; on this problem the mirror's best is the last
    mirror = train_head(*data, 2, plan.config, activation=plan.activation)
    assert mirror.best_epoch == plan.config.epochs
    assert np.max(np.abs(weights - mirror.weights)) < WEIGHT_TOL


def test_streamed_dataset_trains_like_the_one_in_memory(setup, tmp_path):
    """A dataset too large to keep is read chunk by chunk at each step: same weights, and
    the training chunks are not held between steps."""
    _, plan, keys, dataset = setup
    from medblindtuner.hospital.crypto import write_encrypted_dataset
    from medblindtuner.training.artifacts import StoredChunks
    write_encrypted_dataset(tmp_path / "data", keys, plan, *setup[0])
    streamed = EncryptedDataset.load(tmp_path / "data", keys.params, resident=False)
    assert isinstance(streamed.train, StoredChunks) and not streamed.train.resident
    assert len(streamed.train) == len(dataset.train)
    assert streamed.train[0] is not streamed.train[0]  # read again, not kept
    results = []
    for name, data in (("memory", dataset), ("streamed", streamed)):
        trainer = make_trainer(keys, data, tmp_path / name)
        trainer.initialise_or_resume()
        for batch in range(len(plan.train_batch_sizes)):
            trainer.step(batch)
        results.append(decrypt_weights(keys, plan, trainer.weights))
    # the two datasets are separate encryptions of the same arrays, so they differ by CKKS noise
    # (seen up to 1.2e-4 after the steps); a chunk read out of place moves weights far more
    assert np.max(np.abs(results[0] - results[1])) < WEIGHT_TOL


def test_dataset_adopted_at_load_is_not_copied_by_the_trainer(setup, tmp_path):
    """Loaded with the trainer's `adopt`, a resident dataset is held once: the trainer keeps
    that very object, and its ciphertexts are the adopted ones (re-homed: an add of zero)."""
    _, plan, keys, dataset = setup
    dataset.save(tmp_path / "data", keys.params)
    evaluator = Evaluator(keys.context, keys.params, keys.public_key)
    loaded = EncryptedDataset.load(tmp_path / "data", keys.params, resident=True,
                                   adopt=evaluator.adopt)
    first = loaded.train[0].x_dup
    assert loaded.train[0].x_dup is first  # kept, not read again
    trainer = EncryptedTrainer(evaluator, loaded, tmp_path / "ckpt")
    assert trainer.data is loaded
    plain = EncryptedDataset.load(tmp_path / "data", keys.params, resident=True)
    assert EncryptedTrainer(evaluator, plain, tmp_path / "ckpt2").data is not plain
    assert np.allclose(keys.decrypt(first)[:8], keys.decrypt(plain.train[0].x_dup)[:8],
                       atol=1e-6)


def test_tampered_dataset_is_refused(setup, tmp_path):
    _, _, keys, dataset = setup
    dataset.save(tmp_path / "data", keys.params)
    victim = sorted((tmp_path / "data").glob("train_*_x_dup.bin"))[0]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    from medblindtuner.he.keys import BundleError
    with pytest.raises(BundleError, match="checksum"):
        EncryptedDataset.load(tmp_path / "data", keys.params)


def test_plan_range_check_refuses_divergent_settings(setup):
    data, plan, _, _ = setup
    from medblindtuner.he.params import INSECURE_TEST
    from medblindtuner.training.plan import TrainingPlan
    hot = TrainingPlan.create(INSECURE_TEST, data[0], data[2], 2,
                              TrainConfig(learning_rate=500.0, epochs=3, batch_size=64))
    with pytest.raises(RangeError):
        hot.check_ranges(*data)


def test_plan_hints_at_part_empty_ciphertexts():
    """A batch smaller than a ciphertext holds costs a full step: the plan says so."""
    from medblindtuner.he.params import INSECURE_TEST
    from medblindtuner.training.plan import TrainingPlan
    x_train, _, x_val, _ = toy_problem(2, n_train=200, dim=7)  # 8 features: 128 per ct
    def plan(batch: int) -> TrainingPlan:
        config = TrainConfig(learning_rate=1.0, epochs=1, batch_size=batch)
        return TrainingPlan.create(INSECURE_TEST, x_train, x_val, 2, config)
    assert plan(128).layout.samples_per_ct == 128
    hint = plan(32).batch_hint()
    assert hint is not None and "25%" in hint and "over 128" in hint
    assert plan(128).batch_hint() is None
    assert plan(1000).batch_hint() is None  # a batch of several ciphertexts
    assert plan(1000).chunks_per_step == 2 and plan(1000).train_batch_sizes == (200,)


def test_softmax_training_matches_mirror(tmp_path):
    """5-class softmax, class-diagonal layout (masked diagonals, 5 of them, not 8): 2 sparse
    bootstraps per step (model + 1/S)."""
    data = toy_problem(5, n_train=64, n_val=30, seed=5)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=64, patience=2)
    plan, trainer, _ = train_and_check_mirror(5, data, config, tmp_path)
    softmax = plan.softmax_layout
    steps = 2 * len(plan.train_batch_sizes)
    ops = trainer.ev.ops
    # model and denominators share one slot count; epoch 1's validation rode in epoch 2's
    # first denominator bootstrap, epoch 2's (the last) needs its own
    assert plan.bootstrap_slots == (softmax.bootstrap_period,)
    assert plan.label_cts == 5 and not softmax.cyclic
    assert ops[f"bootstraps_{softmax.bootstrap_period}_slots"] == 2 * steps + 1
    assert ops["bootstraps"] == 2 * steps + 1


def test_saturating_exponential_on_a_wide_interval_matches_mirror(tmp_path):
    """A softmax head on [-12, 12]: the saturating exp (degree 27, one level more than the
    plain one) and the inverse of its sums fit the step's levels, masked diagonals included,
    and the logits go past where it bends away from e^x."""
    data = toy_problem(5, n_train=64, n_val=30, seed=5)
    config = TrainConfig(learning_rate=16.0, momentum=0.9, epochs=3, batch_size=64, patience=3)
    # the inverse on the sums the data gives (the recipe's 1.5 x the largest, ~120 here), not
    # the worst case's [2.5, 781]: the denominator bootstrap's error scales with that range
    activation = ActivationPlan.softmax_for(5, 12.0, sum_bound=180.0)
    assert activation.exp_saturated and activation.exp.unit_depth == 5
    plan, trainer, _ = train_and_check_mirror(5, data, config, tmp_path, activation=activation,
                                              loss_tol=1e-3)
    assert not plan.softmax_layout.cyclic
    assert plan.check_ranges(*data).max_abs_logit > 8.0  # exp(6 tanh(z/6)) < e^z / 10 there


def test_four_classes_use_plain_rotations_and_match_mirror(tmp_path):
    """c = 4 = C: the diagonals are the model's rotations (no masks), 4 label ciphertexts."""
    data = toy_problem(4, n_train=64, n_val=30, seed=9)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=64, patience=2)
    plan, trainer, _ = train_and_check_mirror(4, data, config, tmp_path)
    assert plan.softmax_layout.cyclic and plan.label_cts == 4
    assert trainer.ev.ops["ct_pt_multiplications"] > 0  # selection, unfold: not the diagonals
    assert not any(key[0][0] in ("diagonal", "gather") for key in trainer.ev._plain_cache)


def test_softmax_validation_resumes_and_stops_on_the_ridden_step(tmp_path):
    """Killed with epoch 1's validation pending: the resumed run asks for it in epoch 2's first
    step and matches an uninterrupted run; a stop there rolls that step back."""
    data = toy_problem(5, n_train=64, n_val=30, seed=5)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=3, batch_size=64, patience=2)
    plan, keys = plan_and_keys(5, config, data)
    dataset = encrypt_dataset(keys, plan, *data)
    straight_judge = HospitalJudge(keys, plan, len(data[3]))
    straight = make_trainer(keys, dataset, tmp_path / "straight")
    straight.train(decide=straight_judge)

    judge = HospitalJudge(keys, plan, len(data[3]))
    state = make_trainer(keys, dataset, tmp_path / "resumed").train(decide=judge,
                                                                    stop_after_epochs=1)
    assert state.epoch == 1 and state.validation_pending and judge.losses == {}
    resumed = make_trainer(keys, dataset, tmp_path / "resumed")
    state = resumed.train(decide=judge)
    assert state.epoch == 3 and not state.validation_pending
    assert sorted(judge.losses) == [1, 2, 3]
    for epoch in (1, 2, 3):
        assert abs(judge.losses[epoch] - straight_judge.losses[epoch]) < 1e-4
    a, b = (decrypt_weights(keys, plan, t.weights) for t in (straight, resumed))
    assert np.max(np.abs(a - b)) < WEIGHT_TOL

    stopper = make_trainer(keys, dataset, tmp_path / "stop")
    state = stopper.train(decide=lambda epoch, loss: Decision(False, epoch))
    steps_per_epoch = len(plan.train_batch_sizes)
    assert (state.epoch, state.steps, state.best_epoch) == (1, steps_per_epoch, 1)
    assert state.stopped and not state.validation_pending
    kept = decrypt_weights(keys, plan, stopper.weights_of_epoch(1))
    current = decrypt_weights(keys, plan, stopper.weights)
    assert np.max(np.abs(current - kept)) < 1e-4  # noise of the reload (adopt) only
    assert np.max(np.abs(current - a)) > 1e-2  # the ridden step was rolled back


def test_binary_step_over_several_chunks_matches_mirror(tmp_path):
    """A batch of 300 at 128 samples per ciphertext: 3 chunks, still one bootstrap per step."""
    data = toy_problem(2, n_train=300, n_val=40, seed=6)
    config = TrainConfig(learning_rate=2.0, momentum=0.8, epochs=2, batch_size=300, patience=2)
    plan, trainer, state = train_and_check_mirror(2, data, config, tmp_path)
    assert plan.chunk_sizes(300) == [128, 128, 44] and plan.chunks_per_step == 3
    assert state.steps == 2 and trainer.ev.ops["bootstraps"] == 2


@pytest.mark.parametrize(("group", "epochs", "n_train", "periods", "bootstraps"),
                         [(None, 2, 300, 2, 2 * 2 + 1), (2, 1, 300, 1, 3 + 1),
                          (2, 2, 512, 1, 3 * 2 + 1 + 1)])
def test_softmax_step_over_several_chunks_matches_mirror(tmp_path, group, epochs, n_train,
                                                         periods, bootstraps):
    """Several chunks per step. 3 chunks: their denominators share one 2 P-slot bootstrap
    (two places per period) with the ridden validation chunk in the free fourth place, so a
    step costs two bootstraps (+ the last epoch's validation). In groups of 2 chunks (what the
    slot cap does to big production steps) a step costs the model's and one per group; with
    4 chunks both groups are full, so the previous epoch's validation is refreshed on its own."""
    data = toy_problem(5, n_train=n_train, n_val=30, seed=7)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=epochs, batch_size=n_train,
                         patience=2)
    plan, trainer, _ = train_and_check_mirror(5, data, config, tmp_path, group)
    softmax = plan.softmax_layout
    assert softmax.chunks == (group or 3)
    assert plan.chunks_per_step == -(-n_train // plan.layout.samples_per_ct)
    assert softmax.group_compact_period == periods * softmax.compact_period
    assert trainer.ev.ops["bootstraps"] == bootstraps


@pytest.mark.parametrize("n_classes", [2, 5])
def test_preconditioned_bootstrap_mode_matches_mirror(tmp_path, n_classes):
    """Bootstrap mode, each feature column stepping by lr p_j (`TrainConfig.preconditioned`):
    the encrypted decay vector costs the look-ahead one level, which the step has spare."""
    data = toy_problem(n_classes, n_train=64, n_val=30, seed=5)
    config = TrainConfig(learning_rate=0.1, momentum=0.9, epochs=2, batch_size=64,
                         patience=2, weight_decay=0.05, preconditioned=True)
    plan, _, _ = train_and_check_mirror(n_classes, data, config, tmp_path)
    assert plan.config.preconditioned
