"""In-process tests of the cloud's domain logic (`service.jobs`, `uploads`, `supervisor`).

No uvicorn and no real worker: a `CloudService` on a temporary data dir with its SQLite store,
artifacts whose manifests are real (parameters, fingerprints, training plan) but whose files are
random bytes, and stand-in worker processes (`sleep`, `true`). The HTTP round trips, real keys
and real training are in test_service.py / test_service_inference.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers_he import toy_problem

from medblindtuner import protocol
from medblindtuner.he.keys import BUNDLE_FORMAT
from medblindtuner.he.params import INSECURE_TEST
from medblindtuner.service.errors import (
    BadRequest,
    CloudError,
    Conflict,
    Forbidden,
    NotFound,
    TooLarge,
    Unauthorized,
    Unprocessable,
)
from medblindtuner.service.jobs import CloudService
from medblindtuner.service.limits import ServiceConfig, ServiceLimits
from medblindtuner.service.store import Job, QuerySet
from medblindtuner.service.supervisor import WorkerRef
from medblindtuner.service.uploads import BUNDLE_FILES, chunk_digest
from medblindtuner.training.artifacts import DATASET_FORMAT, QUERIES_FORMAT, SCORES_FORMAT
from medblindtuner.training.plain import TrainConfig
from medblindtuner.training.plan import TrainingPlan

CHUNK = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Artifact:
    """A manifest (as the hospital writes it) and the bytes of the files it lists;
    `override` replaces manifest fields after the fact (to make it wrong)."""

    def __init__(self, manifest: dict, files: dict[str, bytes], override: dict) -> None:
        self.files = files
        self.manifest = {**manifest, "files": {
            name: {"sha256": sha(data), "bytes": len(data)} for name, data in files.items()},
            **override}

    @property
    def raw(self) -> bytes:
        return json.dumps(self.manifest).encode()


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


@pytest.fixture(scope="module")
def plan() -> TrainingPlan:
    data = toy_problem(2)
    return TrainingPlan.create(INSECURE_TEST, data[0], data[2], 2,
                               TrainConfig(learning_rate=1.0, epochs=2, batch_size=128))


@pytest.fixture(scope="module")
def params(plan):
    return INSECURE_TEST.with_bootstrap_slots(plan.bootstrap_slots)


def bundle_artifact(params, **override) -> Artifact:
    files = {name: random_bytes(2 * CHUNK + 100 + i, i)
             for i, name in enumerate(sorted(BUNDLE_FILES))}
    manifest = {"format": BUNDLE_FORMAT, "params": params.to_dict(),
                "params_fingerprint": params.fingerprint()}
    return Artifact(manifest, files, override)


def dataset_artifact(params, training_plan, **override) -> Artifact:
    files = {f"{split}_0000_{kind}.bin": random_bytes(3000 if split == "train" else 700,
                                                     10 + 3 * (split == "val") + i)
             for split in ("train", "val") for i, kind in enumerate(("x_dup", "x_grad", "y0"))}
    manifest = {"format": DATASET_FORMAT, "params_fingerprint": params.fingerprint(),
                "plan": training_plan.to_dict()}
    return Artifact(manifest, files, override)


def query_artifact(params, sizes=(40,), **override) -> Artifact:
    files = {protocol.query_file_name(i): random_bytes(1500, 20 + i) for i in range(len(sizes))}
    manifest = {"format": QUERIES_FORMAT, "params_fingerprint": params.fingerprint(),
                "sizes": list(sizes)}
    return Artifact(manifest, files, override)


class StandIns:
    """Spawner for the supervisor: `sleep` (a worker that lives) or `true` (one that dies)."""

    def __init__(self) -> None:
        self.command = ["sleep", "60"]
        self.started: list[tuple[WorkerRef, subprocess.Popen]] = []

    def __call__(self, _config: ServiceConfig, ref: WorkerRef) -> subprocess.Popen:
        process = subprocess.Popen(self.command, start_new_session=True)
        self.started.append((ref, process))
        return process

    def kill_all(self) -> None:
        for _ref, process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait()


class StandInValidator:
    """The validator for random-byte files: the manifest-level bundle checks (checksums, file
    set, parameters) in-process, no OpenFHE parse (random bytes would not parse). The real
    subprocess validator is tested with real keys (test_service_hostile.py)."""

    def __init__(self) -> None:
        self.files: list[str] = []

    def check_file(self, _path: Path, _kind: str, name: str,
                   _ring_dim: int | None = None) -> None:
        self.files.append(name)

    def batch_passes(self, paths: list[Path], _role: str, _declared: dict | None) -> bool:
        self.files.extend(path.name.removesuffix(".part") for path in paths)
        return True

    def check_job(self, job_dir: Path, query_id: str | None = None) -> None:
        from medblindtuner.he.keys import BundleError, verify_public_bundle

        try:
            verify_public_bundle(job_dir / "bundle", allow_insecure=True)
        except BundleError as exc:
            raise BadRequest(f"refusing to train: {exc}") from exc


@pytest.fixture
def workers():
    stand_ins = StandIns()
    yield stand_ins
    stand_ins.kill_all()


_DATABASE: dict[str, str | None] = {"url": None}


@pytest.fixture(autouse=True)
def _database(db_url):
    """Every test of this module runs on SQLite and on PostgreSQL (`conftest.db_url`)."""
    _DATABASE["url"] = db_url
    yield
    _DATABASE["url"] = None


def make_service(tmp_path: Path, workers: StandIns, insecure: bool = True,
                 **limits) -> CloudService:
    config = ServiceConfig(data_dir=tmp_path / "cloud", db_url=_DATABASE["url"],
                           allow_insecure=insecure,
                           limits=ServiceLimits(chunk_bytes=CHUNK, **limits),
                           max_worker_restarts=2)
    return CloudService(config, spawn=workers, validator=StandInValidator())


@pytest.fixture
def cloud(tmp_path, workers):
    service = make_service(tmp_path, workers)
    yield service
    service.stop()


def upload(service: CloudService, job_id: str, kind: str, artifact: Artifact) -> None:
    """What `HospitalClient.upload_dir` does, in-process."""
    service.uploads.accept_manifest(job_id, kind, artifact.raw)
    for name, data in artifact.files.items():
        for index in range(max(1, -(-len(data) // CHUNK))):
            chunk = data[index * CHUNK:(index + 1) * CHUNK]
            service.uploads.accept_chunk(job_id, kind, name, index, chunk, sha(chunk))
        service.uploads.finalize(job_id, kind, name)


def submitted(service: CloudService, params, plan) -> str:
    job_id = service.create_job()["job_id"]
    upload(service, job_id, "bundle", bundle_artifact(params))
    upload(service, job_id, "dataset", dataset_artifact(params, plan))
    return job_id


def set_job(service: CloudService, job_id: str, **fields) -> None:
    """Play the worker's part: it reports through the DB."""
    with service.store.session() as session:
        job = session.get(Job, job_id)
        for key, value in fields.items():
            setattr(job, key, value)


def refused(error: type[CloudError], match: str | None = None):
    return pytest.raises(error, match=match)


# ---- access -------------------------------------------------------------------------------------
def test_tokens_authorise_only_their_own_job(cloud):
    first, second = cloud.create_job(), cloud.create_job()
    assert cloud.authorise(first["job_id"], first["token"]) == first["job_id"]
    with refused(Unauthorized, "missing bearer token") as error:
        cloud.authorise(first["job_id"], None)
    assert error.value.status_code == 401
    assert error.value.headers == {"WWW-Authenticate": "Bearer"}
    with refused(Forbidden) as error:
        cloud.authorise(first["job_id"], second["token"])
    assert error.value.status_code == 403
    with refused(NotFound, "no such job"):
        cloud.authorise("0" * 32, first["token"])
    with refused(NotFound, "unknown artifact kind"):
        cloud.check_kind("weights")
    assert cloud.status(first["job_id"])["state"] == protocol.CREATED


# ---- uploads ------------------------------------------------------------------------------------
def test_upload_resumes_from_the_chunks_the_server_holds(cloud, params, plan):
    job_id = cloud.create_job()["job_id"]
    bundle = bundle_artifact(params)
    assert cloud.uploads.accept_manifest(job_id, "bundle", bundle.raw)["resumed"] is False
    assert cloud.uploads.accept_manifest(job_id, "bundle", bundle.raw)["resumed"] is True
    name = sorted(bundle.files)[0]
    data = bundle.files[name]
    first = data[:CHUNK]
    cloud.uploads.accept_chunk(job_id, "bundle", name, 0, first, sha(first))
    state = cloud.uploads.status(job_id, "bundle")
    assert state["files"][name]["received"] == [0]
    assert state["files"][name]["n_chunks"] == 3
    assert not state["complete"]
    with refused(Conflict, r"chunks \[1, 2\] not received yet"):
        cloud.uploads.finalize(job_id, "bundle", name)
    upload(cloud, job_id, "bundle", bundle)  # the rest, as a resuming client would
    state = cloud.uploads.status(job_id, "bundle")
    assert state["complete"] and all(f["complete"] for f in state["files"].values())
    linked = cloud.job_dir(job_id) / "bundle" / name
    assert linked.read_bytes() == data
    assert cloud.blobs.path_for(sha(data)).exists()
    assert cloud.status(job_id)["params"]["fingerprint"] == params.fingerprint()
    with refused(Conflict, "a different bundle manifest was already uploaded"):
        cloud.uploads.accept_manifest(job_id, "bundle",
                                      bundle_artifact(params, rotation_indices=[1]).raw)


def test_bad_chunks_and_tampered_files_are_refused(cloud, params):
    job_id = cloud.create_job()["job_id"]
    bundle = bundle_artifact(params)
    name = sorted(bundle.files)[0]
    # The manifest promises other bytes than the ones that will be sent (same length).
    tampered = bytes(b ^ 1 for b in bundle.files[name][:10]) + bundle.files[name][10:]
    cloud.uploads.accept_manifest(job_id, "bundle", bundle.raw)
    chunk = tampered[:CHUNK]
    with refused(BadRequest, "does not match its SHA-256 header"):
        cloud.uploads.accept_chunk(job_id, "bundle", name, 0, chunk, sha(b"other"))
    with refused(BadRequest, "truncated"):
        cloud.uploads.accept_chunk(job_id, "bundle", name, 0, chunk[:-1], sha(chunk[:-1]))
    with refused(BadRequest, r"outside 0..2"):
        cloud.uploads.accept_chunk(job_id, "bundle", name, 3, chunk, sha(chunk))
    with refused(NotFound, "is not a file of this job's bundle manifest"):
        cloud.uploads.accept_chunk(job_id, "bundle", "secret_key.bin", 0, chunk, sha(chunk))
    with refused(BadRequest, "X-Chunk-SHA256 header"):
        chunk_digest("not-hex")
    assert chunk_digest(sha(chunk).upper()) == sha(chunk)
    for index in range(3):
        part = tampered[index * CHUNK:(index + 1) * CHUNK]
        cloud.uploads.accept_chunk(job_id, "bundle", name, index, part, sha(part))
    with refused(BadRequest, "does not match the SHA-256 in its manifest"):
        cloud.uploads.finalize(job_id, "bundle", name)
    # The staged bytes and chunk records are gone: the client starts that file again.
    assert cloud.uploads.status(job_id, "bundle")["files"][name]["received"] == []
    assert not cloud.uploads.staging_path(job_id, "bundle", name).exists()


@pytest.mark.parametrize("change, error, message", [
    (lambda m: b"{not json", BadRequest, "not valid JSON"),
    (lambda m: json.dumps([1]).encode(), Unprocessable, "must be a JSON object"),
    (lambda m: {**m, "files": {"../x": {"sha256": "0" * 64, "bytes": 1}}}, BadRequest,
     "illegal file name"),
    (lambda m: {**m, "files": {"manifest.json": {"sha256": "0" * 64, "bytes": 1}}}, BadRequest,
     "illegal file name"),
    (lambda m: {**m, "files": {"a.bin": {"bytes": 1}}}, Unprocessable, "files.a.bin.sha256"),
    (lambda m: {**m, "files": {"a.bin": {"sha256": "0" * 64, "bytes": True}}}, Unprocessable,
     "files.a.bin.bytes"),
    (lambda m: {**m, "files": {"a.bin": {"sha256": "0" * 64, "bytes": 0}}}, Unprocessable,
     "greater than or equal to 1"),
    (lambda m: {**m, "files": {"a.bin": {"sha256": "0" * 64, "bytes": 1 << 40}}}, TooLarge,
     "per-file limit"),
    (lambda m: {**m, "files": {f"f{i}": {"sha256": "0" * 64, "bytes": 1} for i in range(9)}},
     TooLarge, "the limit is 8"),
    (lambda m: {**m, "format": "other"}, BadRequest, "not a public bundle manifest"),
    (lambda m: {**m, "params_fingerprint": "0" * 16}, BadRequest, "do not match their fingerp"),
    (lambda m: {**m, "params": {"ring_dim": "x"}}, Unprocessable, "params.ring_dim"),
    (lambda m: {**m, "params": {**m["params"], "ring_dim": 3000}}, Unprocessable,
     "power of two"),
    (lambda m: {**m, "params": {**m["params"], "depth": 10**6}}, Unprocessable, "params.depth"),
    (lambda m: {**m, "surprise": 1}, Unprocessable, "surprise: Extra inputs"),
    (lambda m: json.dumps(m).replace('"depth": 24', '"depth": ' + "9" * 5000).encode(),
     Unprocessable, "integer of 5000 digits"),
    (lambda m: b"[" * 100_000 + b"]" * 100_000, Unprocessable, "nests deeper than 16"),
    (lambda m: json.dumps(m).encode() + b" " * (4 << 20), TooLarge, "the limit is"),
    (lambda m: {**m, "files": {**m["files"], "secret_key.bin": m["files"]["context.bin"]}},
     BadRequest, "must hold exactly"),
])
def test_bad_bundle_manifests_are_refused(tmp_path, workers, params, change, error, message):
    service = make_service(tmp_path, workers, max_files_per_artifact=8)
    job_id = service.create_job()["job_id"]
    changed = change(bundle_artifact(params).manifest)
    raw = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
    with refused(error, message):
        service.uploads.accept_manifest(job_id, "bundle", raw)
    assert service.uploads.status(job_id, "bundle")["manifest"] is None
    service.stop()


def test_job_size_limit_counts_all_artifacts(tmp_path, workers, params, plan):
    bundle = bundle_artifact(params)
    bundle_bytes = sum(len(d) for d in bundle.files.values())
    service = make_service(tmp_path, workers, max_job_bytes=bundle_bytes + len(bundle.raw))
    job_id = service.create_job()["job_id"]
    tight = make_service(tmp_path / "tight", workers, max_job_bytes=bundle_bytes)
    with refused(TooLarge, "manifests included"):  # the manifest's own bytes count too
        tight.uploads.accept_manifest(tight.create_job()["job_id"], "bundle", bundle.raw)
    tight.stop()
    service.uploads.accept_manifest(job_id, "bundle", bundle.raw)
    with refused(TooLarge, "per-job limit"):
        service.uploads.accept_manifest(job_id, "dataset", dataset_artifact(params, plan).raw)
    service.stop()


def test_insecure_bundle_refused_by_a_secure_service(tmp_path, workers, params):
    service = make_service(tmp_path, workers, insecure=False)
    job_id = service.create_job()["job_id"]
    with refused(BadRequest, "refusing bundle: .* not 128-bit secure"):
        service.uploads.accept_manifest(job_id, "bundle", bundle_artifact(params).raw)
    service.stop()


def test_dataset_must_follow_and_match_the_bundle(cloud, params, plan):
    job_id = cloud.create_job()["job_id"]
    dataset = dataset_artifact(params, plan)
    with refused(Conflict, "upload the public bundle manifest before the dataset manifest"):
        cloud.uploads.accept_manifest(job_id, "dataset", dataset.raw)
    cloud.uploads.accept_manifest(job_id, "bundle", bundle_artifact(params).raw)
    other = dataset_artifact(params, plan, params_fingerprint="f" * 16)
    with refused(BadRequest, "other CKKS parameters than the job's bundle"):
        cloud.uploads.accept_manifest(job_id, "dataset", other.raw)
    with refused(Unprocessable, "plan.n_classes: Field required"):
        cloud.uploads.accept_manifest(job_id, "dataset",
                                      dataset_artifact(params, plan, plan={}).raw)
    good = dataset_artifact(params, plan).manifest
    for change, error, message in [
        (lambda p: {**p, "config": {**p["config"], "epochs": 10**30}}, Unprocessable,
         "integer of 31 digits"),
        (lambda p: {**p, "config": {**p["config"], "epochs": 5000}}, Unprocessable,
         "5000 epochs; the limit is 1000"),
        (lambda p: {**p, "config": {**p["config"], "epochs": True}}, Unprocessable,
         "config.epochs: Input should be a valid integer"),
        (lambda p: {**p, "train_batch_sizes": [0]}, Unprocessable, "greater than or equal"),
        (lambda p: {**p, "train_batch_sizes": [10**6]}, Unprocessable, "training batches of "),
        (lambda p: {**p, "train_batch_sizes": [60, 60]}, BadRequest, "do not match its plan"),
        (lambda p: {**p, "activation": {**p["activation"], "n_classes": 3}}, Unprocessable,
         "activation is for 3 classes"),
        (lambda p: {**p, "denominator_chunks": 0}, Unprocessable, "greater than or equal"),
        (lambda p: {**p, "compact_sigmoid": "yes"}, Unprocessable,
         "compact_sigmoid: Input should be a valid boolean"),
        (lambda p: {**p, "n_classes": 3, "compact_sigmoid": True,
                    "activation": {**p["activation"], "n_classes": 3}}, Unprocessable,
         "compact_sigmoid is for a binary head"),
        (lambda p: {**p, "compact_softmax": True}, Unprocessable,
         "compact_softmax is for a softmax head"),
        (lambda p: {**p, "n_classes": 3, "compact_softmax": True,
                    "activation": {**p["activation"], "n_classes": 3}}, Unprocessable,
         "takes one exponential a step, which these parameters"),
        (lambda p: {**p, "n_features": 4 * p["n_features"]}, BadRequest,
         "bootstraps at .* but the bundle has bootstrapping keys for"),
    ]:
        raw = json.dumps({**good, "plan": change(good["plan"])}).encode()
        with refused(error, message):
            cloud.uploads.accept_manifest(job_id, "dataset", raw)
    missing = {**good, "files": dict(list(good["files"].items())[1:])}
    with refused(BadRequest, "do not match its plan"):
        cloud.uploads.accept_manifest(job_id, "dataset", json.dumps(missing).encode())
    with refused(BadRequest, "not an encrypted dataset manifest"):
        cloud.uploads.accept_manifest(job_id, "dataset",
                                      dataset_artifact(params, plan, format="x").raw)
    cloud.uploads.accept_manifest(job_id, "dataset", dataset.raw)
    status = cloud.status(job_id)
    assert (status["max_epochs"], status["steps_per_epoch"]) == (2, len(plan.train_batch_sizes))


def test_a_batch_finalize_checks_its_ciphertexts_in_one_child_or_each_alone(cloud, params, plan):
    """`finalize_many`: the dataset's ciphertexts in one validator run; a batch that fails is
    checked file by file (the refusal is a single finalize's); done files answer done, and a
    batch naming a file twice or too many files is refused before anything is checked."""
    calls: list[tuple[str, int]] = []

    class Counting(StandInValidator):
        def __init__(self, passes: bool) -> None:
            super().__init__()
            self.passes = passes

        def check_file(self, path, kind, name, ring_dim=None) -> None:  # noqa: ANN001
            calls.append(("file", 1))

        def batch_passes(self, paths, role, declared) -> bool:  # noqa: ANN001
            calls.append(("batch", len(paths)))
            return self.passes

    dataset = dataset_artifact(params, plan)
    names = sorted(dataset.files)
    for passes, expected in ((True, [("batch", 6)]), (False, [("batch", 6)] + [("file", 1)] * 6)):
        calls.clear()
        cloud.uploads.validator = Counting(passes)
        job_id = cloud.create_job()["job_id"]
        upload(cloud, job_id, "bundle", bundle_artifact(params))
        calls.clear()
        cloud.uploads.accept_manifest(job_id, "dataset", dataset.raw)
        for name, data in dataset.files.items():
            cloud.uploads.accept_chunk(job_id, "dataset", name, 0, data[:CHUNK], sha(data[:CHUNK]))
            for index in range(1, -(-len(data) // CHUNK)):
                chunk = data[index * CHUNK:(index + 1) * CHUNK]
                cloud.uploads.accept_chunk(job_id, "dataset", name, index, chunk, sha(chunk))
        answer = cloud.uploads.finalize_many(job_id, "dataset", names)
        assert calls == expected
        assert sorted(answer["files"]) == names and all(
            f["complete"] and f["sha256"] == sha(dataset.files[f["name"]])
            for f in answer["files"].values())
        assert cloud.uploads.status(job_id, "dataset")["complete"]
        calls.clear()
        assert cloud.uploads.finalize_many(job_id, "dataset", names[:2])["files"][names[0]][
            "complete"] and calls == []  # already done: nothing checked again
    with refused(Unprocessable, "distinct"):
        cloud.uploads.finalize_many(job_id, "dataset", [names[0], names[0]])
    with refused(Unprocessable, "between 1 and"):
        cloud.uploads.finalize_many(job_id, "dataset", [f"f{i}" for i in range(65)])
    for name in ("nul\x00byte.bin", "../dataset/manifest.json", "\ud800"):  # never queried
        with refused(NotFound, "is not a file of this job"):
            cloud.uploads.finalize_many(job_id, "dataset", [names[0], name])
        with refused(NotFound, "is not a file of this job"):
            cloud.uploads.finalize(job_id, "dataset", name)


# ---- training lifecycle -------------------------------------------------------------------------
def test_start_needs_complete_uploads_then_spawns_one_worker(cloud, workers, params, plan):
    job_id = cloud.create_job()["job_id"]
    with refused(Conflict, "the bundle manifest has not been uploaded"):
        cloud.start_job(job_id)
    bundle = bundle_artifact(params)
    cloud.uploads.accept_manifest(job_id, "bundle", bundle.raw)
    upload(cloud, job_id, "dataset", dataset_artifact(params, plan))
    with refused(Conflict, "bundle files not finalized"):
        cloud.start_job(job_id)
    upload(cloud, job_id, "bundle", bundle)
    status = cloud.start_job(job_id)
    assert status["state"] == protocol.QUEUED
    (ref, process), = workers.started
    assert ref == WorkerRef(job_id)
    with cloud.store.session() as session:
        assert session.get(Job, job_id).worker_pid == process.pid
    assert cloud.supervisor.running(ref)
    with refused(Conflict, "job is already queued"):
        cloud.start_job(job_id)
    with refused(Conflict, "job is queued: uploads are closed"):
        cloud.uploads.finalize(job_id, "bundle", sorted(bundle.files)[0])
    assert cloud.cancel(job_id)["state"] == protocol.CANCELLED
    assert process.poll() is not None  # SIGTERMed by the supervisor
    with refused(Conflict, "job is cancelled, not awaiting a decision"):
        cloud.decide(job_id, True, 1)


def test_tampered_bundle_on_disk_refused_at_start(cloud, workers, params, plan):
    job_id = submitted(cloud, params, plan)
    target = cloud.job_dir(job_id) / "bundle" / "context.bin"
    data = target.read_bytes()
    target.unlink()  # a hard link into the blob store: replace it, do not write through it
    target.write_bytes(data[:-1] + b"x")
    with refused(BadRequest, "refusing to train: .*checksum"):
        cloud.start_job(job_id)
    assert not workers.started
    assert cloud.status(job_id)["state"] == protocol.CREATED


def test_dead_workers_are_restarted_then_the_job_fails(cloud, workers, params, plan):
    workers.command = ["true"]  # every worker dies at once
    job_id = submitted(cloud, params, plan)
    cloud.start_job(job_id)
    for restarts in (1, 2):
        workers.started[-1][1].wait()
        cloud.supervisor.check()
        assert cloud.status(job_id)["restarts"] == restarts
        assert len(workers.started) == restarts + 1
    workers.started[-1][1].wait()
    cloud.supervisor.check()
    status = cloud.status(job_id)
    assert status["state"] == protocol.FAILED
    assert status["error"] == "worker died 3 times; giving up"
    assert len(workers.started) == 3
    assert not cloud.supervisor.children  # reaped


def test_a_check_while_a_job_starts_waits_for_its_worker(cloud, workers, params, plan):
    """The monitor checking between a route's commit of "queued" and its worker's start saw
    the job without a worker and started a second one (seen once in the HTTP tests): it now
    waits for the route, then finds the one worker running."""
    job_id = submitted(cloud, params, plan)
    monitor: list[threading.Thread] = []
    spawn = cloud.supervisor._spawn

    def spawn_while_the_monitor_checks(config, ref):
        if not monitor:
            monitor.append(threading.Thread(target=cloud.supervisor.check))
            monitor[0].start()
            monitor[0].join(timeout=0.5)  # unguarded, the check revives the job here
        return spawn(config, ref)

    cloud.supervisor._spawn = spawn_while_the_monitor_checks
    cloud.start_job(job_id)
    monitor[0].join(timeout=10)
    assert not monitor[0].is_alive()
    assert len(workers.started) == 1
    assert cloud.status(job_id)["restarts"] == 0


def test_decisions_only_for_the_awaited_epoch(cloud, params, plan):
    job_id = submitted(cloud, params, plan)
    with refused(Conflict, "job is created, not awaiting a decision"):
        cloud.validation_loss(job_id)
    set_job(cloud, job_id, state=protocol.AWAITING_DECISION, awaiting_epoch=2, best_epoch=1,
            loss_sha256="a" * 64)
    path, epoch, digest = cloud.validation_loss(job_id)
    assert (path, epoch, digest) == (protocol.decision_path(cloud.job_dir(job_id), 2), 2,
                                     "a" * 64)
    assert path == cloud.job_dir(job_id) / "decisions" / "loss_epoch_0002.bin"
    with refused(Conflict, "awaits the decision for epoch 2, not 1"):
        cloud.decide(job_id, True, 2, epoch=1)
    with refused(Unprocessable, r"best_epoch must be one of \[1, 2\]") as error:
        cloud.decide(job_id, True, 3, epoch=2)
    assert error.value.status_code == 422
    assert cloud.decide(job_id, False, 1, epoch=2) == {"accepted": True, "epoch": 2}
    with refused(Conflict, "epoch 2 was already answered"):
        cloud.decide(job_id, True, 2)


def finished(service: CloudService, params, plan) -> str:
    """A job as its worker leaves it: result manifest and weight files on disk."""
    job_id = submitted(service, params, plan)
    result = service.job_dir(job_id) / protocol.RESULT_DIR
    result.mkdir()
    weight = random_bytes(500, 30)
    (result / protocol.result_weight_name(0)).write_bytes(weight)
    manifest = {"format": protocol.RESULT_FORMAT, "rows": 1, "best_epoch": 2,
                "params_fingerprint": params.fingerprint(),
                "files": {"w0.bin": {"sha256": sha(weight), "bytes": len(weight)}}}
    (result / protocol.MANIFEST_NAME).write_text(json.dumps(manifest))
    set_job(service, job_id, state=protocol.FINISHED, result_ready=True)
    return job_id


def test_result_files_are_served_only_when_listed(cloud, params, plan):
    job_id = submitted(cloud, params, plan)
    with refused(Conflict, "job is created; the result is not ready"):
        cloud.result_manifest(job_id)
    job_id = finished(cloud, params, plan)
    assert cloud.result_manifest(job_id)["rows"] == 1
    path, digest = cloud.result_file(job_id, "w0.bin")
    assert sha(path.read_bytes()) == digest
    with refused(NotFound, "'manifest.json' is not part of the result"):
        cloud.result_file(job_id, "manifest.json")
    with refused(Conflict, "job already finished"):
        cloud.cancel(job_id)


# ---- encrypted inference ------------------------------------------------------------------------
def test_query_set_lifecycle(cloud, workers, params, plan):
    running = submitted(cloud, params, plan)
    with refused(Conflict, "encrypted inference needs a finished job"):
        cloud.create_query(running)
    job_id = finished(cloud, params, plan)
    query_id = cloud.create_query(job_id)["query_id"]
    kind = cloud.query_kind_of(job_id, query_id)
    assert kind == protocol.query_kind(query_id)
    with refused(Forbidden, "does not grant access to this query set"):
        cloud.query_kind_of(running, query_id)
    with refused(NotFound, "no such query set"):
        cloud.query_kind_of(job_id, "../x")
    per_ct = plan.layout.samples_per_ct
    for bad, message in [
        (query_artifact(params, params_fingerprint="f" * 16), "other CKKS parameters"),
        (query_artifact(params, format="x"), "not an encrypted query-set manifest"),
        (query_artifact(params, sizes=(per_ct + 1,)), f"between 1 and {per_ct}"),
        (query_artifact(params, sizes=(1,), files={"q.bin": {"sha256": "0" * 64, "bytes": 1}}),
         "must list exactly query_0000.bin .. query_0000.bin"),
    ]:
        with refused(BadRequest, message):
            cloud.uploads.accept_manifest(job_id, kind, bad.raw)
    queries = query_artifact(params, sizes=(per_ct, 3))
    cloud.uploads.accept_manifest(job_id, kind, queries.raw)
    with refused(Conflict, "query files not finalized"):
        cloud.start_scoring(job_id, query_id)
    upload(cloud, job_id, kind, queries)
    assert (cloud.query_dir(job_id, query_id) / "input" / "query_0001.bin").exists()
    status = cloud.start_scoring(job_id, query_id)
    assert (status["state"], status["n_rows"], status["n_ciphertexts"]) == ("queued",
                                                                             per_ct + 3, 2)
    assert workers.started[-1][0] == WorkerRef(job_id, query_id)
    assert cloud.start_scoring(job_id, query_id)["state"] == "queued"  # idempotent
    assert len(workers.started) == 1
    with refused(Conflict, "query set is queued: uploads are closed"):
        cloud.uploads.finalize(job_id, kind, "query_0000.bin")
    with refused(Conflict, "query set is queued; the scores are not ready"):
        cloud.scores_manifest(job_id, query_id)
    # The scorer's result, then the download checks.
    scores = cloud.query_dir(job_id, query_id) / "scores"
    scores.mkdir()
    (scores / "score_0000_0.bin").write_bytes(b"s")
    (scores / "manifest.json").write_text(json.dumps({
        "format": SCORES_FORMAT, "files": {"score_0000_0.bin": {"sha256": sha(b"s")}}}))
    with cloud.store.session() as session:
        session.get(QuerySet, query_id).state = protocol.Q_DONE
    assert cloud.score_file(job_id, query_id, "score_0000_0.bin")[1] == sha(b"s")
    assert [q["query_id"] for q in cloud.list_queries(job_id)["queries"]] == [query_id]
    cloud.delete_query(job_id, query_id)
    assert not cloud.query_dir(job_id, query_id).exists()
    assert cloud.list_queries(job_id) == {"queries": []}
    with refused(NotFound):
        cloud.query_kind_of(job_id, query_id)
    assert cloud.uploads.status(job_id, kind)["files"] == {}


def test_delete_job_removes_rows_files_and_unshared_blobs(cloud, params, plan):
    job_id = finished(cloud, params, plan)
    other = submitted(cloud, params, plan)  # same dataset bytes: shared blobs
    query_id = cloud.create_query(job_id)["query_id"]
    queries = query_artifact(params)
    upload(cloud, job_id, protocol.query_kind(query_id), queries)
    query_blob = cloud.blobs.path_for(sha(queries.files["query_0000.bin"]))
    shared_blob = cloud.blobs.path_for(sha(dataset_artifact(params, plan).files[
        "train_0000_x_dup.bin"]))
    assert query_blob.exists() and shared_blob.exists()
    cloud.delete_job(job_id)
    assert not cloud.job_dir(job_id).exists()
    assert not query_blob.exists()
    assert shared_blob.exists()  # still linked by the other job
    with refused(NotFound, "no such job"):
        cloud.authorise(job_id, "any")
    assert cloud.status(other)["state"] == protocol.CREATED


# ---- the app: one exception handler maps refusals to HTTP ----------------------------------------
def test_app_maps_refusals_to_status_and_detail(tmp_path):
    from fastapi.testclient import TestClient

    from medblindtuner.service.app import create_app

    app = create_app(ServiceConfig(data_dir=tmp_path / "cloud", allow_insecure=True,
                                   limits=ServiceLimits(chunk_bytes=CHUNK)))
    http = TestClient(app)  # no lifespan: no supervision thread needed here
    job = http.post("/jobs").json()
    auth = {"Authorization": f"Bearer {job['token']}"}
    response = http.get(f"/jobs/{job['job_id']}")
    assert response.status_code == 401
    assert response.json() == {"detail": "missing bearer token"}
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert http.get(f"/jobs/{job['job_id']}",
                    headers={"Authorization": "Bearer forged"}).status_code == 403
    assert http.get(f"/jobs/{'0' * 32}", headers=auth).json() == {"detail": "no such job"}
    response = http.get(f"/jobs/{job['job_id']}/artifacts/weights", headers=auth)
    assert response.status_code == 404
    assert response.json()["detail"].startswith("unknown artifact kind 'weights'")
    response = http.put(f"/jobs/{job['job_id']}/artifacts/bundle/files/a/chunks/0",
                        content=b"x", headers=auth)
    assert response.status_code == 400
    assert "X-Chunk-SHA256 header" in response.json()["detail"]
    response = http.put(f"/jobs/{job['job_id']}/artifacts/bundle/manifest",
                        content=b"x" * (17 << 20), headers=auth)
    assert response.status_code == 413
    response = http.post(f"/jobs/{job['job_id']}/decision", headers=auth,
                         json={"continue": True, "best_epoch": 1})
    assert response.status_code == 409
    assert response.json() == {"detail": "job is created, not awaiting a decision"}
    app.state.service.stop()
    service_log = logging.getLogger("medblindtuner.service")
    for handler in list(service_log.handlers):  # create_app added the data dir's log file
        if str(tmp_path) in getattr(handler, "baseFilename", ""):
            service_log.removeHandler(handler)
            handler.close()


# ---- blob store: nothing can poison a shared blob; finalize is retryable ------------------------
def test_chunk_resent_during_finalize_cannot_poison_the_blob(tmp_path, workers, params):
    """A chunk re-sent (with other, self-consistent bytes) while finalize checks the file
    must neither change what is stored nor be stored under the checked digest."""
    bundle = bundle_artifact(params)
    name = sorted(bundle.files)[0]
    genuine = bundle.files[name]
    evil = bytes(b ^ 0xFF for b in genuine[:CHUNK])
    answers: list = []
    racers: list[threading.Thread] = []

    class Racing(StandInValidator):
        def check_file(self, path: Path, kind: str, file_name: str,
                       ring_dim: int | None = None) -> None:
            if file_name == name and not racers:
                def resend() -> None:
                    answers.append(service.uploads.accept_chunk(job_id, "bundle", name, 0,
                                                                evil, sha(evil)))
                racers.append(threading.Thread(target=resend))
                racers[0].start()
                racers[0].join(0.5)  # give the re-send every chance to land now
            super().check_file(path, kind, file_name, ring_dim)

    config = ServiceConfig(data_dir=tmp_path / "cloud", allow_insecure=True,
                           db_url=_DATABASE["url"], limits=ServiceLimits(chunk_bytes=CHUNK))
    service = CloudService(config, spawn=workers, validator=Racing())
    job_id = service.create_job()["job_id"]
    upload(service, job_id, "bundle", bundle)
    racers[0].join(10)
    assert answers == [{"index": 0, "complete": True}]  # it waited, then saw the file done
    blob = service.blobs.path_for(sha(genuine))
    assert sha(blob.read_bytes()) == sha(genuine)
    assert (service.job_dir(job_id) / "bundle" / name).read_bytes() == genuine
    service.stop()


def test_poisoned_blob_is_replaced_by_the_genuine_upload(cloud, params):
    bundle = bundle_artifact(params)
    name = sorted(bundle.files)[0]
    genuine = bundle.files[name]
    planted = cloud.blobs.path_for(sha(genuine))  # wrong bytes under the genuine name
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"poison" * 100)
    job_id = cloud.create_job()["job_id"]
    upload(cloud, job_id, "bundle", bundle)
    assert sha(planted.read_bytes()) == sha(genuine)
    assert (cloud.job_dir(job_id) / "bundle" / name).read_bytes() == genuine
    # A second job reusing the blob gets the genuine bytes too (verified on reuse).
    other = cloud.create_job()["job_id"]
    upload(cloud, other, "bundle", bundle)
    assert (cloud.job_dir(other) / "bundle" / name).read_bytes() == genuine


def test_failure_between_blob_move_and_db_update_can_be_retried(cloud, params, monkeypatch):
    bundle = bundle_artifact(params)
    name = sorted(bundle.files)[0]
    data = bundle.files[name]
    job_id = cloud.create_job()["job_id"]
    cloud.uploads.accept_manifest(job_id, "bundle", bundle.raw)
    for index in range(3):
        part = data[index * CHUNK:(index + 1) * CHUNK]
        cloud.uploads.accept_chunk(job_id, "bundle", name, index, part, sha(part))
    record = cloud.uploads._record_finalized

    def crash(*_args) -> None:
        raise OSError("simulated crash after the blob was stored")

    monkeypatch.setattr(cloud.uploads, "_record_finalized", crash)
    with pytest.raises(OSError, match="simulated"):
        cloud.uploads.finalize(job_id, "bundle", name)
    assert cloud.blobs.path_for(sha(data)).exists()
    assert not cloud.uploads.staging_path(job_id, "bundle", name).exists()
    assert not cloud.uploads.status(job_id, "bundle")["files"][name]["complete"]
    monkeypatch.setattr(cloud.uploads, "_record_finalized", record)
    assert cloud.uploads.finalize(job_id, "bundle", name)["complete"]  # the retry
    assert cloud.uploads.finalize(job_id, "bundle", name)["complete"]  # and again: a no-op
    assert (cloud.job_dir(job_id) / "bundle" / name).read_bytes() == data
    assert cloud.status(job_id)["bytes_uploaded"] == len(data)


# ---- quotas -------------------------------------------------------------------------------------
def test_token_rate_job_creations_and_live_jobs_are_bounded(tmp_path, workers):
    from medblindtuner.service.errors import TooManyRequests

    service = make_service(tmp_path, workers, token_rate_per_s=0.5, token_burst=3,
                           create_rate_per_s=0.5, create_burst=2, max_live_jobs=3)
    first = service.create_job("10.0.0.1")
    service.create_job("10.0.0.1")
    with refused(TooManyRequests, "job creation from this address") as error:
        service.create_job("10.0.0.1")
    assert error.value.status_code == 429 and int(error.value.headers["Retry-After"]) >= 1
    service.create_job("10.0.0.2")  # another address has its own bucket ...
    with refused(TooManyRequests, "holds 3 jobs, its limit"):
        service.create_job("10.0.0.3")  # ... but the service as a whole is full
    for _ in range(3):
        service.authorise(first["job_id"], first["token"])
    with refused(TooManyRequests, "too many requests for this job token"):
        service.authorise(first["job_id"], first["token"])
    service.delete_job(first["job_id"])
    service.create_job("10.0.0.3")  # room again
    service.stop()


def test_global_disk_bound_counts_every_job(tmp_path, workers, params):
    bundle = bundle_artifact(params)
    size = sum(len(d) for d in bundle.files.values()) + len(bundle.raw)
    service = make_service(tmp_path, workers, max_total_bytes=size + size // 2)
    service.uploads.accept_manifest(service.create_job()["job_id"], "bundle", bundle.raw)
    with refused(TooLarge, "disk bound"):
        service.uploads.accept_manifest(service.create_job()["job_id"], "bundle", bundle.raw)
    service.stop()


def test_query_sets_are_bounded_and_foreign_ones_are_403(tmp_path, workers, params, plan):
    from medblindtuner.service.errors import TooManyRequests

    service = make_service(tmp_path, workers, max_query_sets_per_job=2)
    job_id = finished(service, params, plan)
    other = finished(service, params, plan)
    query_id = service.create_query(job_id)["query_id"]
    service.create_query(job_id)
    with refused(TooManyRequests, "2 query sets, its limit"):
        service.create_query(job_id)
    with refused(Forbidden, "does not grant access to this query set"):
        service.query_kind_of(other, query_id)
    service.stop()


def test_openapi_declares_the_refusals(tmp_path):
    from fastapi.testclient import TestClient

    from medblindtuner.service.app import create_app

    app = create_app(ServiceConfig(data_dir=tmp_path / "cloud", allow_insecure=True))
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    job_routes = [(p, m, op) for p, ops in paths.items() if p.startswith("/jobs/{job_id}")
                  for m, op in ops.items()]
    assert len(job_routes) >= 20
    for path, method, operation in job_routes:
        assert {"401", "403", "404", "409", "413", "422", "429"} <= set(
            operation["responses"]), (method, path)
    assert "429" in paths["/jobs"]["post"]["responses"]
    app.state.service.stop()
    _drop_log_handler(tmp_path)


def _drop_log_handler(tmp_path: Path) -> None:
    service_log = logging.getLogger("medblindtuner.service")
    for handler in list(service_log.handlers):  # create_app added the data dir's log file
        if str(tmp_path) in getattr(handler, "baseFilename", ""):
            service_log.removeHandler(handler)
            handler.close()


def test_client_retries_connection_errors_and_429_with_bounded_backoff():
    import httpx

    from medblindtuner.hospital.client import HospitalClient, ServiceError

    calls: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        if len(calls) == 3:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "slow"})
        return httpx.Response(200, json={"state": "created"})

    client = HospitalClient("http://cloud", token="t", job_id="j", progress=False,
                            backoff_s=0.01, transport=httpx.MockTransport(flaky))
    assert client.status() == {"state": "created"}
    assert len(calls) == 4
    down = HospitalClient("http://cloud", token="t", job_id="j", progress=False, retries=2,
                          backoff_s=0.01, transport=httpx.MockTransport(
                              lambda r: httpx.Response(429, json={"detail": "full"})))
    with pytest.raises(ServiceError) as error:
        down.status()
    assert error.value.status_code == 429  # bounded: gives up after 3 tries


def test_in_process_routes_answer_429_with_retry_after(tmp_path):
    from fastapi.testclient import TestClient

    from medblindtuner.service.app import create_app

    app = create_app(ServiceConfig(data_dir=tmp_path / "cloud", allow_insecure=True,
                                   limits=ServiceLimits(token_rate_per_s=0.1, token_burst=2)))
    http = TestClient(app)
    job = http.post("/jobs").json()
    auth = {"Authorization": f"Bearer {job['token']}"}
    answers = [http.get(f"/jobs/{job['job_id']}", headers=auth) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert "Retry-After" in answers[2].headers and "too many" in answers[2].json()["detail"]
    app.state.service.stop()
    _drop_log_handler(tmp_path)
