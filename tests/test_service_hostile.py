"""Hostile input against a real service process: artifacts the OpenFHE parser chokes on.

A bit flipped in a key file, with the manifest's checksum recomputed to match, reaches the
C++ deserialiser; it must be parsed in the validator subprocess, so the web process survives,
the job is refused with a clear message, and the other jobs go on.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import postgres_url
from helpers_he import plan_and_keys, toy_problem
from helpers_service import ServiceProcess

from medblindtuner.formats import sha256_file
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import PRODUCTION
from medblindtuner.hospital.client import HospitalClient, ServiceError, load_result_weights
from medblindtuner.hospital.crypto import encrypt_dataset
from medblindtuner.training.plain import TrainConfig
from medblindtuner.training.plan import TrainingPlan

# Byte 24 of a public-key file is a length field of the serialised key: flipping bit 6 makes
# OpenFHE try to allocate and read ~2^62 bytes (found by scanning single-bit flips).
FLIP_OFFSET, FLIP_BIT = 24, 0x40


@dataclass
class Artifacts:
    """The hospital's side: its keys and plan, and the folders it uploads."""

    root: Path
    keys: HospitalKeys
    plan: TrainingPlan
    n_val: int


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Artifacts:
    root = tmp_path_factory.mktemp("hospital")
    data = toy_problem(2)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=128, patience=5)
    plan, keys = plan_and_keys(2, config, data)
    keys.save_public_bundle(root / "bundle")
    encrypt_dataset(keys, plan, *data).save(root / "dataset", keys.params)
    return Artifacts(root, keys, plan, len(data[3]))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server = ServiceProcess(tmp_path_factory.mktemp("cloud")).start()
    yield server
    server.stop()
    server.kill_workers()


def copy_artifact(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_entry(directory: Path, name: str) -> None:
    """Make the manifest agree with the (modified) file: only the parser can notice."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = {**manifest["files"][name], "sha256": sha256_file(directory / name),
                               "bytes": (directory / name).stat().st_size}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def alive(service: ServiceProcess) -> bool:
    return (service.process.poll() is None
            and httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200)


def submit(url: str, bundle: Path, dataset: Path) -> HospitalClient:
    client = HospitalClient(url, progress=False)
    client.create_job()
    client.upload_dir("bundle", bundle)
    client.upload_dir("dataset", dataset)
    return client


def test_flipped_bit_in_public_key_is_refused_and_the_service_survives(service, artifacts,
                                                                       tmp_path):
    bundle = copy_artifact(artifacts.root / "bundle", tmp_path / "bundle")
    flip_bit(bundle / "public_key.bin", FLIP_OFFSET, FLIP_BIT)
    rewrite_entry(bundle, "public_key.bin")
    bad = HospitalClient(service.url, progress=False)
    bad.create_job()
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        bad.upload_dir("bundle", bundle)
    assert err.value.status_code == 400
    assert "public_key.bin" in err.value.message or "memory" in err.value.message
    assert time.monotonic() - started < 120
    assert alive(service)
    status = bad.artifact_status("bundle")
    assert not status["files"]["public_key.bin"]["complete"]
    assert status["files"]["public_key.bin"]["received"] == []  # dropped: upload it again
    with pytest.raises(ServiceError) as err:
        bad.start()
    assert err.value.status_code == 409
    # Another job, with the genuine files, goes through validation and starts training.
    good = submit(service.url, artifacts.root / "bundle", artifacts.root / "dataset")
    assert good.start()["state"] in ("queued", "running")
    good.cancel()
    good.delete()
    bad.delete()
    assert alive(service)


def test_production_claim_with_insecure_ring_files_is_refused(service, artifacts, tmp_path):
    """The manifest declares 128-bit parameters (fingerprint consistent), the files are the
    tiny test ring: the validator compares the declaration with the files' own headers, at
    finalize of the context (and again at start)."""
    bundle = copy_artifact(artifacts.root / "bundle", tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    claimed = PRODUCTION.with_bootstrap_slots(tuple(manifest["params"]["bootstrap_slots"]))
    manifest.update(params=claimed.to_dict(), params_fingerprint=claimed.fingerprint())
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    with pytest.raises(ServiceError) as err:
        client.upload_dir("bundle", bundle)
    assert err.value.status_code == 400
    assert "ring dimension 4096" in err.value.message and "65536" in err.value.message
    assert not client.artifact_status("bundle")["complete"]
    with pytest.raises(ServiceError) as err:
        client.start()
    assert err.value.status_code == 409  # the job cannot start with it
    assert alive(service)
    client.delete()


def test_a_secret_key_among_a_batch_of_ciphertexts_is_refused_by_name(service, artifacts,
                                                                       tmp_path):
    """The dataset's files are finalized several at a time, one validator child for their
    ciphertexts: a secret key disguised as one of them fails the batch, then each file is
    checked alone, so the refusal names that file, the files before it are stored and it is
    not (genuine datasets finalize in batches in every other test here)."""
    dataset = copy_artifact(artifacts.root / "dataset", tmp_path / "dataset")
    names = sorted(json.loads((dataset / "manifest.json").read_text())["files"])
    assert len(names) >= 3
    victim = names[1]
    artifacts.keys.save_secret_key(tmp_path / "secret.bin")
    shutil.copyfile(tmp_path / "secret.bin", dataset / victim)
    rewrite_entry(dataset, victim)
    client = HospitalClient(service.url, progress=False)
    client.create_job()
    client.upload_dir("bundle", artifacts.root / "bundle")
    with pytest.raises(ServiceError) as err:
        client.upload_dir("dataset", dataset)
    assert err.value.status_code == 400
    assert "secret key" in err.value.message and victim in err.value.message
    files = client.artifact_status("dataset")["files"]
    assert files[names[0]]["complete"] and not files[victim]["complete"]
    assert files[victim]["received"] == []  # dropped: upload it again
    with pytest.raises(ServiceError) as err:  # a batch naming no file of the upload
        client._request("POST", client._job("/artifacts/dataset/finalize"),
                        json={"names": ["no-such-file.bin"] * 2})
    assert err.value.status_code == 422
    with pytest.raises(ServiceError) as err:
        client.start()
    assert err.value.status_code == 409  # the job cannot start without it
    client.delete()
    assert alive(service)


def test_whole_job_on_postgresql(artifacts, tmp_path):
    """The real service and its worker on a PostgreSQL job store (skipped without a server;
    CI starts one). SQLite runs the same job in test_service.py."""
    url = postgres_url()
    server = ServiceProcess(tmp_path / "cloud", "--db-url", url).start()
    try:
        client = submit(server.url, artifacts.root / "bundle", artifacts.root / "dataset")
        client.start()
        status = client.wait_for_decision(poll_s=0.3, timeout_s=240)
        assert status["state"] == "awaiting_decision" and status["awaiting_epoch"] == 1
        client.decide(1, False, 1)  # stop after one epoch: the worker's whole path, shorter
        deadline = time.monotonic() + 120
        while (final := client.status())["state"] not in ("finished", "failed"):
            assert time.monotonic() < deadline, final
            time.sleep(0.3)
        assert final["state"] == "finished" and final["best_epoch"] == 1
        client.fetch_result(tmp_path / "result")
        weights = load_result_weights(artifacts.keys, artifacts.plan, tmp_path / "result")
        assert weights.shape[0] == 1
        assert not list((tmp_path / "cloud").glob("*.sqlite3"))  # nothing went to SQLite
        client.delete()
    finally:
        server.stop()
        server.kill_workers()
