"""A consortium's training job, in-process: the service's disk bound counts consortia, the
members' view of each state, the hospitals a paused worker names, and the supervisor's
reference to a consortium worker (tests/test_consortium_service_worker.py: over HTTP)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from medblindtuner.consortium.service_worker import ConsortiumJobRunner, PauseWatch, waiting_of
from medblindtuner.he.joint_refresh import RefreshPaused
from medblindtuner.he.threshold import RoundMessage
from medblindtuner.protocol import CLOUD_PARTY, ROUNDS_CHANNEL
from medblindtuner.service.blobs import sha256_bytes
from medblindtuner.service.consortia import BROADCAST, ConsortiumRelay
from medblindtuner.service.consortium_jobs import ConsortiumJobs, job_view
from medblindtuner.service.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    TooLarge,
    Unprocessable,
)
from medblindtuner.service.limits import ServiceConfig, ServiceLimits
from medblindtuner.service.store import ConsortiumJob, Store, bytes_held, utcnow
from medblindtuner.service.supervisor import WorkerRef


def relay_of(tmp_path, **limits) -> ConsortiumRelay:  # noqa: ANN001 - a pytest path
    config = ServiceConfig(tmp_path, limits=replace(ServiceLimits(), **limits))
    config.jobs_dir.mkdir(parents=True)
    config.staging_dir.mkdir(parents=True)
    store = Store(config.resolved_db_url)
    store.create_all()
    return ConsortiumRelay(config, store)


def publish(relay: ConsortiumRelay, cid: str, topic: str, size: int,
            awaits_answers: bool = False) -> None:
    relay.publish(cid, topic, RoundMessage(cid, topic, CLOUD_PARTY, b"x" * size).to_bytes(),
                  awaits_answers)


def answer(relay: ConsortiumRelay, cid: str, topic: str, hospital: int) -> None:
    data = RoundMessage(cid, topic, hospital, b"answer").to_bytes()
    staged = relay.staging_file(cid)
    staged.write_bytes(data)
    relay.post(cid, hospital, ROUNDS_CHANNEL, topic, BROADCAST, staged, sha256_bytes(data))


def test_consortia_count_in_the_services_disk_bound(tmp_path):
    relay = relay_of(tmp_path, max_total_bytes=20_000)
    first = relay.create(2)["consortium_id"]
    second = relay.create(2)["consortium_id"]
    publish(relay, first, "a", 12_000)
    with relay.store.session() as session:
        held = bytes_held(session, utcnow() - timedelta(hours=1))
    assert 12_000 < held < 13_000
    with pytest.raises(TooLarge, match="disk bound of 20000"):
        publish(relay, second, "b", 8_000)  # within its own bound, not the service's
    publish(relay, second, "b", 4_000)
    relay.delete(first)
    publish(relay, second, "c", 8_000)


def test_each_state_says_what_it_is():
    job = ConsortiumJob(consortium_id="c", state="queued", plan_sha256="0" * 64, n_train=9,
                        n_val=3, epoch=2, step_in_epoch=1, steps_per_epoch=2, steps=3,
                        best_epoch=1, pauses=0, restarts=0)
    assert job_view(None) is None
    assert job_view(job)["detail"] == "queued"
    job.state = "training"
    assert job_view(job)["detail"] == "training: epoch 2, step 1/2 (3 steps)"
    job.epoch = 0
    assert job_view(job)["detail"].startswith("training: starting")
    job.epoch = 2
    job.state, job.waiting_for = "paused", "0,2"
    assert job_view(job)["detail"] == "paused: waiting for hospitals 0, 2"
    assert job_view(job)["waiting_for"] == [0, 2]
    job.state, job.waiting_for = "done", None
    assert job_view(job)["detail"] == "done: model published (best epoch 1)"
    job.state, job.error = "failed", "RuntimeError: boom"
    assert job_view(job)["detail"] == "failed: RuntimeError: boom"


def test_a_pause_names_the_hospitals_waited_for():
    try:
        try:
            raise TimeoutError("no answer to 'refresh-3-reveal' within 6 s (waiting for "
                               "hospitals 1, 2)")
        except TimeoutError as exc:
            raise RefreshPaused("refresh 3 paused in phase 'reveal': member 1 did not "
                                "answer") from exc
    except RefreshPaused as paused:
        assert waiting_of(paused) == [1, 2]
    assert waiting_of(TimeoutError("epoch 2: waiting for hospital 0")) == [0]
    assert waiting_of(RuntimeError("the hospitals decided differently")) == []


def test_the_supervisor_finds_a_consortium_worker_beside_its_messages(tmp_path):
    config = ServiceConfig(tmp_path)
    ref = WorkerRef("abc", consortium=True)
    assert ref.directory(config) == config.job_dir("abc") / "cloud"
    assert ref.model is ConsortiumJob and ref.key == "consortium/abc"
    assert "paused" in ref.active_states and ref.failed_state == "failed"
    assert WorkerRef("abc").key == "abc" and WorkerRef("abc", "q").key == "abc/q"


def test_a_request_unanswered_for_the_wait_shows_the_job_paused(tmp_path):
    relay = relay_of(tmp_path)
    cid = relay.create(2)["consortium_id"]
    with relay.store.session() as session:
        session.add(ConsortiumJob(consortium_id=cid, state="training", plan_sha256="0" * 64,
                                  n_train=9, n_val=3))
    watch = PauseWatch(ConsortiumJobRunner(relay.config, relay.store, cid, wait_s=0.0))

    def job() -> dict:
        with relay.store.session() as session:
            return job_view(session.get(ConsortiumJob, cid))

    watch.tick()
    assert job()["state"] == "training"  # nothing asked yet
    publish(relay, cid, "refresh-0-reveal", 10, awaits_answers=True)
    watch.tick()
    assert (job()["state"], job()["waiting_for"], job()["pauses"]) == ("paused", [0, 1], 1)
    assert job()["pause_reason"] == ("no answer to 'refresh-0-reveal' for 0 s (waiting for "
                                     "hospitals 0, 1)")
    answer(relay, cid, "refresh-0-reveal", 0)
    watch.tick()
    assert (job()["detail"], job()["pauses"]) == ("paused: waiting for hospital 1", 1)
    answer(relay, cid, "refresh-0-reveal", 1)
    watch.tick()
    assert (job()["state"], job()["waiting_for"]) == ("training", [])


def good_plan() -> dict:
    from helpers_consortium_training import train_plan

    return train_plan().to_dict()


@pytest.mark.parametrize("change", [
    {"train_batch_sizes": "abc"}, {"train_batch_sizes": [64, "32"]},
    {"train_batch_sizes": [64, -32, 64]}, {"config": {"epochs": "2"}}, {"config": []},
    {"activation": []}, {"activation": None}, {"n_classes": "two"}, {"val_batch_sizes": None},
])
def test_a_hostile_plan_is_a_422(tmp_path, change):
    relay = relay_of(tmp_path)
    cid = relay.create(3)["consortium_id"]
    jobs = ConsortiumJobs(relay.config, relay.store, relay, supervisor=None)
    plan = {**good_plan(), **change}
    with pytest.raises(Unprocessable, match="not a training plan|rows"):
        jobs.start(cid, 0, plan, 96, 30, insecure=False)


def test_start_refusals_before_any_worker(tmp_path):
    relay = relay_of(tmp_path)
    cid = relay.create(3)["consortium_id"]
    jobs = ConsortiumJobs(relay.config, relay.store, relay, supervisor=None)
    with pytest.raises(Forbidden, match="coordinator"):
        jobs.start(cid, 1, good_plan(), 96, 30)
    with pytest.raises(BadRequest, match="insecure"):
        jobs.start(cid, 0, good_plan(), 96, 30, insecure=True)
    with pytest.raises(Unprocessable, match="not the union's 90 and 30"):
        jobs.start(cid, 0, good_plan(), 90, 30)
    with pytest.raises(Conflict, match="waiting for hospitals 0, 1, 2"):
        jobs.start(cid, 0, good_plan(), 96, 30)
    assert jobs.status(cid) is None
