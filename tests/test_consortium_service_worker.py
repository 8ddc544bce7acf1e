"""The service's supervised worker trains a consortium (insecure test ring, real HTTP): three
hospital processes make the joint key and send their rows; hospital 0 starts the training
(`POST /consortia/{id}/start`); the supervisor's worker runs the cloud's side and publishes
the model, which every hospital decrypts equal to the plaintext mirror's. A hospital that
stops answering leaves the job "paused: waiting for hospital k" until it answers again; a
worker killed mid-step is restarted and finishes the same model; deleting the consortium
stops its worker. Refusals: a non-coordinator, a foreign token, rows not all in, counts not
the plan's, a second start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_consortium import plaintext_in
from helpers_consortium_training import TIMEOUT_S, N, train_plan, union
from helpers_service import ServiceProcess
from typer.testing import CliRunner

from medblindtuner.cli.main import app
from medblindtuner.consortium.client import ConsortiumClient
from medblindtuner.consortium.relayed_training import rows_topic
from medblindtuner.consortium.roles import MEMBER_FORMAT
from medblindtuner.failpoints import FAILPOINT_ENV, MARKER_ENV
from medblindtuner.hospital.client import ServiceError
from medblindtuner.service.consortium_jobs import rows_manifest_round

HERE = Path(__file__).resolve().parent
WEIGHT_TOL, LOSS_TOL = 3e-3, 1e-3  # as tests/test_consortium.py


def hospitals_of(url: str, created: dict, root: Path) -> list[subprocess.Popen]:
    """One process per hospital (tests/helpers_consortium_training.py), no failpoints."""
    env = {k: v for k, v in os.environ.items() if k not in (FAILPOINT_ENV, MARKER_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent / "src"),
                                         os.environ.get("PYTHONPATH", "")])
    return [subprocess.Popen(
        [sys.executable, str(HERE / "helpers_consortium_training.py"), url,
         created["consortium_id"], token, str(root / f"hospital-{i}.json")], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, token in enumerate(created["tokens"])]


def wait_rows(client: ConsortiumClient, deadline_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + deadline_s
    for i in range(N):
        while str(i) not in client.round_listing(rows_topic(i), 1.0)["posted"]:
            assert time.monotonic() < deadline, f"hospital {i}'s rows never came"


def job_of(client: ConsortiumClient) -> dict:
    return client.status()["job"]


def wait_job(client: ConsortiumClient, done, seen: list[dict],  # noqa: ANN001 - predicate
             deadline_s: float = TIMEOUT_S) -> dict:
    """Poll the job's state (every view kept in `seen`) until `done(job)`."""
    deadline = time.monotonic() + deadline_s
    while True:
        job = job_of(client)
        seen.append(job)
        if done(job):
            return job
        assert job["state"] != "failed", job
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.2)


def finish(hospitals: list[subprocess.Popen], root: Path) -> list[dict]:
    """Each hospital's exit (0) and what it learnt."""
    outputs = [h.communicate(timeout=TIMEOUT_S)[0] for h in hospitals]
    for hospital, out in zip(hospitals, outputs, strict=True):
        assert hospital.returncode == 0, out[-3000:]
    return [json.loads((root / f"hospital-{i}.json").read_text()) for i in range(N)]


def stop_all(hospitals: list[subprocess.Popen]) -> None:
    for hospital in hospitals:
        if hospital.poll() is None:
            hospital.send_signal(signal.SIGCONT)
            hospital.kill()
            hospital.wait()


def assert_mirror(learnt: list[dict], job: dict) -> None:
    plan = train_plan()
    mirror = plan.check_ranges(*union())
    assert job["best_epoch"] == mirror.best_epoch
    for hospital in learnt:
        assert np.max(np.abs(np.asarray(hospital["weights"]) - mirror.weights)) < WEIGHT_TOL
        for record in mirror.history:
            assert abs(hospital["losses"][str(record["epoch"])] - record["val_loss"]) < LOSS_TOL
        assert hospital["refreshes"] == job["steps"] * plan.refreshes_per_step > 0


def start(client: ConsortiumClient) -> dict:
    x_train, _, x_val, _ = union()
    return client.start_training(train_plan().to_dict(), len(x_train), len(x_val), True)


def refused(call, status: int, *words: str) -> None:  # noqa: ANN001 - a callable
    with pytest.raises(ServiceError) as caught:
        call()
    assert caught.value.status_code == status, caught.value
    for word in words:
        assert word in str(caught.value), caught.value


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["consortium", *args])
    return result.exit_code, " ".join(result.output.split())


def member_file(root: Path, url: str, created: dict, index: int) -> str:
    path = root / f"member-{index}.json"
    path.write_text(json.dumps({"format": MEMBER_FORMAT, "service": url, "index": index,
                                "consortium_id": created["consortium_id"],
                                "token": created["tokens"][index]}))
    return str(path)


def test_the_rows_round_is_the_hospitals():
    assert all(rows_manifest_round(i) == rows_topic(i) for i in range(4))


def test_the_worker_trains_the_consortium_and_refuses_other_starts(tmp_path):
    with ServiceProcess(tmp_path / "cloud") as server:
        created = ConsortiumClient.create(server.url, N)
        other = ConsortiumClient.create(server.url, 2)
        clients = [ConsortiumClient(server.url, created["consortium_id"], t)
                   for t in created["tokens"]]
        hospitals = hospitals_of(server.url, created, tmp_path)
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(json.dumps(train_plan().to_dict()))
        coordinator = member_file(tmp_path, server.url, created, 0)
        try:
            assert job_of(clients[1]) is None
            assert cli("status", "--member", coordinator) == (0, "training: not started")
            code, out = cli("start", "--member", coordinator, "--plan", str(plan_file),
                            "--n-train", "96", "--n-val", "30", "--insecure-test-params",
                            "--timeout", "1")
            assert code == 2 and "rows are not all in" in out and "Traceback" not in out, out
            refused(lambda: start(clients[0]), 409, "rows are not all in", "waiting for")
            wait_rows(clients[0])
            refused(lambda: start(clients[1]), 403, "coordinator")
            foreign = ConsortiumClient(server.url, created["consortium_id"], other["tokens"][0])
            refused(lambda: start(foreign), 403)
            refused(lambda: clients[0].start_training(train_plan().to_dict(), 95, 30, True),
                    422, "95")
            refused(lambda: clients[0].start_training({"n_classes": 2}, 96, 30, True), 422,
                    "not a training plan")
            assert start(clients[0])["state"] in ("queued", "training")
            refused(lambda: start(clients[0]), 409, "already started")
            seen: list[dict] = []
            job = wait_job(clients[2], lambda j: j["state"] == "done", seen)
            learnt = finish(hospitals, tmp_path)
        finally:
            stop_all(hospitals)
        status = cli("status", "--member", member_file(tmp_path, server.url, created, 1))
    assert status == (0, f"training: {job['detail']}"), status
    assert any(j["state"] == "training" and j["steps"] >= 1 for j in seen), seen
    assert job["detail"] == f"done: model published (best epoch {job['best_epoch']})"
    assert job["restarts"] == 0 and job["error"] is None
    assert_mirror(learnt, job)
    needles = [f"{v:.6f}" for v in union()[0][:4, :-1].ravel() if abs(v) > 1e-3][:12]
    logs = list((tmp_path / "cloud").rglob("*.log")) + list((tmp_path / "cloud").rglob(
        "*.sqlite3*"))
    assert any(p.parent.name == "cloud" and p.name == "worker.log" for p in logs), logs
    for path in logs:  # the worker's log, the service's, the database: no plaintext value
        assert not plaintext_in(path.read_bytes(), needles), f"a plaintext feature in {path}"


def test_a_silent_hospital_pauses_the_job_until_it_answers(tmp_path):
    silent = 2
    with ServiceProcess(tmp_path / "cloud", "--limit", "consortium_wait_s=6") as server:
        created = ConsortiumClient.create(server.url, N)
        client = ConsortiumClient(server.url, created["consortium_id"], created["tokens"][0])
        hospitals = hospitals_of(server.url, created, tmp_path)
        try:
            wait_rows(client)
            start(client)
            seen: list[dict] = []
            wait_job(client, lambda j: j["steps"] >= 1, seen)
            hospitals[silent].send_signal(signal.SIGSTOP)
            paused = wait_job(client, lambda j: j["state"] == "paused"
                              and j["waiting_for"] == [silent], seen, 60)
            hospitals[silent].send_signal(signal.SIGCONT)
            job = wait_job(client, lambda j: j["state"] == "done", seen)
            learnt = finish(hospitals, tmp_path)
        finally:
            stop_all(hospitals)
    assert paused["detail"] == f"paused: waiting for hospital {silent}"
    assert paused["pause_reason"].startswith("no answer to 'refresh-")  # or 'loss-
    assert paused["pause_reason"].endswith(f"for 6 s (waiting for hospital {silent})")
    assert job["pauses"] >= 1 and job["waiting_for"] == []
    assert_mirror(learnt, job)


def test_a_killed_worker_is_restarted_and_finishes_the_same_model(tmp_path):
    marker, temporary = tmp_path / "killed", tmp_path / "tmp"
    temporary.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAILPOINT_ENV, "train.mid_step@3")
        patch.setenv(MARKER_ENV, str(marker))
        patch.setenv("TMPDIR", str(temporary))  # the service's and its workers' temp folder
        server = ServiceProcess(tmp_path / "cloud").start()
    try:
        created = ConsortiumClient.create(server.url, N)
        client = ConsortiumClient(server.url, created["consortium_id"], created["tokens"][0])
        hospitals = hospitals_of(server.url, created, tmp_path)
        try:
            wait_rows(client)
            start(client)
            job = wait_job(client, lambda j: j["state"] == "done", [])
            learnt = finish(hospitals, tmp_path)
        finally:
            stop_all(hospitals)
    finally:
        server.__exit__()
    assert marker.exists(), "the failpoint never fired"
    assert job["restarts"] == 1 and job["error"] is None
    assert_mirror(learnt, job)
    # the killed worker's joint key files were in the job's folder (not the temp folder),
    # removed by the worker that finished
    assert not list(temporary.glob("medblindtuner-joint-shard-keys-*"))
    assert not list((tmp_path / "cloud").rglob("joint-keys"))


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_deleting_a_training_consortium_stops_its_worker(tmp_path):
    with ServiceProcess(tmp_path / "cloud") as server:
        created = ConsortiumClient.create(server.url, N)
        client = ConsortiumClient(server.url, created["consortium_id"], created["tokens"][1])
        hospitals = hospitals_of(server.url, created, tmp_path)
        try:
            wait_rows(client)
            start(ConsortiumClient(server.url, created["consortium_id"], created["tokens"][0]))
            wait_job(client, lambda j: j["steps"] >= 1, [])
            folder = server.data_dir / "jobs" / created["consortium_id"]
            pid = int((folder / "cloud" / "worker.pid").read_text())
            assert client.delete()["deleted"]
            assert not folder.exists()
            deadline = time.monotonic() + 10
            while running(pid):
                assert time.monotonic() < deadline, "the worker still runs"
                time.sleep(0.1)
            refused(client.status, 404)
        finally:
            stop_all(hospitals)
