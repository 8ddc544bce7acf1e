"""The hospital's early-stopping judge is a strict, persisted state machine: a malicious cloud
cannot use it as a decryption oracle beyond the plan's one bit per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_he import plan_and_keys, toy_problem

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.params import data_level
from medblindtuner.hospital.crypto import HospitalJudge, JudgeRefusal
from medblindtuner.training.plain import TrainConfig

CONFIG = TrainConfig(learning_rate=1.0, epochs=4, batch_size=64, patience=2)


@pytest.fixture(scope="module")
def setup():
    data = toy_problem(2, n_train=100, n_val=40, seed=1)
    plan, keys = plan_and_keys(2, CONFIG, data)
    return plan, keys, len(data[3])


def loss_ct(keys, judge, loss: float):
    """A ciphertext whose slot 0 decrypts to the given per-sample loss."""
    total = loss * judge.n_val + judge.padding_loss
    vector = np.zeros(keys.params.slots)
    vector[0] = total
    return keys.encrypt(vector, data_level(keys.params))


def test_answers_in_order_then_refuses_extra_questions(setup, tmp_path):
    plan, keys, n_val = setup
    judge = HospitalJudge(keys, plan, n_val, state_path=tmp_path / "judge.json")
    decisions = [judge(e, loss_ct(keys, judge, 0.30 - 0.01 * e)) for e in range(1, 5)]
    assert [d.best_epoch for d in decisions] == [1, 2, 3, 4]
    assert judge.losses[4] == pytest.approx(0.26, abs=1e-3)
    with pytest.raises(JudgeRefusal, match="epoch 5; the plan has 4 epochs"):
        judge(5, loss_ct(keys, judge, 0.1))  # beyond the plan's 4 epochs


@pytest.mark.parametrize("epoch, loss, message", [(2, 0.3, "only epoch 1"),
                                                   (1, -0.5, "Brier range"),
                                                   (1, 7.0, "Brier range")])
def test_refuses_skipped_epochs_and_impossible_losses_for_good(setup, tmp_path, epoch, loss,
                                                               message):
    plan, keys, n_val = setup
    state = tmp_path / "judge.json"
    judge = HospitalJudge(keys, plan, n_val, state_path=state)
    with pytest.raises(JudgeRefusal, match=message):
        judge(epoch, loss_ct(keys, judge, loss))
    assert judge.answers == {} and judge.losses == {}  # refused questions get no answer
    # the refusal ends the job's questions, in this process and in any later one
    for again in (judge, HospitalJudge(keys, plan, n_val, state_path=state)):
        with pytest.raises(JudgeRefusal, match="ended with a refusal"):
            again(1, loss_ct(keys, again, 0.3))
    assert issubclass(JudgeRefusal, MedBlindTunerError)


def test_the_decryption_budget_is_the_plans_epochs_across_processes(setup, tmp_path):
    """Each decryption is counted before it happens; the same bytes again cost nothing."""
    plan, keys, n_val = setup
    state = tmp_path / "judge.json"
    judge = HospitalJudge(keys, plan, n_val, state_path=state)
    first = loss_ct(keys, judge, 0.3)
    judge(1, first)
    judge.answers.clear()  # as if killed after decrypting, before answering
    judge.losses.clear()
    judge(1, first)  # the same ciphertext again: no new decryption counted
    assert len(judge.decrypted) == 1
    for epoch in range(2, plan.config.epochs + 1):
        judge.answers.clear()
        judge.losses.clear()
        judge._save()
        judge = HospitalJudge(keys, plan, n_val, state_path=state)  # a new process
        judge(1, loss_ct(keys, judge, 0.3 - 0.01 * epoch))  # new bytes: one more decryption
    assert len(judge.decrypted) == plan.config.epochs
    judge.answers.clear()
    judge.losses.clear()
    with pytest.raises(JudgeRefusal, match=f"the plan allows {plan.config.epochs}"):
        judge(1, loss_ct(keys, judge, 0.2))


@pytest.mark.parametrize("header", [None, "abc", "1e3", "-1", "01.0", "9" * 8])
def test_a_malformed_epoch_from_the_cloud_is_refused_for_good(setup, tmp_path, header):
    plan, keys, n_val = setup
    judge = HospitalJudge(keys, plan, n_val, state_path=tmp_path / "judge.json")
    with pytest.raises(JudgeRefusal, match="not a plain integer"):
        judge.answer_cloud(header, b"")
    assert "not a plain integer" in judge.refused and judge.decrypted == []


def test_repeated_question_gets_the_recorded_answer_without_decrypting(setup):
    plan, keys, n_val = setup
    judge = HospitalJudge(keys, plan, n_val)
    first = judge(1, loss_ct(keys, judge, 0.3))
    probe = loss_ct(keys, judge, 0.0001)  # a crafted ciphertext for the same epoch
    judge.keys = None  # any decryption now would fail
    assert judge(1, probe) == first
    assert judge.losses == {1: pytest.approx(0.3, abs=1e-3)}


def test_stop_is_final_and_state_survives_a_restart(setup, tmp_path):
    plan, keys, n_val = setup
    state = tmp_path / "judge.json"
    judge = HospitalJudge(keys, plan, n_val, state_path=state)
    judge(1, loss_ct(keys, judge, 0.20))
    judge(2, loss_ct(keys, judge, 0.25))
    # a new process (a repeated `hospital fetch`) picks up the same history
    again = HospitalJudge(keys, plan, n_val, state_path=state)
    assert again.losses.keys() == {1, 2} and again.best_epoch == 1
    stop = again(3, loss_ct(keys, again, 0.27))  # patience 2 used up: stop, best epoch 1
    assert not stop.continue_training and stop.best_epoch == 1
    with pytest.raises(JudgeRefusal, match="after the hospital stopped"):
        again(4, loss_ct(keys, again, 0.1))
    assert HospitalJudge(keys, plan, n_val, state_path=state).best_epoch == 1
