"""Refresh by the key holder (he.refresh, hospital.refresher), insecure test ring.

The refreshed ciphertext must decrypt to its input within 1e-6 (measured ~1e-8 at ring 2^12,
45-bit scaling), at level 0, for dense and periodic layouts; an input with too few levels is
refused before anything is sent; the hospital answers only the planned refreshes, in order,
once each, and answers a repeated request with the same bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_he import plan_and_keys, toy_problem

from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.he.refresh import (
    CloudRefresher,
    RefreshAnswer,
    RefreshError,
    RefreshRequest,
    max_refresh_level,
)
from medblindtuner.hospital.refresher import HospitalRefresher, RefreshRefusal
from medblindtuner.training.plain import TrainConfig

TOL = 1e-6
PARAMS = params_for_mode(HOSPITAL, insecure=True)
CONFIG = TrainConfig(learning_rate=1.0, momentum=0.5, epochs=2, batch_size=64, patience=3)


@pytest.fixture(scope="module")
def job():
    data = toy_problem(2, n_train=100, n_val=30, seed=2)
    plan, keys = plan_and_keys(2, CONFIG, data, base=PARAMS)
    return plan, keys


def cloud_for(keys, plan, holder, journal=None) -> CloudRefresher:
    return CloudRefresher(keys.context, keys.params, keys.public_key, holder,
                          plan.job_tag(keys.params), journal)


def encrypt_at(keys: HospitalKeys, values: np.ndarray, level: int):
    return keys.encrypt(values, level)


def test_mode_parameters_have_no_bootstrapping(job):
    plan, keys = job
    assert keys.params.bootstrap_slots == () and keys.params.secret_key_dist == "UNIFORM_TERNARY"
    assert keys.params.depth == 12 and max_refresh_level(keys.params) == 9
    production = params_for_mode(HOSPITAL)
    assert production.is_secure and production.ring_dim == 1 << 15  # smallest 128-bit ring


@pytest.mark.parametrize("layout", ["dense", "periodic"])
def test_refreshed_equals_input_at_a_fresh_level(job, tmp_path, layout):
    plan, keys = job
    rng = np.random.default_rng(0)
    slots = keys.params.slots
    if layout == "dense":
        values = rng.uniform(-4, 4, slots)
    else:  # one 16-slot block repeated, second halves zero (the model's layout)
        block = np.concatenate([rng.uniform(-1, 1, 8), np.zeros(8)])
        values = np.tile(block, slots // 16)
    holder = HospitalRefresher(keys, plan, tmp_path / "ledger")
    cloud = cloud_for(keys, plan, holder)
    ct = encrypt_at(keys, values, max_refresh_level(keys.params) - 1)
    ct = keys.context.EvalMult(ct, 1.0)  # a pending rescale: effective level = the maximum
    fresh = cloud.refresh(ct, 0)
    assert fresh.GetLevel() == 0
    assert np.max(np.abs(keys.decrypt(fresh) - values)) < TOL


def test_too_few_levels_refused_before_asking(job):
    plan, keys = job
    asked = []
    cloud = cloud_for(keys, plan, lambda request: asked.append(request) or b"")
    ct = encrypt_at(keys, np.zeros(keys.params.slots), max_refresh_level(keys.params) + 1)
    with pytest.raises(RefreshError, match="needs at most"):
        cloud.refresh(ct, 0)
    assert asked == []


def test_hospital_answers_only_the_plan_in_order_once(job, tmp_path):
    plan, keys = job
    holder = HospitalRefresher(keys, plan, tmp_path / "ledger")
    cloud = cloud_for(keys, plan, holder)
    ct = encrypt_at(keys, np.ones(keys.params.slots), 0)
    _, first = cloud.prepare(ct, 0)
    answer = holder(first.to_bytes())
    assert RefreshAnswer.from_bytes(answer).request_digest == first.digest
    assert holder(first.to_bytes()) == answer  # asked again: the same bytes
    _, other = cloud.prepare(encrypt_at(keys, np.ones(keys.params.slots), 0), 0)
    with pytest.raises(RefreshRefusal, match="already answered"):
        holder(other.to_bytes())
    with pytest.raises(RefreshRefusal, match="only refresh 1 next"):
        holder(cloud.prepare(ct, 2)[1].to_bytes())
    foreign = RefreshRequest(1, "0" * 16, first.c1)
    with pytest.raises(RefreshRefusal, match="names job"):
        holder(foreign.to_bytes())
    beyond = RefreshRequest(plan.max_refreshes, first.job, first.c1)
    with pytest.raises(RefreshRefusal):
        holder(beyond.to_bytes())
    whole = RefreshRequest(1, first.job, __import__("medblindtuner.he.ciphertexts", fromlist=[
        "x"]).ciphertext_to_bytes(keys.context.IntMPBootAdjustScale(ct)))
    with pytest.raises(RefreshError, match="c1 alone"):
        holder(whole.to_bytes())
    with pytest.raises(RefreshError):
        holder(b"not a request")
    # the ledger survives a restart of the hospital: same answer, same order
    again = HospitalRefresher(keys, plan, tmp_path / "ledger")
    assert again(first.to_bytes()) == answer and again.answered == 1
    stopped = HospitalRefresher(keys, plan, tmp_path / "ledger", stopped=lambda: True)
    with pytest.raises(RefreshRefusal, match="stopped"):
        stopped(cloud.prepare(ct, 1)[1].to_bytes())


def test_journal_resends_the_same_request_after_a_crash(job, tmp_path):
    plan, keys = job
    holder = HospitalRefresher(keys, plan, tmp_path / "ledger")
    values = np.linspace(-1, 1, keys.params.slots)
    ct = encrypt_at(keys, values, 3)

    def lost(request: bytes) -> bytes:  # the hospital answers, the cloud dies before reading
        holder(request)
        raise ConnectionError("killed")

    with pytest.raises(ConnectionError):
        cloud_for(keys, plan, lost, tmp_path / "journal").refresh(ct, 0)
    # the re-run computes a different ciphertext of the same values (fresh randomness)
    rerun = cloud_for(keys, plan, HospitalRefresher(keys, plan, tmp_path / "ledger"),
                      tmp_path / "journal")
    fresh = rerun.refresh(encrypt_at(keys, values, 3), 0)
    assert np.max(np.abs(keys.decrypt(fresh) - values)) < TOL
    rerun.forget_before(1)
    assert not list((tmp_path / "journal").glob("*.bin"))
