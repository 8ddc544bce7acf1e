"""A consortium over the service (issue #23): three hospitals, each its own process holding
only its own secret share, run the joint key rounds through a real service process over
real HTTP (SQLite, files); the cloud (this process) reads the rounds through the service's
store, assembles the joint keys, evaluates, and publishes ciphertexts there; every hospital
decrypts them from all three sealed shares, while one share alone decodes to nothing.
Then the relay's refusals: another index, another consortium's or job's token, a second,
different message in a filled slot, a share for another job, sizes, and the long poll.

Insecure test ring (refresh-mode joint parameters, ring 2^12): the file runs in well under a
minute on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openfhe as ofhe
import pytest
from helpers_consortium import (
    KERNEL_ROTATIONS,
    LENGTH,
    N_VAL,
    NAMES,
    PARAMS,
    REFRESHED,
    TIMEOUT_S,
    plaintext_in,
    refresh_plan,
    schedule_of,
)
from helpers_service import ServiceProcess

from medblindtuner.consortium.client import ConsortiumClient
from medblindtuner.consortium.remote import (
    RelayedDecide,
    RelayedMember,
    assemble_joint_keys,
    publish_model,
)
from medblindtuner.consortium.sealing import Roster, new_sealing_key, seal_share
from medblindtuner.he.joint_refresh import JointCloudRefresher, RefreshPaused
from medblindtuner.he.refresh import max_refresh_level
from medblindtuner.he.threshold import RoundMessage, joint_context
from medblindtuner.hospital.client import ServiceError
from medblindtuner.protocol import CLOUD_PARTY
from medblindtuner.service.consortia import ConsortiumRelay
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.store import Store

N = 3
HERE = Path(__file__).resolve().parent
X = np.linspace(-0.5, 0.5, LENGTH)
LOSSES = (0.6, 0.5)  # the validation losses of epochs 1 and 2 the cloud asks about


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server = ServiceProcess(tmp_path_factory.mktemp("consortium-cloud")).start()
    yield server
    server.stop()


def store_of(server: ServiceProcess) -> ConsortiumRelay:
    """The cloud's (a worker's) view: the service's store, not HTTP."""
    config = ServiceConfig(server.data_dir)
    return ConsortiumRelay(config, Store(config.resolved_db_url))


def start_hospitals(url: str, created: dict, out: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    return [subprocess.Popen([sys.executable, str(HERE / "helpers_consortium.py"), url,
                              created["consortium_id"], token, str(out / f"hospital-{i}.json")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for i, token in enumerate(created["tokens"])]


def reader(relay: ConsortiumRelay, consortium_id: str, hospitals: list[subprocess.Popen]):
    """`read_round` of the cloud: all N messages of a round, by party, waiting for them."""
    def read_round(name: str) -> list[bytes]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            found = relay.read(consortium_id, name)
            if sorted(found) == list(range(N)):
                return [found[i] for i in range(N)]
            for process in hospitals:
                if process.poll() not in (None, 0):
                    raise AssertionError(f"a hospital died:\n{process.stdout.read().decode()}")
            time.sleep(0.05)
        raise AssertionError(f"round {name!r}: the hospitals did not all post")
    return read_round


def publish(relay: ConsortiumRelay, consortium_id: str, name: str, ciphertext) -> None:
    round_name = f"ciphertext-{name}"
    message = RoundMessage(consortium_id, round_name, CLOUD_PARTY,
                           ofhe.Serialize(ciphertext, ofhe.BINARY)).to_bytes()
    relay.publish(consortium_id, round_name, message)


def joint_refresher(relay: ConsortiumRelay, consortium_id: str, keys,  # noqa: ANN001
                    timeout_s: float) -> JointCloudRefresher:
    """The cloud's refresher, reaching each member through the store."""
    members = [RelayedMember(relay, consortium_id, i, timeout_s) for i in range(N)]
    return JointCloudRefresher(keys.context, PARAMS, keys.public_key, members,
                               refresh_plan().job_tag(PARAMS))


def low_ciphertext(keys):  # noqa: ANN001, ANN201 - JointKeys; a ciphertext
    """X at the highest level a refresh takes, with a pending rescale."""
    ct = keys.encrypt(np.tile(X, PARAMS.slots // LENGTH), max_refresh_level(PARAMS) - 1)
    return keys.context.EvalMult(ct, 1.0)


@pytest.fixture(scope="module")
def ceremony(service, tmp_path_factory):
    """The key rounds and three decryptions through the service: (created, what each
    hospital learnt, the joint keys)."""
    out = tmp_path_factory.mktemp("hospitals")
    created = ConsortiumClient.create(service.url, N)
    hospitals = start_hospitals(service.url, created, out)
    try:
        relay = store_of(service)
        consortium_id = created["consortium_id"]
        context = joint_context(PARAMS)
        keys = assemble_joint_keys(context, PARAMS, consortium_id, N,
                                   reader(relay, consortium_id, hospitals), schedule_of(context))
        ct = keys.encrypt(np.tile(X, PARAMS.slots // LENGTH))
        publish(relay, consortium_id, "x", ct)
        publish(relay, consortium_id, "square", context.EvalMult(ct, ct))
        publish(relay, consortium_id, "rotated", context.EvalRotate(ct, KERNEL_ROTATIONS[0]))
        fresh = joint_refresher(relay, consortium_id, keys, TIMEOUT_S).refresh(
            low_ciphertext(keys), 0)
        assert fresh.GetLevel() == 0
        publish(relay, consortium_id, REFRESHED, fresh)
        decisions, weights = train_decisions(relay, consortium_id, keys)
        for process in hospitals:
            process.wait(timeout=TIMEOUT_S)
            assert process.returncode == 0, process.stdout.read().decode()[-3000:]
    finally:
        for process in hospitals:
            if process.poll() is None:
                process.kill()
                process.wait()
    learnt = [json.loads((out / f"hospital-{i}.json").read_text()) for i in range(N)]
    return created, learnt, keys, decisions, weights


def train_decisions(relay: ConsortiumRelay, consortium_id: str, keys):  # noqa: ANN001, ANN201
    """What a training's cloud asks: each epoch's encrypted loss (`RelayedDecide`), then the
    chosen epoch's model. Returns (decisions, the model's plaintext weights)."""
    plan = refresh_plan()
    padding = sum(plan.layout.samples_per_ct - n for n in plan.val_batch_sizes)
    decide = RelayedDecide(relay, consortium_id, N, TIMEOUT_S)
    decisions = [decide(epoch, keys.encrypt(np.array([loss * N_VAL
                                                      + plan.padding_loss(padding)])))
                 for epoch, loss in enumerate(LOSSES, start=1)]
    weights = np.linspace(-1.0, 1.0, plan.layout.n_features)
    publish_model(relay, consortium_id, decisions[-1].best_epoch,
                  [keys.encrypt(plan.layout.encode_weights(weights))])
    return decisions, weights


def test_three_hospitals_make_joint_keys_and_decrypt_through_the_service(ceremony, service):
    created, learnt, keys, _decisions, _weights = ceremony
    assert [h["index"] for h in learnt] == list(range(N))
    status = ConsortiumClient(service.url, created["consortium_id"],
                              created["tokens"][0]).status()
    assert status["awaiting"] is None  # every request of the cloud was answered
    assert all(h["fingerprints"] == learnt[0]["fingerprints"] for h in learnt)  # one roster
    expected = {"x": X, "square": X * X, REFRESHED: X,
                "rotated": np.roll(np.tile(X, PARAMS.slots // LENGTH), -1)[:LENGTH]}
    for hospital in learnt:
        for name in (*NAMES, REFRESHED):
            assert np.max(np.abs(np.asarray(hospital["values"][name]) - expected[name])) < 1e-4
            alone = np.asarray(hospital["alone"][name])
            assert not np.all(np.isfinite(alone)) or np.max(np.abs(alone - expected[name])) > 1
    assert keys.message_bytes > 0 and keys.rotation_indices == (-4, 1, 2)


def test_every_hospital_judges_each_epoch_and_decrypts_the_model_it_chose(ceremony):
    _created, learnt, _keys, decisions, weights = ceremony
    assert decisions[0].continue_training and decisions[1].best_epoch == 2
    for hospital in learnt:
        assert [hospital["losses"][str(e)] for e in (1, 2)] == pytest.approx(LOSSES, abs=1e-4)
        assert np.max(np.abs(np.asarray(hospital["weights"]) - weights)) < 1e-4


def test_the_service_holds_only_sealed_shares_and_no_plaintext(ceremony, service):
    created, learnt, *_ = ceremony
    files = [p for p in service.data_dir.rglob("*") if p.is_file()]
    sealed = [p for p in files if "/sealed/" in str(p) and "/sealed/attest-" not in str(p)]
    attested = {p.parent.name for p in files if "/sealed/attest-" in str(p)}
    assert {"attest-public-key", "attest-relin-1"} <= attested  # key rounds went attested
    requests = len(NAMES) + 1 + len(LOSSES) + 1  # decryptions, losses, the model
    assert len(sealed) == requests * N * (N - 1)  # every share went sealed, to each other
    windows = [bytes.fromhex(w) for h in learnt for w in h["shares"]]
    needles = [f"{v:.6f}" for v in X[np.abs(X) > 1e-3]] + [f"{v:.4f}" for v in X[1:-1]]
    for path in files:
        data = path.read_bytes()
        assert not [w for w in windows if w in data], f"an unsealed decryption share in {path}"
        if path.suffix in (".log", ".out", ".sqlite3", ".sqlite3-wal"):
            assert not plaintext_in(data, needles), f"a plaintext value in {path}"
    assert not [t for t in created["tokens"] if any(t.encode() in p.read_bytes()
                                                    for p in files)], "a token stored in clear"


def test_a_refresh_pauses_while_a_member_is_away(ceremony, service):
    """No member answers: the cloud's request waits on the relay and the refresh pauses,
    naming who is missing; the request is there for the members to fetch."""
    keys = ceremony[2]
    created = ConsortiumClient.create(service.url, N)
    cid = created["consortium_id"]
    cloud = joint_refresher(store_of(service), cid, keys, timeout_s=0.3)
    with pytest.raises(RefreshPaused, match=r"phase 'commit': member 0 did not answer .*"
                                            r"waiting for hospitals 0, 1, 2"):
        cloud.refresh(low_ciphertext(keys), 0)
    hospital = ConsortiumClient(service.url, cid, created["tokens"][2])
    assert hospital.round_listing("refresh-0-commit")["missing"] == [0, 1, 2]
    assert hospital.status()["awaiting"] == {"round": "refresh-0-commit", "missing": [0, 1, 2],
                                             "detail": "waiting for hospitals 0, 1, 2"}
    assert hospital.cloud_message("refresh-0-commit", timeout_s=1)


def member_http(url: str, created: dict, index: int) -> httpx.Client:
    token = created["tokens"][index] if index >= 0 else "not-a-token"
    return httpx.Client(base_url=f"{url}/consortia/{created['consortium_id']}",
                        headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_a_hospital_posts_only_as_itself_and_a_slot_takes_one_message(service):
    created = ConsortiumClient.create(service.url, N)
    cid = created["consortium_id"]
    zero, one = member_http(service.url, created, 0), member_http(service.url, created, 1)
    mine = RoundMessage(cid, "roster", 0, b"key of hospital 0").to_bytes()
    assert zero.put("/rounds/roster", content=mine).json()["again"] is False
    assert zero.put("/rounds/roster", content=mine).json()["again"] is True  # a retry
    refused = zero.put("/rounds/roster", content=RoundMessage(cid, "roster", 0,
                                                              b"another").to_bytes())
    assert refused.status_code == 409 and "a second, different one" in refused.json()["detail"]
    as_other = one.put("/rounds/roster", content=mine)  # hospital 1 posts hospital 0's
    assert as_other.status_code == 422 and "only as itself" in as_other.json()["detail"]
    foreign = zero.put("/rounds/roster", content=RoundMessage("another-job", "roster", 0,
                                                              b"k").to_bytes())
    assert foreign.status_code == 422 and "'another-job'" in foreign.json()["detail"]
    wrong_round = zero.put("/rounds/relin-1", content=mine)
    assert wrong_round.status_code == 422 and "'roster'" in wrong_round.json()["detail"]
    listing = one.get("/rounds/roster").json()
    assert listing["missing"] == [1, 2] and listing["detail"] == "waiting for hospitals 1, 2"
    missing = one.get("/rounds/roster/parties/2")
    assert missing.status_code == 404 and "waiting for hospitals 1, 2" in missing.json()["detail"]
    assert one.get("/rounds/roster/parties/0").content == mine
    with pytest.raises(ServiceError, match="waiting for hospitals 1, 2"):
        ConsortiumClient(service.url, cid, created["tokens"][0]).round_messages("roster", 0.3)


def test_tokens_of_other_consortia_and_jobs_see_nothing(service):
    first, second = (ConsortiumClient.create(service.url, 2) for _ in range(2))
    cid = first["consortium_id"]
    posted = RoundMessage(cid, "roster", 0, b"sealing key of hospital 0").to_bytes()
    ConsortiumClient(service.url, cid, first["tokens"][0]).post_round(posted)
    job_token = httpx.post(f"{service.url}/jobs").json()["token"]
    for token, status in ((second["tokens"][0], 403), (job_token, 403), ("guess", 403)):
        http = httpx.Client(headers={"Authorization": f"Bearer {token}"})
        for method, path in (("GET", ""), ("GET", "/rounds/roster"),
                             ("GET", "/rounds/roster/parties/0"), ("GET", "/sealed/r/from/1"),
                             ("PUT", "/rounds/roster"), ("DELETE", "")):
            answer = http.request(method, f"{service.url}/consortia/{cid}{path}",
                                  content=b"x" if method == "PUT" else None)
            assert answer.status_code == status, (token[:6], method, path, answer.text)
            assert b"sealing key" not in answer.content  # nothing of the message
    assert httpx.get(f"{service.url}/consortia/{cid}").status_code == 401
    unknown = httpx.get(f"{service.url}/consortia/{'0' * 32}",
                        headers={"Authorization": f"Bearer {first['tokens'][0]}"})
    assert unknown.status_code == 404


def test_sealed_shares_reach_only_their_recipient_and_only_of_this_job(service):
    created = ConsortiumClient.create(service.url, N)
    cid = created["consortium_id"]
    keys = [new_sealing_key() for _ in range(N)]
    roster = Roster(cid, tuple(bytes(k.public_key) for k in keys))
    http = [member_http(service.url, created, i) for i in range(N)]
    envelope = seal_share(keys[0], roster, 0, 1, "req", b"share of 0 for 1")
    assert http[0].put("/sealed/req/to/1", content=envelope).status_code == 200
    assert http[1].get("/sealed/req/from/0").content == envelope
    listing = http[1].get("/sealed/req").json()
    assert listing["posted"].keys() == {"0"} and listing["detail"] == "waiting for hospital 2"
    stolen = http[2].get("/sealed/req/from/0")  # hospital 2 asks for 0's envelope to 1
    assert stolen.status_code == 404 and envelope not in stolen.content
    as_other = http[2].put("/sealed/req/to/1", content=envelope)
    assert as_other.status_code == 422 and "only as itself" in as_other.json()["detail"]
    readdressed = http[0].put("/sealed/req/to/2", content=envelope)
    assert readdressed.status_code == 422 and "recipient" in readdressed.json()["detail"]
    assert http[0].put("/sealed/req/to/0", content=envelope).status_code == 422  # to itself
    foreign_roster = Roster("another-job", roster.public_keys)
    foreign = seal_share(keys[0], foreign_roster, 0, 2, "req", b"share of another job")
    refused = http[0].put("/sealed/req/to/2", content=foreign)
    assert refused.status_code == 422 and "'another-job'" in refused.json()["detail"]
    other = seal_share(keys[0], roster, 0, 1, "req", b"a different share")
    assert http[0].put("/sealed/req/to/1", content=other).status_code == 409
    assert http[0].put("/sealed/req/to/1", content=envelope).json()["again"] is True


def test_long_poll_answers_when_the_last_hospital_posts(service):
    created = ConsortiumClient.create(service.url, 2)
    cid = created["consortium_id"]
    clients = [ConsortiumClient(service.url, cid, t) for t in created["tokens"]]
    clients[0].post_round(RoundMessage(cid, "r", 0, b"a").to_bytes())
    later = threading.Timer(0.5, clients[1].post_round,
                            [RoundMessage(cid, "r", 1, b"b").to_bytes()])
    later.start()
    start = time.monotonic()
    messages = clients[0].round_messages("r", timeout_s=20)
    assert time.monotonic() - start < 10 and len(messages) == 2
    later.join()
    assert clients[1].delete()["deleted"] is True
    with pytest.raises(ServiceError) as gone:
        clients[0].status()
    assert gone.value.status_code == 404


def test_sizes_and_shapes_are_bounded(tmp_path):
    with ServiceProcess(tmp_path / "small", "--limit", "max_consortium_message_bytes=2048",
                        "--limit", "max_consortium_messages=2") as server:
        with pytest.raises(ServiceError) as too_many:
            ConsortiumClient.create(server.url, 1)
        assert too_many.value.status_code == 422
        created = ConsortiumClient.create(server.url, 2)
        cid = created["consortium_id"]
        http = member_http(server.url, created, 0)
        big = RoundMessage(cid, "r", 0, b"x" * 4096).to_bytes()
        assert http.put("/rounds/r", content=big).status_code == 413
        assert http.put("/rounds/r", content=b"\x00\x00\x00\x05{}{}}").status_code == 422
        for name in ("a", "b"):
            assert http.put(f"/rounds/{name}",
                            content=RoundMessage(cid, name, 0, b"y").to_bytes()).is_success
        full = http.put("/rounds/c", content=RoundMessage(cid, "c", 0, b"y").to_bytes())
        assert full.status_code == 413 and "2 messages" in full.json()["detail"]
        assert http.get("/rounds/..%2Fetc").status_code == 404
        staging = server.data_dir / "staging" / cid
        assert not list(staging.glob("*"))  # refused bodies leave nothing behind


def test_idle_consortia_expire_and_each_address_holds_a_bounded_number(tmp_path):
    """In-process (the domain without HTTP, on SQLite): a consortium idle for the jobs' TTL
    is deleted when the next is created; one address holds at most the per-client cap."""
    from dataclasses import replace

    from medblindtuner.service.errors import TooManyRequests
    from medblindtuner.service.limits import ServiceLimits

    config = ServiceConfig(tmp_path, limits=replace(ServiceLimits(), idle_job_ttl_s=0.0,
                                                    max_jobs_per_client=1))
    store = Store(config.resolved_db_url)
    store.create_all()
    relay = ConsortiumRelay(config, store)
    first = relay.create(2, "10.0.0.1")["consortium_id"]
    second = relay.create(2, "10.0.0.1")["consortium_id"]  # the first one expired
    assert not (tmp_path / "jobs" / first).exists() and (tmp_path / "jobs" / second).exists()
    busy = ConsortiumRelay(replace(config, limits=replace(config.limits,
                                                          idle_job_ttl_s=3600.0)), store)
    with pytest.raises(TooManyRequests, match="per-client limit"):
        busy.create(2, "10.0.0.1")
    assert busy.create(2, "10.0.0.2")["n_hospitals"] == 2
    store.dispose()


def test_racing_posts_to_one_slot_one_wins_and_a_tampered_file_is_caught(service):
    """Eight different messages raced into one slot: one is stored, the others are 409s
    (never a 500); a stored file altered on disk is refused by the client's SHA-256 check."""
    from concurrent.futures import ThreadPoolExecutor

    created = ConsortiumClient.create(service.url, 2)
    cid = created["consortium_id"]
    http = member_http(service.url, created, 0)
    messages = [RoundMessage(cid, "race", 0, f"candidate {k}".encode()).to_bytes()
                for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda m: http.put("/rounds/race", content=m).status_code,
                                messages))
    assert codes == [200] + [409] * 7
    stored = next((service.data_dir / "jobs" / cid).rglob("s0_r-1.bin"))
    assert stored.read_bytes() in messages
    stored.chmod(0o600)
    stored.write_bytes(stored.read_bytes()[:-1] + b"!")
    with pytest.raises(ServiceError, match="do not match their SHA-256"):
        ConsortiumClient(service.url, cid, created["tokens"][1]).round_message("race", 0, 1)
