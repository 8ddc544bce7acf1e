"""The service relays refresh requests (refresh mode "hospital", `service/refreshes.py`).

In-process (a `CloudService` on SQLite and PostgreSQL, stand-in workers, request and answer
bytes with the real framing over made-up parts): the worker's publish, the hospital's long
poll and answer, idempotence for crash safety, and every refusal (422 / 409 / 413,
`{"detail": str}`, never a 500). The real HTTP job, the malicious cloud and the crashes are
in tests/test_service_refresh_http.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from test_service_jobs import StandIns, make_service, set_job, sha
from test_service_jobs import _database as _database  # noqa: F401 - SQLite and PostgreSQL
from test_service_jobs import workers as workers  # noqa: F401 - the fixture

from medblindtuner import protocol
from medblindtuner.he.params import HOSPITAL, INSECURE_TEST, params_for_mode
from medblindtuner.he.refresh import RefreshAnswer, RefreshRequest, message_bound
from medblindtuner.service.errors import Conflict, Unprocessable
from medblindtuner.service.jobs import CloudService

REFRESH = params_for_mode(HOSPITAL, insecure=True)


def request(index: int, c1: bytes = b"c1 of the adjusted ciphertext") -> RefreshRequest:
    return RefreshRequest(index, "job-tag", c1 + bytes([index]))


def answer_to(req: RefreshRequest, a: bytes = b"a", h0: bytes = b"h0") -> bytes:
    return RefreshAnswer(req.index, req.digest, a, h0, b"h1").to_bytes()


def training_job(service: CloudService, params=REFRESH) -> str:  # noqa: ANN001
    """A running job whose bundle manifest declares `params` (what the relay reads)."""
    job_id = service.create_job()["job_id"]
    bundle = service.job_dir(job_id) / protocol.BUNDLE
    bundle.mkdir(parents=True)
    (bundle / protocol.MANIFEST_NAME).write_text(json.dumps({"params": params.to_dict()}))
    set_job(service, job_id, state=protocol.RUNNING)
    return job_id


@pytest.fixture
def cloud(tmp_path, workers: StandIns):  # noqa: F811 - the imported fixture
    service = make_service(tmp_path, workers)
    yield service
    service.stop()


def test_a_request_is_relayed_answered_once_and_replayed(cloud):
    job_id = training_job(cloud)
    relay = cloud.refreshes
    assert cloud.refresh_request(job_id) == (None, True)
    first = request(0)
    relay.publish(job_id, 0, first.to_bytes())
    assert cloud.status(job_id)["awaiting_refresh"] == 0
    pending, training = cloud.refresh_request(job_id)
    assert training and pending == (0, first.to_bytes(), sha(first.to_bytes()))
    assert relay.answer(job_id, 0) is None
    answer = answer_to(first)
    assert cloud.answer_refresh(job_id, answer) == {"accepted": True, "index": 0,
                                                    "again": False}
    assert relay.answer(job_id, 0) == answer
    assert cloud.refresh_request(job_id) == (None, True)
    status = cloud.status(job_id)
    assert (status["refreshes"], status["awaiting_refresh"]) == (1, None)
    # crash safety: the same answer posted again is accepted again, the same request
    # published again (a restarted worker) keeps its stored answer
    assert cloud.answer_refresh(job_id, answer)["again"] is True
    relay.publish(job_id, 0, first.to_bytes())
    assert relay.answer(job_id, 0) == answer
    with pytest.raises(Conflict, match="refresh 0 was already answered"):
        cloud.answer_refresh(job_id, answer_to(first, a=b"another a"))
    # the request and answer files hold only the relayed bytes
    assert protocol.refresh_path(cloud.job_dir(job_id), 0, "answer").read_bytes() == answer


def test_other_bytes_for_a_published_index_replace_the_request_and_its_answer(cloud):
    """The relay does not judge: the hospital's ledger refuses another ciphertext for an
    answered index (tests/test_service_refresh_http.py)."""
    job_id = training_job(cloud)
    first, other = request(0), request(0, b"other c1")
    cloud.refreshes.publish(job_id, 0, first.to_bytes())
    cloud.answer_refresh(job_id, answer_to(first))
    cloud.refreshes.publish(job_id, 0, other.to_bytes())
    assert cloud.refreshes.answer(job_id, 0) is None
    assert cloud.refresh_request(job_id)[0][1] == other.to_bytes()
    with pytest.raises(Unprocessable, match="names another request"):
        cloud.answer_refresh(job_id, answer_to(first))


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda req: b"not a refresh answer", Unprocessable, "not a refresh answer"),
    (lambda req: b"\x00\x00\x00\x02{}", Unprocessable, "not a refresh answer"),
    (lambda req: RefreshRequest(0, "job-tag", b"x").to_bytes(), Unprocessable,
     "not a refresh answer"),
    (lambda req: RefreshAnswer(0, req.digest, b"", b"h0", b"h1").to_bytes(), Unprocessable,
     "three non-empty"),
    (lambda req: RefreshAnswer(0, "0" * 64, b"a", b"h0", b"h1").to_bytes(), Unprocessable,
     "names another request"),
    (lambda req: RefreshAnswer(5, req.digest, b"a", b"h0", b"h1").to_bytes(), Conflict,
     "refresh 5 was not requested"),
])
def test_malformed_or_unasked_answers_are_refused(cloud, make, error, message):
    job_id = training_job(cloud)
    req = request(0)
    cloud.refreshes.publish(job_id, 0, req.to_bytes())
    with pytest.raises(error, match=message):
        cloud.answer_refresh(job_id, make(req))
    assert cloud.refreshes.answer(job_id, 0) is None


def test_no_refresh_outside_training_or_for_a_bootstrap_job(cloud):
    job_id = training_job(cloud)
    req = request(0)
    cloud.refreshes.publish(job_id, 0, req.to_bytes())
    set_job(cloud, job_id, state=protocol.CANCELLED)
    assert cloud.refresh_request(job_id) == (None, False)
    with pytest.raises(Conflict, match="job is cancelled"):
        cloud.answer_refresh(job_id, answer_to(req))
    assert cloud.refresh_answer_bound(training_job(cloud)) == message_bound(REFRESH)
    with pytest.raises(Conflict, match="bootstrap on the cloud"):
        cloud.refresh_answer_bound(training_job(cloud, INSECURE_TEST))


def test_old_relayed_files_are_pruned_and_deleting_the_job_drops_its_rows(cloud):
    job_id = training_job(cloud)
    for index in range(12):
        req = request(index)
        cloud.refreshes.publish(job_id, index, req.to_bytes())
        cloud.answer_refresh(job_id, answer_to(req))
    names = sorted(p.name for p in (cloud.job_dir(job_id) / protocol.REFRESHES_DIR).iterdir())
    assert names[0] == "answer_0000003.bin" and len(names) == 2 * 9
    assert cloud.status(job_id)["refreshes"] == 12
    cloud.delete_job(job_id)
    from medblindtuner.service.store import RefreshRow

    with cloud.store.session() as session:
        assert session.query(RefreshRow).count() == 0


# ---- over the app: long poll, limits, status codes ------------------------------------------
@pytest.fixture
def http(tmp_path):
    from fastapi.testclient import TestClient

    from medblindtuner.service.app import create_app
    from medblindtuner.service.limits import ServiceConfig

    app = create_app(ServiceConfig(data_dir=tmp_path / "app", allow_insecure=True))
    yield TestClient(app), app.state.service
    app.state.service.stop()


def test_long_poll_answers_when_a_request_is_published(http):
    client, service = http
    created = client.post("/jobs").json()
    job_id, auth = created["job_id"], {"Authorization": f"Bearer {created['token']}"}
    training_job_id = job_id
    bundle = service.job_dir(job_id) / protocol.BUNDLE
    bundle.mkdir(parents=True)
    (bundle / protocol.MANIFEST_NAME).write_text(json.dumps({"params": REFRESH.to_dict()}))
    set_job(service, training_job_id, state=protocol.RUNNING)
    url = f"/jobs/{job_id}/refresh"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer forged"}).status_code == 403
    started = time.monotonic()
    assert client.get(url, params={"wait": 0.3}, headers=auth).status_code == 204
    assert time.monotonic() - started >= 0.3
    for wait in ("-1", "61", "nan", "inf", "abc"):
        response = client.get(url, params={"wait": wait}, headers=auth)
        assert response.status_code == 422 and isinstance(response.json()["detail"], str)
    first = threading.Thread(target=client.get, args=(url,),
                             kwargs={"params": {"wait": 2}, "headers": auth})
    first.start()
    time.sleep(0.3)
    started = time.monotonic()  # one long poll per job waits; another answers at once
    assert client.get(url, params={"wait": 20}, headers=auth).status_code == 204
    assert time.monotonic() - started < 1.5
    first.join()
    req = request(0)
    publisher = threading.Timer(0.5, service.refreshes.publish, (job_id, 0, req.to_bytes()))
    publisher.start()
    started = time.monotonic()
    response = client.get(url, params={"wait": 20}, headers=auth)
    waited = time.monotonic() - started
    assert response.status_code == 200 and 0.4 < waited < 5
    assert response.content == req.to_bytes()
    assert response.headers[protocol.REFRESH_INDEX_HEADER] == "0"
    assert response.headers[protocol.CONTENT_SHA_HEADER] == sha(req.to_bytes())
    for body, status in ((b"garbage", 422), (b"x" * (message_bound(REFRESH) + 1), 413),
                         (answer_to(request(3)), 409)):
        response = client.post(url, content=body, headers=auth)
        assert response.status_code == status and isinstance(response.json()["detail"], str)
    assert client.post(url, content=answer_to(req), headers=auth).json()["accepted"]
    set_job(service, job_id, state=protocol.AWAITING_DECISION)  # a long poll ends at once
    started = time.monotonic()
    assert client.get(url, params={"wait": 20}, headers=auth).status_code == 204
    assert time.monotonic() - started < 2


# ---- the limited children that parse refresh messages ---------------------------------------
def test_prewarmed_checker_parses_each_message_in_a_fresh_limited_child():
    """Good parts pass; framing errors, non-ciphertexts and a length-field bomb are refused
    (the bomb kills only its child); a spare child waits for the next message and exits at
    the end of its input."""
    import numpy as np

    from medblindtuner.he.ciphertexts import ciphertext_to_bytes
    from medblindtuner.he.keys import HospitalKeys
    from medblindtuner.he.refresh import CloudRefresher
    from medblindtuner.he.untrusted import PrewarmedChecker

    keys = HospitalKeys.generate(REFRESH, [1], allow_insecure=True)
    ct = keys.context.Encrypt(keys.public_key,
                              keys.context.MakeCKKSPackedPlaintext(np.zeros(REFRESH.slots)))
    good = CloudRefresher(keys.context, REFRESH, keys.public_key, None, "job").prepare(ct, 0)[1]
    bomb = bytearray(good.c1)
    bomb[20] ^= 0x40  # a length field: OpenFHE's parser asks for gigabytes
    checker = PrewarmedChecker("refresh_request", REFRESH.ring_dim, memory_bytes=1 << 30)
    try:
        assert checker.check(good.to_bytes(), "good").ok
        spare = checker._spare
        assert spare is not None and spare.poll() is None
        for data, reason in ((b"garbage", "refresh message"),
                             (RefreshRequest(0, "job", b"no ciphertext").to_bytes(), "not a"),
                             (RefreshRequest(0, "job", bytes(bomb)).to_bytes(), ""),
                             (RefreshRequest(0, "job", ciphertext_to_bytes(ct)).to_bytes(),
                              "holds 2 elements")):
            verdict = checker.check(data, "bad")
            assert not verdict.ok and reason in verdict.error, verdict
        assert spare.poll() is not None  # each message had its own child
        assert checker.check(good.to_bytes(), "good again").ok
    finally:
        checker.close()
    assert checker._spare is None
