"""Cloud service end to end: real uvicorn server in a subprocess, workers in their own processes.

Insecure test parameters only (ring 4096), binary task, 2 epochs of 1 step each, so a whole job
takes tens of seconds. The hospital's keys live in this (test) process; the service and its
workers only ever see the public bundle and ciphertexts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers_he import plan_and_keys, toy_problem
from helpers_service import CHUNK, ServiceProcess

from medblindtuner.he.keys import HospitalKeys, looks_like_secret_key
from medblindtuner.hospital.client import HospitalClient, ServiceError, load_result_weights
from medblindtuner.hospital.crypto import HospitalJudge, encrypt_dataset
from medblindtuner.training.plain import TrainConfig
from medblindtuner.training.plan import TrainingPlan

MAX_UPLOAD = 256 << 20


@dataclass
class Hospital:
    keys: HospitalKeys
    plan: TrainingPlan
    data: tuple
    mirror_weights: np.ndarray
    bundle_dir: Path
    dataset_dir: Path
    secret_key: Path

    def judge(self) -> HospitalJudge:
        return HospitalJudge(self.keys, self.plan, len(self.data[3]))


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Hospital:
    root = tmp_path_factory.mktemp("hospital")
    data = toy_problem(2)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=128, patience=5)
    plan, keys = plan_and_keys(2, config, data)
    mirror = plan.check_ranges(*data)
    keys.save_public_bundle(root / "bundle")
    keys.save_secret_key(root / "secret" / "secret_key.bin")
    encrypt_dataset(keys, plan, *data).save(root / "dataset", keys.params)
    return Hospital(keys, plan, data, np.asarray(mirror.weights), root / "bundle",
                    root / "dataset", root / "secret" / "secret_key.bin")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server = ServiceProcess(tmp_path_factory.mktemp("cloud"), "--max-upload-bytes",
                            str(MAX_UPLOAD), full_cli=True).start()
    yield server
    server.stop()
    server.kill_workers()


def submit(url: str, hospital: Hospital) -> HospitalClient:
    client = HospitalClient(url, progress=False)
    client.create_job()
    client.upload_dir("bundle", hospital.bundle_dir)
    client.upload_dir("dataset", hospital.dataset_dir)
    return client


def feature_strings(hospital: Hospital, n: int = 12) -> list[str]:
    """How plaintext features would look if anything logged them (several formats)."""
    values = [v for v in hospital.data[0][:4, :-1].ravel() if abs(v) > 1e-3][:n]
    out = []
    for v in values:
        out += [f"{v:.6f}", f"{v:.4f}", repr(float(v))[:10]]
    return out


# ---- the whole job ----------------------------------------------------------------------------
def test_end_to_end_job_matches_plaintext_mirror(service, hospital, tmp_path):
    client = submit(service.url, hospital)
    started = client.start()
    assert started["state"] in ("queued", "running")
    assert started["steps_per_epoch"] == 1 and started["max_epochs"] == 2
    seen: list[dict] = []
    final = client.answer_decisions(hospital.judge(), poll_s=0.3, timeout_s=240,
                                    on_status=seen.append)
    assert final["state"] == "finished" and final["epochs_done"] == 2
    assert final["bootstraps"] >= 2 and final["eta_seconds"] == 0
    assert any(s["state"] == "awaiting_decision" for s in seen)
    manifest = client.fetch_result(tmp_path / "result")
    assert manifest["best_epoch"] == 2
    weights = load_result_weights(hospital.keys, hospital.plan, tmp_path / "result")
    assert np.max(np.abs(weights - hospital.mirror_weights)) < 1e-3

    # The cloud never held a secret key and stored/logged no plaintext.
    job_dir = service.data_dir / "jobs" / client.job_id
    cloud_files = [p for p in service.data_dir.rglob("*") if p.is_file()]
    assert not [p for p in job_dir.rglob("*.bin") if looks_like_secret_key(p)]
    texts = "".join(p.read_bytes().decode("latin-1") for p in cloud_files
                    if p.suffix in (".log", ".out", ".sqlite3", ".json")
                    or p.name.startswith("jobs.sqlite3"))
    assert "worker.log" in {p.name for p in cloud_files}
    for needle in feature_strings(hospital):  # where a number starts, not inside one (a
        # log timestamp's "50.0969147" holds "0.0969"); a longer form still matches its prefix
        found = re.search(rf"(?<![\d.]){re.escape(needle)}", texts)
        assert found is None, f"plaintext feature {needle} found in cloud logs/DB"
    client.delete()
    with pytest.raises(ServiceError) as err:
        client.status()
    assert err.value.status_code == 404
    assert not job_dir.exists()


def test_worker_killed_and_service_restarted_resumes(hospital, tmp_path):
    server = ServiceProcess(tmp_path / "cloud").start()
    try:
        client = submit(server.url, hospital)
        client.start()
        judge = hospital.judge()
        status = client.wait_for_decision(poll_s=0.2, timeout_s=180)
        assert status["state"] == "awaiting_decision" and status["awaiting_epoch"] == 1
        epoch, data = client.validation_loss_bytes()
        loss_file = tmp_path / "loss.bin"
        loss_file.write_bytes(data)
        from medblindtuner.he.ciphertexts import load_ciphertext

        decision = judge(epoch, load_ciphertext(loss_file))
        client.decide(epoch, decision.continue_training, decision.best_epoch)
        job_dir = server.data_dir / "jobs" / client.job_id
        deadline = time.monotonic() + 60
        while not (job_dir / "checkpoints" / "epoch_0001").exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # the worker is now inside epoch 2
        pid = int((job_dir / "worker.pid").read_text())
        server.stop()  # the API goes down ...
        os.kill(pid, signal.SIGKILL)  # ... and the worker dies mid-step
        time.sleep(0.5)
        server.start()  # recovery: the job is restarted from the epoch-1 checkpoint
        final = client.answer_decisions(judge, poll_s=0.3, timeout_s=240)
        assert final["state"] == "finished" and final["restarts"] == 1
        assert int((job_dir / "worker.pid").read_text()) != pid
        client.fetch_result(tmp_path / "result")
        weights = load_result_weights(hospital.keys, hospital.plan, tmp_path / "result")
        assert np.max(np.abs(weights - hospital.mirror_weights)) < 1e-3
    finally:
        server.stop()
        server.kill_workers()


# ---- uploads ---------------------------------------------------------------------------------
def test_interrupted_upload_resumes(service, hospital):
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    # 6 chunks: the three small files (4 chunks), then 2 of the rotation keys' ~33.
    first = client.upload_dir("bundle", hospital.bundle_dir, max_chunks=6)
    assert first["interrupted"] and first["sent_chunks"] == 6
    status = client.artifact_status("bundle")
    assert sum(len(f["received"]) for f in status["files"].values()) == 6
    assert not status["complete"]
    partial = sum(len(f["received"]) for f in status["files"].values() if not f["complete"])
    assert partial == 2
    # A fresh client (e.g. after a crash of the hospital's machine) picks up where it stopped.
    again = HospitalClient(service.url, token=client.token, job_id=client.job_id, progress=False)
    second = again.upload_dir("bundle", hospital.bundle_dir)
    assert second["skipped_chunks"] == partial and not second["interrupted"]
    assert again.artifact_status("bundle")["complete"]
    again.delete()


def test_corrupted_truncated_and_tampered_chunks_are_refused(service, hospital):
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    client.upload_manifest("bundle", hospital.bundle_dir)
    data = (hospital.bundle_dir / "rotation_keys.bin").read_bytes()[:CHUNK]
    corrupted = bytes([data[0] ^ 0xFF]) + data[1:]
    import hashlib

    with pytest.raises(ServiceError) as err:  # bytes changed in transit
        client.upload_chunk("bundle", "rotation_keys.bin", 0, corrupted,
                            sha256=hashlib.sha256(data).hexdigest())
    assert err.value.status_code == 400 and "SHA-256" in err.value.message
    with pytest.raises(ServiceError) as err:  # truncated chunk
        client.upload_chunk("bundle", "rotation_keys.bin", 0, data[:1000])
    assert err.value.status_code == 400 and "truncated" in err.value.message
    # Chunks consistent with their own checksums but not with the manifest: refused at finalize.
    whole = (hospital.bundle_dir / "mult_key.bin").read_bytes()
    tampered = whole[:-1] + bytes([whole[-1] ^ 1])
    for i in range(0, len(tampered), CHUNK):
        client.upload_chunk("bundle", "mult_key.bin", i // CHUNK, tampered[i:i + CHUNK])
    with pytest.raises(ServiceError) as err:
        client.finalize("bundle", "mult_key.bin")
    assert err.value.status_code == 400 and "SHA-256" in err.value.message
    assert client.artifact_status("bundle")["files"]["mult_key.bin"]["received"] == []
    client.delete()


# ---- refusals -----------------------------------------------------------------------------
def _bundle_copy(hospital: Hospital, target: Path) -> Path:
    target.mkdir()
    for path in hospital.bundle_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_secret_key_upload_is_refused(service, hospital, tmp_path):
    from medblindtuner.formats import sha256_file

    # 1. A secret key disguised as the public key (manifest rewritten to match it).
    bundle = _bundle_copy(hospital, tmp_path / "evil")
    (bundle / "public_key.bin").write_bytes(hospital.secret_key.read_bytes())
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["public_key.bin"] = {"sha256": sha256_file(bundle / "public_key.bin"),
                                           "bytes": (bundle / "public_key.bin").stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    with pytest.raises(ServiceError) as err:
        client.upload_dir("bundle", bundle)
    assert err.value.status_code == 400 and "secret key" in err.value.message
    # 2. A bundle manifest that lists an extra secret_key.bin.
    manifest["files"]["secret_key.bin"] = manifest["files"]["public_key.bin"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    other = HospitalClient(service.url, progress=False)
    other.create_job()
    with pytest.raises(ServiceError) as err:
        other.upload_manifest("bundle", bundle)
    assert err.value.status_code == 400 and "exactly" in err.value.message
    blobs = list((service.data_dir / "blobs").rglob("*"))
    assert not [p for p in blobs if p.is_file() and looks_like_secret_key(p)]
    client.delete()
    other.delete()


def test_insecure_parameters_refused_without_flag(hospital, tmp_path):
    server = ServiceProcess(tmp_path / "secure-only", insecure=False).start()
    try:
        client = HospitalClient(server.url, progress=False)
        client.create_job()
        with pytest.raises(ServiceError) as err:
            client.upload_manifest("bundle", hospital.bundle_dir)
        assert err.value.status_code == 400 and "not 128-bit secure" in err.value.message
    finally:
        server.stop()


def test_dataset_for_other_parameters_refused(service, hospital, tmp_path):
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    with pytest.raises(ServiceError) as err:  # dataset before bundle
        client.upload_manifest("dataset", hospital.dataset_dir)
    assert err.value.status_code == 409
    client.upload_manifest("bundle", hospital.bundle_dir)
    other = tmp_path / "dataset"
    other.mkdir()
    manifest = json.loads((hospital.dataset_dir / "manifest.json").read_text())
    manifest["params_fingerprint"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServiceError) as err:
        client.upload_manifest("dataset", other)
    assert err.value.status_code == 400 and "other CKKS parameters" in err.value.message
    client.delete()


def test_size_limits(service, hospital, tmp_path):
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    manifest = json.loads((hospital.bundle_dir / "manifest.json").read_text())
    manifest["files"]["rotation_keys.bin"]["bytes"] = MAX_UPLOAD + 1
    big = tmp_path / "big"
    big.mkdir()
    (big / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServiceError) as err:
        client.upload_manifest("bundle", big)
    assert err.value.status_code == 413
    client.upload_manifest("bundle", hospital.bundle_dir)
    with pytest.raises(ServiceError) as err:
        client.upload_chunk("bundle", "rotation_keys.bin", 0, b"x" * (CHUNK + 1))
    assert err.value.status_code == 413
    with pytest.raises(ServiceError) as err:
        client.start()  # nothing finalized yet
    assert err.value.status_code == 409
    client.delete()


def test_refusals_leave_other_jobs_alone(service, hospital):
    good = HospitalClient(service.url, progress=False)
    good.create_job()
    good.upload_dir("bundle", hospital.bundle_dir)
    bad = HospitalClient(service.url, progress=False)
    bad.create_job()
    bad.upload_manifest("bundle", hospital.bundle_dir)
    with pytest.raises(ServiceError):
        bad.upload_chunk("bundle", "context.bin", 0, b"garbage", sha256="0" * 64)
    bad.delete()
    assert good.artifact_status("bundle")["complete"]
    assert good.status()["state"] == "created"
    good.delete()


# ---- authorisation ----------------------------------------------------------------------------
def test_every_job_endpoint_needs_that_jobs_token(service):
    owner = HospitalClient(service.url, progress=False)
    owner.create_job()
    intruder = HospitalClient(service.url, progress=False)
    intruder.create_job()
    job = f"/jobs/{owner.job_id}"
    endpoints = [
        ("GET", job, {}),
        ("PUT", f"{job}/artifacts/bundle/manifest", {"content": b"{}"}),
        ("GET", f"{job}/artifacts/bundle", {}),
        ("PUT", f"{job}/artifacts/bundle/files/context.bin/chunks/0",
         {"content": b"x", "headers": {"X-Chunk-SHA256": "0" * 64}}),
        ("POST", f"{job}/artifacts/bundle/files/context.bin/finalize", {}),
        ("POST", f"{job}/start", {}),
        ("GET", f"{job}/validation-loss", {}),
        ("POST", f"{job}/decision", {"json": {"continue": True, "best_epoch": 1}}),
        ("GET", f"{job}/refresh?wait=0", {}),
        ("POST", f"{job}/refresh", {"content": b"answer"}),
        ("GET", f"{job}/result", {}),
        ("GET", f"{job}/result/files/w0.bin", {}),
        ("POST", f"{job}/cancel", {}),
        ("DELETE", job, {}),
    ]
    with httpx.Client(base_url=service.url) as http:
        for method, path, kwargs in endpoints:
            headers = dict(kwargs.get("headers", {}))
            extra = {k: v for k, v in kwargs.items() if k != "headers"}
            anonymous = http.request(method, path, headers=headers, **extra)
            assert anonymous.status_code == 401, (method, path, anonymous.text)
            wrong = http.request(method, path, **extra, headers={
                **headers, "Authorization": f"Bearer {intruder.token}"})
            assert wrong.status_code == 403, (method, path, wrong.text)
            forged = http.request(method, path, **extra, headers={
                **headers, "Authorization": "Bearer not-a-token"})
            assert forged.status_code == 403, (method, path)
    assert owner.status()["state"] == "created"  # nothing above changed the job
    docs = httpx.get(f"{service.url}/openapi.json").json()
    assert any(re.search(r"/validation-loss$", p) for p in docs["paths"])
    owner.delete()
    intruder.delete()


def test_token_is_stored_only_as_a_hash(service):
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    db = b"".join(p.read_bytes() for p in service.data_dir.glob("jobs.sqlite3*"))
    assert client.token.encode() not in db
    client.delete()


def test_status_is_served_while_a_job_uploads(service, hospital):
    """Status polling from many threads while an upload is in flight never fails."""
    uploader = HospitalClient(service.url, progress=False)
    uploader.create_job()
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            for _ in range(10):
                uploader.status()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    uploader.upload_dir("bundle", hospital.bundle_dir)
    for t in threads:
        t.join()
    assert not errors
    uploader.delete()
