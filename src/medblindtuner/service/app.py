"""Cloud service: FastAPI app that receives a hospital's public bundle and encrypted dataset,
trains in a worker process and hands back encrypted weights.

Trust model: the cloud is untrusted, and so is every client. The service therefore
  * authenticates each job with its own bearer token (only the SHA-256 is stored),
  * verifies every chunk (SHA-256 header) and every finished file (manifest SHA-256),
  * refuses secret keys, insecure parameters (unless started with --insecure-test-params),
    datasets made for other parameters and oversized uploads *before* any training starts,
  * never sees plaintext: logs and DB hold ids, sizes, hashes and counters only.
OpenFHE work (secret-key detection, bundle verification) runs under one lock in this process;
training and the scoring of encrypted query sets (encrypted inference with the trained
weights) run in `medblindtuner.service.worker` processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select

from medblindtuner.he import keys as he_keys
from medblindtuner.he.keys import (
    BUNDLE_FORMAT,
    BundleError,
    looks_like_secret_key,
    sha256_file,
    verify_public_bundle,
)
from medblindtuner.he.params import CkksParams, ParameterError, require_secure
from medblindtuner.service.blobs import (
    BlobStore,
    atomic_write_bytes,
    is_safe_name,
    is_sha256,
    sha256_bytes,
    write_at,
)
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.store import (
    ACTIVE_STATES,
    ARTIFACT_KINDS,
    AWAITING_DECISION,
    CANCELLED,
    CREATED,
    FAILED,
    FINISHED,
    MANIFEST_NAME,
    Q_ACTIVE_STATES,
    Q_DONE,
    Q_FAILED,
    Q_QUEUED,
    Q_UPLOADING,
    QUERY_KIND_PREFIX,
    QUEUED,
    TERMINAL_STATES,
    DecisionRow,
    Job,
    QuerySet,
    Store,
    Upload,
    UploadChunk,
    hash_token,
    new_job_id,
    new_query_id,
    new_token,
    query_kind,
    token_matches,
    utcnow,
)
from medblindtuner.service.worker import (
    SCORE_LOCK_NAME,
    job_dir,
    query_dir,
    spawn_worker,
    worker_alive,
)
from medblindtuner.training.artifacts import (
    DATASET_FORMAT,
    QUERIES_FORMAT,
    SCORES_FORMAT,
    read_dataset_manifest,
)
from medblindtuner.training.plan import TrainingPlan

log = logging.getLogger("medblindtuner.service")
# The exact file set of a public bundle (the keys module's definition, so the two never drift).
BUNDLE_FILES = frozenset(he_keys._PUBLIC_FILES.values())
CHUNK_SHA_HEADER = "X-Chunk-SHA256"
_OCTET_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}},
    }
}


def _fail(code: int, message: str) -> HTTPException:
    return HTTPException(status_code=code, detail=message)


class DecisionIn(BaseModel):
    """The hospital's early-stopping answer for the epoch it was shown."""

    model_config = ConfigDict(populate_by_name=True)
    continue_training: bool = Field(alias="continue", description="Train another epoch?")
    best_epoch: int = Field(ge=1, description="Epoch whose weights are the result so far.")
    epoch: int | None = Field(default=None, ge=1, description="Epoch being answered (check).")


class JobCreated(BaseModel):
    job_id: str
    token: str = Field(description="Bearer token for this job; shown once, stored hashed.")
    chunk_bytes: int
    max_upload_bytes: int
    max_job_bytes: int


class CloudService:
    """State shared by the request handlers: store, blobs, worker supervision."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        for directory in (config.data_dir, config.jobs_dir, config.staging_dir):
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.store = Store(config.resolved_db_url)
        self.store.create_all()
        self.blobs = BlobStore(config.blobs_dir)
        self.fhe_lock = threading.Lock()  # OpenFHE calls from request threads, one at a time
        self.spawn_lock = threading.Lock()
        self.children: dict[str, tuple[subprocess.Popen, float]] = {}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # ---- paths ---------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return job_dir(self.config, job_id)

    def staging_path(self, job_id: str, kind: str, name: str) -> Path:
        return self.config.staging_dir / job_id / kind / f"{name}.part"

    def query_dir(self, job_id: str, query_id: str) -> Path:
        return query_dir(self.config, job_id, query_id)

    def artifact_dir(self, job_id: str, kind: str) -> Path:
        """Where OpenFHE will read an artifact: `<job>/<kind>/` or `<job>/queries/<q>/input/`."""
        if kind.startswith(QUERY_KIND_PREFIX):
            return self.query_dir(job_id, kind[len(QUERY_KIND_PREFIX):]) / "input"
        return self.job_dir(job_id) / kind

    def _check_uploads_open(self, session, job: Job, kind: str, closed: str) -> QuerySet | None:
        """Bundle/dataset change only before start; a query set only while it is uploading."""
        if not kind.startswith(QUERY_KIND_PREFIX):
            if job.state != CREATED:
                raise _fail(409, f"job is {job.state}: {closed}")
            return None
        query = session.get(QuerySet, kind[len(QUERY_KIND_PREFIX):])
        if query is None or query.job_id != job.id:
            raise _fail(404, "no such query set")
        if query.state != Q_UPLOADING:
            raise _fail(409, f"query set is {query.state}: {closed}")
        return query

    # ---- supervision -----------------------------------------------------------------------
    def start_worker(self, job_id: str) -> int:
        with self.spawn_lock:
            process = spawn_worker(self.config, job_id)
            self.children[job_id] = (process, time.monotonic())
        log.info("job %s: worker started (pid %d)", job_id, process.pid)
        return process.pid

    def start_scorer(self, job_id: str, query_id: str) -> int:
        """Scoring loads the bundle's keys: like training, never in the web process."""
        with self.spawn_lock:
            process = spawn_worker(self.config, job_id, query_id)
            self.children[f"{job_id}/{query_id}"] = (process, time.monotonic())
        log.info("job %s query set %s: scoring worker started (pid %d)", job_id, query_id,
                 process.pid)
        return process.pid

    def scorer_running(self, job_id: str, query_id: str) -> bool:
        child = self.children.get(f"{job_id}/{query_id}")
        if child is not None and child[0].poll() is None:
            return True
        return worker_alive(self.query_dir(job_id, query_id), SCORE_LOCK_NAME)

    def check_scorers(self) -> None:
        """Restart scoring workers that died (max restarts as for training), else fail the set."""
        with self.store.session() as session:
            active = session.execute(select(QuerySet.job_id, QuerySet.id).where(
                QuerySet.state.in_(Q_ACTIVE_STATES))).all()
        for job_id, query_id in active:
            if self.scorer_running(job_id, query_id):
                continue
            restart = False
            with self.store.session() as session:
                query = session.get(QuerySet, query_id)
                if query is None or query.state not in Q_ACTIVE_STATES:
                    continue
                if query.restarts >= self.config.max_worker_restarts:
                    query.state = Q_FAILED
                    query.error = f"scoring worker died {query.restarts + 1} times; giving up"
                    query.finished_at = utcnow()
                    log.error("job %s query set %s: scoring worker died again; failed",
                              job_id, query_id)
                else:
                    query.restarts += 1
                    restart = True
                    log.warning("job %s query set %s: scoring worker gone; restarting",
                                job_id, query_id)
                query.updated_at = utcnow()
            if restart:
                pid = self.start_scorer(job_id, query_id)
                with self.store.session() as session:
                    query = session.get(QuerySet, query_id)
                    if query is not None:
                        query.worker_pid = pid

    def worker_running(self, job_id: str) -> bool:
        """Own child still running, or any process (e.g. from a previous run) holds the lock."""
        child = self.children.get(job_id)
        if child is not None and child[0].poll() is None:
            return True
        return worker_alive(self.job_dir(job_id))

    def check_workers(self) -> None:
        """Restart workers of active jobs that died (crash, OOM kill, service restart)."""
        for key, (process, _started) in list(self.children.items()):
            if process.poll() is not None:  # reap, so no zombies accumulate
                self.children.pop(key, None)
        self.check_scorers()
        with self.store.session() as session:
            active = session.scalars(select(Job.id).where(Job.state.in_(ACTIVE_STATES))).all()
        for job_id in active:
            if self.worker_running(job_id):
                continue
            restart = False
            with self.store.session() as session:
                job = session.get(Job, job_id)
                if job is None or job.state not in ACTIVE_STATES:
                    continue  # the worker finished (or failed and said so) just now
                if job.restarts >= self.config.max_worker_restarts:
                    job.state = FAILED
                    job.error = f"worker died {job.restarts + 1} times; giving up"
                    job.finished_at = utcnow()
                    log.error("job %s: worker died again; job failed", job_id)
                else:
                    job.restarts += 1
                    restart = True
                    log.warning("job %s: worker gone in state %s; restarting from the last "
                                "checkpoint (restart %d)", job_id, job.state, job.restarts)
                job.updated_at = utcnow()
            if restart:
                pid = self.start_worker(job_id)
                with self.store.session() as session:
                    job = session.get(Job, job_id)
                    if job is not None:
                        job.worker_pid = pid

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.monitor_interval_s):
            try:
                self.check_workers()
            except Exception:  # noqa: BLE001 - supervision must survive a transient DB error
                log.exception("worker check failed")

    def start(self) -> None:
        self.check_workers()  # crash recovery on service start
        self._monitor = threading.Thread(target=self._monitor_loop, name="worker-monitor",
                                         daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        """Workers are left running on purpose: they survive an API restart."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        self.store.dispose()

    def stop_worker(self, job: Job, wait_s: float = 10.0) -> None:
        """SIGTERM (then SIGKILL) the job's worker, only if it provably still is that worker."""
        directory = self.job_dir(job.id)
        if not self.worker_running(job.id):
            return
        pid_file = directory / "worker.pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else job.worker_pid
        if not pid:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self.worker_running(job.id):
            time.sleep(0.1)
        if self.worker_running(job.id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child = self.children.pop(job.id, None)
        if child is not None:
            try:
                child[0].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    # ---- status -------------------------------------------------------------------------
    @staticmethod
    def status_of(job: Job) -> dict[str, Any]:
        total = job.max_epochs * job.steps_per_epoch
        eta = None
        if job.state in TERMINAL_STATES:
            eta = 0.0
        elif job.seconds_per_step and total:
            # Upper bound: early stopping may end the job sooner.
            eta = round(max(total - job.steps, 0) * job.seconds_per_step, 1)

        def iso(value):
            return value.isoformat() if value else None

        return {
            "job_id": job.id,
            "state": job.state,
            "epoch": job.epoch,
            "epochs_done": job.epochs_done,
            "max_epochs": job.max_epochs,
            "step": job.step_in_epoch,
            "steps_per_epoch": job.steps_per_epoch,
            "steps": job.steps,
            "total_steps": total,
            "seconds_per_step": job.seconds_per_step,
            "eta_seconds": eta,
            "bootstraps": job.bootstraps,
            "best_epoch": job.best_epoch,
            "awaiting_epoch": job.awaiting_epoch,
            "result_ready": job.result_ready,
            "restarts": job.restarts,
            "error": job.error,
            "params": {"name": job.params_name, "fingerprint": job.params_fingerprint,
                       "secure": job.params_secure},
            "bytes_uploaded": job.bytes_uploaded,
            "created_at": iso(job.created_at),
            "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at),
            "updated_at": iso(job.updated_at),
        }

    # ---- uploads ------------------------------------------------------------------------
    def artifact_status(self, job_id: str, kind: str) -> dict[str, Any]:
        with self.store.session() as session:
            uploads = session.scalars(
                select(Upload).where(Upload.job_id == job_id, Upload.kind == kind)
            ).all()
            files = {}
            manifest = None
            for upload in uploads:
                if upload.name == MANIFEST_NAME:
                    manifest = {"sha256": upload.sha256, "bytes": upload.size}
                    continue
                received = session.scalars(
                    select(UploadChunk.index).where(UploadChunk.upload_id == upload.id)
                ).all()
                files[upload.name] = {
                    "bytes": upload.size,
                    "sha256": upload.sha256,
                    "chunk_bytes": upload.chunk_size,
                    "n_chunks": upload.n_chunks,
                    "received": sorted(received),
                    "complete": upload.finalized,
                }
        return {
            "kind": kind,
            "manifest": manifest,
            "files": files,
            "complete": manifest is not None and all(f["complete"] for f in files.values()),
        }

    def accept_manifest(self, job_id: str, kind: str, raw: bytes) -> dict[str, Any]:
        limits = self.config.limits
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _fail(400, f"{kind} manifest is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise _fail(400, f"{kind} manifest must be a JSON object with a 'files' object")
        files: dict = manifest["files"]
        if len(files) > limits.max_files_per_artifact:
            raise _fail(413, f"{kind} manifest lists {len(files)} files; the limit is "
                             f"{limits.max_files_per_artifact}")
        declared = 0
        for name, info in files.items():
            if not is_safe_name(name) or name == MANIFEST_NAME:
                raise _fail(400, f"{kind} manifest: illegal file name {name!r}")
            if (not isinstance(info, dict) or not is_sha256(str(info.get("sha256", "")))
                    or not isinstance(info.get("bytes"), int) or info["bytes"] < 0):
                raise _fail(400, f"{kind} manifest: {name} needs 'sha256' (hex) and 'bytes'")
            if info["bytes"] > limits.max_upload_bytes:
                raise _fail(413, f"{name} is {info['bytes']} bytes; the per-file limit is "
                                 f"{limits.max_upload_bytes} (--max-upload-bytes)")
            declared += info["bytes"]
        digest = sha256_bytes(raw)
        with self.store.session() as session:
            job = session.get(Job, job_id)
            query = self._check_uploads_open(session, job, kind,
                                             "artifacts can only change before start")
            existing = session.scalars(select(Upload).where(
                Upload.job_id == job_id, Upload.kind == kind, Upload.name == MANIFEST_NAME)
            ).first()
            if existing is not None:
                if existing.sha256 == digest:
                    return {"accepted": True, "resumed": True}
                raise _fail(409, f"a different {kind} manifest was already uploaded; delete "
                                 "the job (or query set) and create a new one to change it")
            other = session.scalars(select(Upload).where(
                Upload.job_id == job_id, Upload.kind != kind, Upload.name != MANIFEST_NAME)
            ).all()
            if declared + sum(u.size for u in other) > limits.max_job_bytes:
                raise _fail(413, f"job would upload {declared + sum(u.size for u in other)} "
                                 f"bytes; the per-job limit is {limits.max_job_bytes}")
            if kind == "bundle":
                self._check_bundle_manifest(manifest, job)
            elif kind == "dataset":
                self._check_dataset_manifest(manifest, job)
            else:
                self._check_queries_manifest(manifest, job, query)
            atomic_write_bytes(self.artifact_dir(job_id, kind) / MANIFEST_NAME, raw)
            session.add(Upload(job_id=job_id, kind=kind, name=MANIFEST_NAME, size=len(raw),
                               sha256=digest, chunk_size=max(len(raw), 1), finalized=True,
                               finalized_at=utcnow()))
            for name, info in files.items():
                session.add(Upload(job_id=job_id, kind=kind, name=name, size=info["bytes"],
                                   sha256=info["sha256"], chunk_size=limits.chunk_bytes))
            job.updated_at = utcnow()
        log.info("job %s: %s manifest accepted (%d files, %d bytes declared, sha256 %s)",
                 job_id, kind, len(files), declared, digest[:16])
        return {"accepted": True, "resumed": False}

    def _check_bundle_manifest(self, manifest: dict, job: Job) -> None:
        if manifest.get("format") != BUNDLE_FORMAT:
            raise _fail(400, f"not a public bundle manifest (format {manifest.get('format')!r})")
        try:
            params = CkksParams.from_dict(manifest["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(400, f"bundle manifest has no valid 'params': {exc}") from exc
        if params.fingerprint() != manifest.get("params_fingerprint"):
            raise _fail(400, "bundle manifest parameters do not match their fingerprint")
        try:
            require_secure(params, self.config.allow_insecure)
        except ParameterError as exc:
            raise _fail(400, f"refusing bundle: {exc}") from exc
        if set(manifest["files"]) != BUNDLE_FILES:
            raise _fail(400, f"a public bundle must hold exactly {sorted(BUNDLE_FILES)}; the "
                             f"manifest lists {sorted(manifest['files'])}")
        job.params_fingerprint = params.fingerprint()
        job.params_name = params.name
        job.params_secure = params.is_secure

    def _check_dataset_manifest(self, manifest: dict, job: Job) -> None:
        if manifest.get("format") != DATASET_FORMAT:
            raise _fail(400, f"not an encrypted dataset manifest ({manifest.get('format')!r})")
        if job.params_fingerprint is None:
            raise _fail(409, "upload the public bundle manifest before the dataset manifest")
        if manifest.get("params_fingerprint") != job.params_fingerprint:
            raise _fail(400, "encrypted dataset was made with other CKKS parameters than the "
                             f"job's bundle ({manifest.get('params_fingerprint')} vs "
                             f"{job.params_fingerprint})")
        try:
            plan = TrainingPlan.from_dict(manifest["plan"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(400, f"dataset manifest has no valid training plan: {exc}") from exc
        bundle = json.loads((self.job_dir(job.id) / "bundle" / MANIFEST_NAME).read_text())
        if plan.slots != CkksParams.from_dict(bundle["params"]).slots:
            raise _fail(400, "training plan slot count differs from the bundle's parameters")
        job.max_epochs = plan.config.epochs
        job.steps_per_epoch = len(plan.train_batch_sizes)

    def _check_queries_manifest(self, manifest: dict, job: Job, query: QuerySet) -> None:
        """Queries must fit the job: same CKKS parameters, `samples_per_ct` rows per file."""
        if manifest.get("format") != QUERIES_FORMAT:
            raise _fail(400, f"not an encrypted query-set manifest ({manifest.get('format')!r})")
        if manifest.get("params_fingerprint") != job.params_fingerprint:
            raise _fail(400, "encrypted queries were made with other CKKS parameters than the "
                             f"job's bundle ({manifest.get('params_fingerprint')} vs "
                             f"{job.params_fingerprint})")
        sizes = manifest.get("sizes")
        plan_manifest = json.loads((self.job_dir(job.id) / "dataset" / MANIFEST_NAME).read_text())
        per_ct = TrainingPlan.from_dict(plan_manifest["plan"]).layout.samples_per_ct
        if (not isinstance(sizes, list) or not sizes
                or not all(isinstance(n, int) and 1 <= n <= per_ct for n in sizes)):
            raise _fail(400, f"query manifest 'sizes' must be a non-empty list of row counts "
                             f"between 1 and {per_ct} (rows per ciphertext)")
        expected = {f"query_{i:04d}.bin" for i in range(len(sizes))}
        if set(manifest["files"]) != expected:
            raise _fail(400, f"query manifest must list exactly query_0000.bin .. "
                             f"query_{len(sizes) - 1:04d}.bin")
        query.n_rows = sum(sizes)
        query.n_ciphertexts = len(sizes)
        query.updated_at = utcnow()

    def _upload_row(self, session, job_id: str, kind: str, name: str) -> Upload:
        upload = session.scalars(select(Upload).where(
            Upload.job_id == job_id, Upload.kind == kind, Upload.name == name)).first()
        if upload is None or name == MANIFEST_NAME:
            raise _fail(404, f"{name!r} is not a file of this job's {kind} manifest")
        return upload

    def accept_chunk(self, job_id: str, kind: str, name: str, index: int, data: bytes,
                     chunk_sha: str) -> dict[str, Any]:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            self._check_uploads_open(session, job, kind, "uploads are closed")
            upload = self._upload_row(session, job_id, kind, name)
            if upload.finalized:
                return {"index": index, "complete": True}
            if not 0 <= index < upload.n_chunks:
                raise _fail(400, f"chunk index {index} outside 0..{upload.n_chunks - 1}")
            offset = index * upload.chunk_size
            expected = min(upload.chunk_size, upload.size - offset)
            if len(data) != expected:
                raise _fail(400, f"chunk {index} of {name} has {len(data)} bytes, expected "
                                 f"{expected} (truncated?)")
            if sha256_bytes(data) != chunk_sha:
                raise _fail(400, f"chunk {index} of {name} does not match its SHA-256 header "
                                 "(corrupted in transit?); resend it")
            upload_id, chunk_size, n_chunks = upload.id, upload.chunk_size, upload.n_chunks
        write_at(self.staging_path(job_id, kind, name), index * chunk_size, data)
        with self.store.session() as session:
            if session.get(UploadChunk, (upload_id, index)) is None:
                session.add(UploadChunk(upload_id=upload_id, index=index, sha256=chunk_sha))
        return {"index": index, "n_chunks": n_chunks, "complete": False}

    def finalize(self, job_id: str, kind: str, name: str) -> dict[str, Any]:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            self._check_uploads_open(session, job, kind, "uploads are closed")
            upload = self._upload_row(session, job_id, kind, name)
            if upload.finalized:
                return {"name": name, "complete": True, "sha256": upload.sha256}
            received = set(session.scalars(
                select(UploadChunk.index).where(UploadChunk.upload_id == upload.id)).all())
            missing = sorted(set(range(upload.n_chunks)) - received)
            if missing:
                raise _fail(409, f"{name}: chunks {missing[:20]} not received yet")
            upload_id, size, digest = upload.id, upload.size, upload.sha256
        staged = self.staging_path(job_id, kind, name)
        if size == 0:
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.touch()

        def reject(code: int, message: str) -> HTTPException:
            """Drop the staged bytes so the client can upload the file again from scratch."""
            staged.unlink(missing_ok=True)
            with self.store.session() as session:
                session.execute(delete(UploadChunk).where(UploadChunk.upload_id == upload_id))
            log.warning("job %s: %s/%s refused: %s", job_id, kind, name, message)
            return _fail(code, message)

        if staged.stat().st_size != size or sha256_file(staged) != digest:
            raise reject(400, f"{name} does not match the SHA-256 in its manifest (tampered "
                              "or truncated); upload it again")
        with self.fhe_lock:
            secret = looks_like_secret_key(staged)
        if secret:
            raise reject(400, f"{name} is an OpenFHE secret key: refusing it. The secret key "
                              "must never leave the hospital")
        self.blobs.ingest(staged, digest)
        self.blobs.link_into(digest, self.artifact_dir(job_id, kind) / name)
        with self.store.session() as session:
            upload = session.get(Upload, upload_id)
            upload.finalized = True
            upload.finalized_at = utcnow()
            job = session.get(Job, job_id)
            job.bytes_uploaded += size
            job.updated_at = utcnow()
        log.info("job %s: %s/%s stored (%d bytes, sha256 %s)", job_id, kind, name, size,
                 digest[:16])
        return {"name": name, "complete": True, "sha256": digest}

    # ---- training --------------------------------------------------------------------------
    def start_job(self, job_id: str) -> dict[str, Any]:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != CREATED:
                raise _fail(409, f"job is already {job.state}")
        for kind in ARTIFACT_KINDS:
            artifact = self.artifact_status(job_id, kind)
            if artifact["manifest"] is None:
                raise _fail(409, f"the {kind} manifest has not been uploaded")
            pending = [n for n, f in artifact["files"].items() if not f["complete"]]
            if pending:
                raise _fail(409, f"{kind} files not finalized: {sorted(pending)[:20]}")
        directory = self.job_dir(job_id)
        try:
            with self.fhe_lock:
                manifest = verify_public_bundle(directory / "bundle",
                                                allow_insecure=self.config.allow_insecure)
            params = CkksParams.from_dict(manifest["params"])
            read_dataset_manifest(directory / "dataset", params)
        except (BundleError, ParameterError) as exc:
            raise _fail(400, f"refusing to train: {exc}") from exc
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != CREATED:
                raise _fail(409, f"job is already {job.state}")
            job.state = QUEUED
            job.started_at = utcnow()
            job.updated_at = utcnow()
        pid = self.start_worker(job_id)
        with self.store.session() as session:
            job = session.get(Job, job_id)
            job.worker_pid = pid
            return self.status_of(job)

    def decide(self, job_id: str, decision: DecisionIn) -> dict[str, Any]:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != AWAITING_DECISION or job.awaiting_epoch is None:
                raise _fail(409, f"job is {job.state}, not awaiting a decision")
            epoch = job.awaiting_epoch
            if decision.epoch is not None and decision.epoch != epoch:
                raise _fail(409, f"the job awaits the decision for epoch {epoch}, "
                                 f"not {decision.epoch}")
            allowed = {epoch, job.best_epoch} - {0}
            if decision.best_epoch not in allowed:
                raise _fail(422, f"best_epoch must be one of {sorted(allowed)} (only the "
                                 "current and the previous best epoch are kept)")
            if session.get(DecisionRow, (job_id, epoch)) is not None:
                raise _fail(409, f"epoch {epoch} was already answered")
            session.add(DecisionRow(job_id=job_id, epoch=epoch,
                                    continue_training=decision.continue_training,
                                    best_epoch=decision.best_epoch))
            job.updated_at = utcnow()
        log.info("job %s: decision for epoch %d recorded", job_id, epoch)
        return {"accepted": True, "epoch": epoch}

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state in (FINISHED, FAILED):
                raise _fail(409, f"job already {job.state}")
            job.state = CANCELLED
            job.awaiting_epoch = None
            job.finished_at = job.finished_at or utcnow()
            job.updated_at = utcnow()
        self.stop_worker(job)
        log.info("job %s cancelled", job_id)
        with self.store.session() as session:
            return self.status_of(session.get(Job, job_id))

    # ---- encrypted inference ---------------------------------------------------------------
    @staticmethod
    def query_status_of(query: QuerySet) -> dict[str, Any]:
        def iso(value):
            return value.isoformat() if value else None

        return {
            "query_id": query.id,
            "job_id": query.job_id,
            "state": query.state,
            "n_rows": query.n_rows,
            "n_ciphertexts": query.n_ciphertexts,
            "scores_ready": query.state == Q_DONE,
            "seconds": query.seconds,
            "restarts": query.restarts,
            "error": query.error,
            "created_at": iso(query.created_at),
            "started_at": iso(query.started_at),
            "finished_at": iso(query.finished_at),
        }

    def create_query(self, job_id: str) -> dict[str, Any]:
        """A new (empty) query set; only a finished job has weights to score with."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != FINISHED or not job.result_ready:
                raise _fail(409, f"job is {job.state}: encrypted inference needs a finished job")
            query = QuerySet(id=new_query_id(), job_id=job_id, state=Q_UPLOADING)
            session.add(query)
            session.flush()
            self.query_dir(job_id, query.id).mkdir(parents=True, exist_ok=True)
            status_ = self.query_status_of(query)
        log.info("job %s: query set %s created", job_id, status_["query_id"])
        return status_

    def query_status(self, job_id: str, query_id: str) -> dict[str, Any]:
        with self.store.session() as session:
            status_ = self.query_status_of(session.get(QuerySet, query_id))
        return {**status_, **self.artifact_status(job_id, query_kind(query_id))}

    def start_scoring(self, job_id: str, query_id: str) -> dict[str, Any]:
        """All query files finalized -> spawn the scoring worker (idempotent once started)."""
        kind = query_kind(query_id)
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            if query.state in (*Q_ACTIVE_STATES, Q_DONE):
                return self.query_status_of(query)
        artifact = self.artifact_status(job_id, kind)
        if artifact["manifest"] is None:
            raise _fail(409, "the query manifest has not been uploaded")
        pending = [n for n, f in artifact["files"].items() if not f["complete"]]
        if pending:
            raise _fail(409, f"query files not finalized: {sorted(pending)[:20]}")
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            if query.state not in (Q_UPLOADING, Q_FAILED):
                return self.query_status_of(query)
            query.state = Q_QUEUED
            query.error = None
            query.restarts = 0
            query.started_at = utcnow()
            query.finished_at = None
            query.updated_at = utcnow()
        pid = self.start_scorer(job_id, query_id)
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            query.worker_pid = pid
            return self.query_status_of(query)

    def scores_manifest(self, job_id: str, query_id: str) -> dict[str, Any]:
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            if query.state != Q_DONE:
                raise _fail(409, f"query set is {query.state}; the scores are not ready")
        manifest = json.loads(
            (self.query_dir(job_id, query_id) / "scores" / MANIFEST_NAME).read_text())
        if manifest.get("format") != SCORES_FORMAT:
            raise _fail(500, "scores manifest has an unexpected format")
        return manifest

    def delete_query(self, job_id: str, query_id: str) -> None:
        """Stop its scorer, drop its DB rows, files, staging and unreferenced blobs."""
        kind = query_kind(query_id)
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            query.state = Q_FAILED
            query.error = "deleted"
        pid_file = self.query_dir(job_id, query_id) / "worker.pid"
        if self.scorer_running(job_id, query_id) and pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        with self.store.session() as session:
            digests = set(session.scalars(select(Upload.sha256).where(
                Upload.job_id == job_id, Upload.kind == kind,
                Upload.name != MANIFEST_NAME)).all())
            upload_ids = select(Upload.id).where(Upload.job_id == job_id, Upload.kind == kind)
            session.execute(delete(UploadChunk).where(UploadChunk.upload_id.in_(upload_ids)))
            session.execute(delete(Upload).where(Upload.job_id == job_id, Upload.kind == kind))
            session.execute(delete(QuerySet).where(QuerySet.id == query_id))
        shutil.rmtree(self.query_dir(job_id, query_id), ignore_errors=True)
        shutil.rmtree(self.config.staging_dir / job_id / kind, ignore_errors=True)
        self.blobs.collect(digests)
        log.info("job %s: query set %s deleted", job_id, query_id)

    def delete_job(self, job_id: str) -> None:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state in ACTIVE_STATES:
                job.state = CANCELLED
        self.stop_worker(job)
        with self.store.session() as session:
            digests = set(session.scalars(select(Upload.sha256).where(
                Upload.job_id == job_id, Upload.name != MANIFEST_NAME)).all())
            upload_ids = select(Upload.id).where(Upload.job_id == job_id)
            session.execute(delete(UploadChunk).where(UploadChunk.upload_id.in_(upload_ids)))
            session.execute(delete(Upload).where(Upload.job_id == job_id))
            session.execute(delete(DecisionRow).where(DecisionRow.job_id == job_id))
            queries = session.scalars(select(QuerySet.id).where(
                QuerySet.job_id == job_id)).all()
            session.execute(delete(QuerySet).where(QuerySet.job_id == job_id))
            session.execute(delete(Job).where(Job.id == job_id))
        for query_id in queries:  # scorers of this job: their sets are gone, stop them
            pid_file = self.query_dir(job_id, query_id) / "worker.pid"
            if self.scorer_running(job_id, query_id) and pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        shutil.rmtree(self.config.staging_dir / job_id, ignore_errors=True)
        removed = self.blobs.collect(digests)
        log.info("job %s deleted (%d unreferenced blobs removed)", job_id, removed)


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """Stream the request body, refusing (413) as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _fail(413, f"{what} is {declared} bytes; the limit is {limit}")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _fail(413, f"{what} exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def _configure_logging(config: ServiceConfig) -> None:
    """Service log file in the data dir (ids, sizes and hashes only; never plaintext)."""
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    path = Path(config.data_dir) / "service.log"
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in log.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


_bearer = HTTPBearer(auto_error=False)


def authorised(
    job_id: str,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """401 without a bearer token, 404 for unknown jobs, 403 for another job's token."""
    if credentials is None or not credentials.credentials:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    service: CloudService = request.app.state.service
    with service.store.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise _fail(404, "no such job")
        if not token_matches(credentials.credentials, job.token_hash):
            raise _fail(403, "this token does not grant access to this job")
    return job_id


def check_kind(kind: str) -> str:
    if kind not in ARTIFACT_KINDS:
        raise _fail(404, f"unknown artifact kind {kind!r}; use one of {ARTIFACT_KINDS}")
    return kind


JobId = Annotated[str, Depends(authorised)]
Kind = Annotated[str, Depends(check_kind)]


def query_of_job(job_id: JobId, query_id: str, request: Request) -> str:
    """The Upload kind of an existing query set of this (authorised) job, else 404."""
    service: CloudService = request.app.state.service
    with service.store.session() as session:
        query = session.get(QuerySet, query_id) if is_safe_name(query_id) else None
        if query is None or query.job_id != job_id:
            raise _fail(404, "no such query set")
    return query_kind(query_id)


QueryKind = Annotated[str, Depends(query_of_job)]


def _query_id(kind: str) -> str:
    return kind[len(QUERY_KIND_PREFIX):]


def _listed_file(manifest: dict[str, Any], directory: Path, name: str, what: str) -> FileResponse:
    """A file that `manifest` lists (result weights, scores), with its SHA-256 as a header;
    names not listed are refused, so no other file of the job can be read this way."""
    if name not in manifest["files"]:
        raise _fail(404, f"{name!r} is not part of the {what}")
    return FileResponse(directory / name, media_type="application/octet-stream",
                        headers={"X-Content-SHA256": manifest["files"][name]["sha256"]})


def create_app(config: ServiceConfig) -> FastAPI:
    """Build the FastAPI application for one data directory."""
    _configure_logging(config)
    service = CloudService(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        log.info("service started (data dir %s, insecure test params %s)", config.data_dir,
                 "ALLOWED" if config.allow_insecure else "refused")
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="MedBlindTuner cloud service",
        description="Trains a classifier head on CKKS-encrypted features. It never holds a "
                    "secret key; every job endpoint needs that job's bearer token.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        return {"ok": True, "insecure_test_params": config.allow_insecure}

    @app.post("/jobs", status_code=201, response_model=JobCreated, tags=["jobs"])
    def create_job() -> JobCreated:
        """New job; the token is returned once (only its SHA-256 is stored)."""
        job_id, token = new_job_id(), new_token()
        service.job_dir(job_id).mkdir(parents=True)
        with service.store.session() as session:
            session.add(Job(id=job_id, token_hash=hash_token(token), state=CREATED))
        log.info("job %s created", job_id)
        limits = config.limits
        return JobCreated(job_id=job_id, token=token, chunk_bytes=limits.chunk_bytes,
                          max_upload_bytes=limits.max_upload_bytes,
                          max_job_bytes=limits.max_job_bytes)

    @app.get("/jobs/{job_id}", tags=["jobs"])
    def job_status(job_id: JobId) -> dict[str, Any]:
        with service.store.session() as session:
            return service.status_of(session.get(Job, job_id))

    @app.put("/jobs/{job_id}/artifacts/{kind}/manifest", tags=["uploads"],
             openapi_extra=_OCTET_BODY)
    async def put_manifest(job_id: JobId, kind: Kind, request: Request) -> dict[str, Any]:
        """Announce an artifact's files (their sizes and SHA-256); checked before any upload."""
        raw = await _read_body(request, config.limits.max_manifest_bytes, "manifest")
        return await run_in_threadpool(service.accept_manifest, job_id, kind, raw)

    @app.get("/jobs/{job_id}/artifacts/{kind}", tags=["uploads"])
    def get_artifact(job_id: JobId, kind: Kind) -> dict[str, Any]:
        """Which chunks the server holds: the client resumes from here."""
        return service.artifact_status(job_id, kind)

    async def accept_chunk_request(job_id: str, kind: str, name: str, index: int,
                                   request: Request, chunk_sha256: str | None) -> dict[str, Any]:
        """Shared by artifact and query uploads: header check, bounded read, store."""
        if not chunk_sha256 or not is_sha256(chunk_sha256.lower()):
            raise _fail(400, f"the {CHUNK_SHA_HEADER} header (hex SHA-256 of the chunk) is "
                             "required")
        data = await _read_body(request, config.limits.chunk_bytes, "chunk")
        return await run_in_threadpool(service.accept_chunk, job_id, kind, name, index, data,
                                       chunk_sha256.lower())

    @app.put("/jobs/{job_id}/artifacts/{kind}/files/{name}/chunks/{index}", tags=["uploads"],
             openapi_extra=_OCTET_BODY)
    async def put_chunk(
        job_id: JobId,
        kind: Kind,
        name: str,
        index: int,
        request: Request,
        chunk_sha256: Annotated[str | None, Header(alias=CHUNK_SHA_HEADER)] = None,
    ) -> dict[str, Any]:
        """One chunk (offset index * chunk_bytes) with its SHA-256 in the X-Chunk-SHA256 header."""
        return await accept_chunk_request(job_id, kind, name, index, request, chunk_sha256)

    @app.post("/jobs/{job_id}/artifacts/{kind}/files/{name}/finalize", tags=["uploads"])
    def finalize(job_id: JobId, kind: Kind, name: str) -> dict[str, Any]:
        """Whole-file SHA-256 check against the manifest, secret-key check, then store."""
        return service.finalize(job_id, kind, name)

    @app.post("/jobs/{job_id}/start", tags=["training"])
    def start(job_id: JobId) -> dict[str, Any]:
        """Verify the bundle and dataset, then start training in a worker process."""
        return service.start_job(job_id)

    @app.get("/jobs/{job_id}/validation-loss", tags=["training"],
             response_class=FileResponse)
    def validation_loss(job_id: JobId) -> FileResponse:
        """The encrypted validation loss of the epoch awaiting the hospital's decision."""
        with service.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != AWAITING_DECISION or job.awaiting_epoch is None:
                raise _fail(409, f"job is {job.state}, not awaiting a decision")
            epoch, digest = job.awaiting_epoch, job.loss_sha256
        path = service.job_dir(job_id) / "decisions" / f"loss_epoch_{epoch:04d}.bin"
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"X-Epoch": str(epoch), "X-Content-SHA256": digest or ""})

    @app.post("/jobs/{job_id}/decision", tags=["training"])
    def post_decision(job_id: JobId, decision: DecisionIn) -> dict[str, Any]:
        """{"continue": bool, "best_epoch": int[, "epoch": int]} for the awaited epoch."""
        return service.decide(job_id, decision)

    @app.get("/jobs/{job_id}/result", tags=["results"])
    def result(job_id: JobId) -> dict[str, Any]:
        """Manifest of the encrypted weights of the best epoch (files listed with SHA-256)."""
        with service.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != FINISHED or not job.result_ready:
                raise _fail(409, f"job is {job.state}; the result is not ready")
        return json.loads((service.job_dir(job_id) / "result" / MANIFEST_NAME).read_text())

    @app.get("/jobs/{job_id}/result/files/{name}", tags=["results"],
             response_class=FileResponse)
    def result_file(job_id: JobId, name: str) -> FileResponse:
        return _listed_file(result(job_id), service.job_dir(job_id) / "result", name, "result")

    # ---- encrypted inference: query sets -----------------------------------------------------
    @app.post("/jobs/{job_id}/queries", status_code=201, tags=["inference"])
    def create_query(job_id: JobId) -> dict[str, Any]:
        """New encrypted query set for a finished job -> {query_id, state, ...}."""
        return service.create_query(job_id)

    @app.get("/jobs/{job_id}/queries", tags=["inference"])
    def list_queries(job_id: JobId) -> dict[str, Any]:
        with service.store.session() as session:
            rows = session.scalars(select(QuerySet).where(QuerySet.job_id == job_id)
                                   .order_by(QuerySet.created_at)).all()
            return {"queries": [service.query_status_of(q) for q in rows]}

    @app.get("/jobs/{job_id}/queries/{query_id}", tags=["inference"])
    def query_status(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Scoring state plus the upload resume point (same fields as GET artifacts/{kind})."""
        return service.query_status(job_id, _query_id(kind))

    @app.put("/jobs/{job_id}/queries/{query_id}/manifest", tags=["inference"],
             openapi_extra=_OCTET_BODY)
    async def put_query_manifest(job_id: JobId, kind: QueryKind,
                                 request: Request) -> dict[str, Any]:
        """The query set's manifest.json: format, params fingerprint, rows per ciphertext."""
        raw = await _read_body(request, config.limits.max_manifest_bytes, "manifest")
        return await run_in_threadpool(service.accept_manifest, job_id, kind, raw)

    @app.put("/jobs/{job_id}/queries/{query_id}/files/{name}/chunks/{index}",
             tags=["inference"], openapi_extra=_OCTET_BODY)
    async def put_query_chunk(
        job_id: JobId,
        kind: QueryKind,
        name: str,
        index: int,
        request: Request,
        chunk_sha256: Annotated[str | None, Header(alias=CHUNK_SHA_HEADER)] = None,
    ) -> dict[str, Any]:
        return await accept_chunk_request(job_id, kind, name, index, request, chunk_sha256)

    @app.post("/jobs/{job_id}/queries/{query_id}/files/{name}/finalize", tags=["inference"])
    def finalize_query_file(job_id: JobId, kind: QueryKind, name: str) -> dict[str, Any]:
        return service.finalize(job_id, kind, name)

    @app.post("/jobs/{job_id}/queries/{query_id}/score", tags=["inference"])
    def score(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Start scoring in a worker process (the web process never loads keys)."""
        return service.start_scoring(job_id, _query_id(kind))

    @app.get("/jobs/{job_id}/queries/{query_id}/scores", tags=["inference"])
    def scores(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Manifest of the encrypted scores (files with SHA-256); 409 until scoring is done."""
        return service.scores_manifest(job_id, _query_id(kind))

    @app.get("/jobs/{job_id}/queries/{query_id}/scores/files/{name}", tags=["inference"],
             response_class=FileResponse)
    def score_file(job_id: JobId, kind: QueryKind, name: str) -> FileResponse:
        query_id = _query_id(kind)
        return _listed_file(service.scores_manifest(job_id, query_id),
                            service.query_dir(job_id, query_id) / "scores", name, "scores")

    @app.delete("/jobs/{job_id}/queries/{query_id}", tags=["inference"])
    def delete_query(job_id: JobId, kind: QueryKind) -> dict[str, Any]:
        """Remove a query set, its ciphertexts and its scores."""
        service.delete_query(job_id, _query_id(kind))
        return {"deleted": True, "query_id": _query_id(kind)}

    @app.post("/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel(job_id: JobId) -> dict[str, Any]:
        return service.cancel(job_id)

    @app.delete("/jobs/{job_id}", tags=["jobs"])
    def delete_job(job_id: JobId) -> dict[str, Any]:
        """Stop the worker and remove the job, its files and unreferenced blobs."""
        service.delete_job(job_id)
        return {"deleted": True, "job_id": job_id}

    return app


def run_server(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Blocking: serve the app with uvicorn (one process; training happens in workers)."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="info")
