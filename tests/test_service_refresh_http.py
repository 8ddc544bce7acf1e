"""Refresh mode "hospital" through the real service (insecure test ring, real HTTP).

A job whose refreshes the hospital answers through the service's relay ends with the weights
of the plaintext mirror and of the same job run in one process; killed at the relay's named
crash points (the worker between its request and the answer, or after reading the answer
before journaling it; the service between storing an answer and recording it, and with the
hospital's `fetch` cut off and run again from its ledger), it ends with the uninterrupted
run's weights. The crash harness is tests/test_crash_safety.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_he import plan_and_keys, toy_problem
from test_crash_safety import LOSS_TOL, WEIGHT_TOL, Hospital, Outcome, run_job
from test_refresh_training import trainer_for

from medblindtuner.failpoints import FAILPOINT_ENV, FAILPOINTS, MARKER_ENV
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.hospital.crypto import HospitalJudge, decrypt_weights, encrypt_dataset
from medblindtuner.training.plain import TrainConfig

# The encrypted run against its plaintext mirror (tests/test_refresh_training.py)
MIRROR_TOL = 2e-3


@pytest.fixture(scope="module")
def problem():
    return toy_problem(2, n_train=240, n_val=40, seed=3)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory, problem) -> Hospital:
    root = tmp_path_factory.mktemp("refresh_hospital")
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=3, batch_size=120, patience=5)
    plan, keys = plan_and_keys(2, config, problem, base=params_for_mode(HOSPITAL, insecure=True))
    assert len(plan.train_batch_sizes) == 2 and keys.params.refreshed_by_hospital
    keys.save_public_bundle(root / "bundle")
    encrypt_dataset(keys, plan, *problem).save(root / "dataset", keys.params)
    return Hospital(keys, plan, len(problem[3]), root / "bundle", root / "dataset")


@pytest.fixture(scope="module")
def uninterrupted(hospital, tmp_path_factory) -> Outcome:
    outcome = run_job(hospital, tmp_path_factory.mktemp("refresh_uninterrupted"))
    assert outcome.restarts == 0 and sorted(outcome.losses) == [1, 2, 3]
    return outcome


def test_service_job_in_refresh_mode_matches_mirror_and_in_process_run(
        hospital, uninterrupted, problem, tmp_path):
    mirror = hospital.plan.check_ranges(*problem)
    assert np.max(np.abs(uninterrupted.weights - mirror.weights)) < MIRROR_TOL
    for record in mirror.history:
        assert abs(uninterrupted.losses[record["epoch"]] - record["val_loss"]) < 1e-3
    judge = HospitalJudge(hospital.keys, hospital.plan, hospital.n_val)
    dataset = encrypt_dataset(hospital.keys, hospital.plan, *problem)
    trainer = trainer_for(hospital.keys, hospital.plan, dataset, tmp_path, judge)
    state = trainer.train(decide=judge)
    in_process = decrypt_weights(hospital.keys, hospital.plan,
                                 trainer.weights_of_epoch(state.best_epoch))
    assert state.best_epoch == uninterrupted.best_epoch
    assert np.max(np.abs(uninterrupted.weights - in_process)) < WEIGHT_TOL


CASES = [
    # (failpoint@hit, also kill the service): 2 refreshes an epoch, hits land in epoch 2 of 3
    ("refresh.published@3", False),  # the worker dies with its request unanswered
    ("refresh.published@4", True),  # ... and the service and the hospital's fetch with it
    ("refresh.received@3", False),  # the worker dies with the answer read, not journaled
    ("refresh.answer_stored@3", False),  # the service dies with the answer on disk only
]


@pytest.mark.parametrize("armed, kill_service", CASES, ids=[c[0] for c in CASES])
def test_killed_refresh_relay_ends_with_the_uninterrupted_weights(
        hospital, uninterrupted, tmp_path, monkeypatch, armed, kill_service):
    assert armed.partition("@")[0] in FAILPOINTS
    monkeypatch.setenv(FAILPOINT_ENV, armed)
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "fired"))
    outcome = run_job(hospital, tmp_path, kill_service=kill_service)
    assert (tmp_path / "fired").exists(), f"{armed} never fired"
    worker_side = not armed.startswith("refresh.answer_stored")
    assert outcome.restarts >= (1 if worker_side else 0)
    if kill_service or not worker_side:
        assert outcome.reconnects >= 1  # the hospital's fetch was cut off and run again
    assert outcome.best_epoch == uninterrupted.best_epoch
    assert outcome.losses.keys() == uninterrupted.losses.keys()
    loss_gap = max(abs(outcome.losses[e] - v) for e, v in uninterrupted.losses.items())
    weight_gap = float(np.max(np.abs(outcome.weights - uninterrupted.weights)))
    print(f"{armed}: loss gap {loss_gap:.2e}, weight gap {weight_gap:.2e}, restarts "
          f"{outcome.restarts}, reconnects {outcome.reconnects}")
    assert loss_gap < LOSS_TOL and weight_gap < WEIGHT_TOL


def test_api_with_a_service_url_answers_the_refreshes(tmp_path):
    """`EncryptedHeadClassifier(cloud=URL)` in the default refresh mode: its hospital answers
    the relayed refreshes (ledger in its folder) and the model is its plaintext mirror's."""
    from helpers_service import ServiceProcess

    from medblindtuner import EncryptedHeadClassifier
    from medblindtuner.training.plain import train_head

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 240)
    x = rng.normal(size=(240, 6)) + 2.0 * y[:, None]
    server = ServiceProcess(tmp_path / "cloud").start()
    try:
        clf = EncryptedHeadClassifier(cloud=server.url, insecure_test_params=True, epochs=2,
                                      pca_dims=0, workdir=tmp_path / "api").fit(x, y)
    finally:
        server.stop()
        server.kill_workers()
    hospital = clf.hospital_
    assert hospital.params.refresh == "hospital"
    ledger = json.loads((hospital.folder.refresh_state / "ledger.json").read_text())
    plan = hospital.plan
    assert len(ledger["digests"]) == (plan.config.epochs * len(plan.train_batch_sizes)
                                      * plan.refreshes_per_step)
    data = hospital.data
    mirror = train_head(data.x["train"], data.y["train"], data.x["val"], data.y["val"],
                        data.n_classes, plan.config, activation=plan.activation)
    assert np.max(np.abs(clf.weights_ - mirror.weights)) < MIRROR_TOL
