"""The cloud's domain logic: jobs and query sets from creation to deletion, without HTTP.

Trust model: the cloud is untrusted, and so is every client. The service therefore
  * authenticates each job with its own bearer token (only the SHA-256 is stored),
  * verifies every chunk (SHA-256 header) and every finished file (manifest SHA-256),
  * refuses secret keys, insecure parameters (unless started with --insecure-test-params),
    datasets made for other parameters and oversized uploads *before* any training starts,
  * never sees plaintext: logs and DB hold ids, sizes, hashes and counters only.
OpenFHE parsing of uploaded bytes (secret-key detection, bundle and ciphertext checks) runs in
short-lived validator subprocesses (`validate`), training and the scoring of encrypted query
sets in worker processes (`supervisor`): hostile bytes can crash those, never this process.

Every refusal is a `CloudError` carrying the HTTP status the API answers with, so this module
runs (and is tested) in-process; `app.py` only maps routes onto it.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from medblindtuner.failpoints import failpoint
from medblindtuner.protocol import (
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
    QUEUED,
    RESULT_DIR,
    SCORES_DIR,
    decision_path,
    query_kind,
)
from medblindtuner.service.blobs import BlobStore, is_safe_name
from medblindtuner.service.consortia import ConsortiumRelay
from medblindtuner.service.errors import (
    Conflict,
    Forbidden,
    Internal,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    out_of_space_is_507,
)
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.quotas import RateLimiter
from medblindtuner.service.refreshes import RefreshRelay
from medblindtuner.service.store import (
    DecisionRow,
    Job,
    QuerySet,
    RefreshRow,
    Store,
    aware,
    hash_token,
    new_job_id,
    new_query_id,
    new_token,
    token_matches,
    utcnow,
)
from medblindtuner.service.supervisor import Spawner, Supervisor, WorkerRef, spawn_worker
from medblindtuner.service.uploads import Uploads
from medblindtuner.service.validate import Validator
from medblindtuner.service.views import (
    job_status,
    listed_file,
    query_status,
)
from medblindtuner.training.artifacts import SCORES_FORMAT

log = logging.getLogger("medblindtuner.service")


class CloudService:
    """Jobs, uploads, decisions and query sets of one data directory.

    Methods taking a `job_id` expect one that `authorise` accepted (the app's dependency does
    that for every job endpoint), and a `query_id` that `query_kind_of` accepted.
    """

    def __init__(self, config: ServiceConfig, spawn: Spawner = spawn_worker,
                 validator: Validator | None = None) -> None:
        self.config = config
        for directory in (config.data_dir, config.jobs_dir, config.staging_dir):
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.store = Store(config.resolved_db_url)
        self.store.create_all()
        self.blobs = BlobStore(config.blobs_dir)
        # Uploaded OpenFHE bytes are parsed only in validator subprocesses, never here.
        self.validator = validator or Validator(config.limits, config.allow_insecure,
                                                config.python)
        self.uploads = Uploads(config, self.store, self.blobs, self.validator)
        self.supervisor = Supervisor(config, self.store, spawn)
        self.refreshes = RefreshRelay(config, self.store)
        limits = config.limits
        self.token_rate = RateLimiter(limits.token_rate_per_s, limits.token_burst,
                                      "this job token")
        self.creation_rate = RateLimiter(limits.create_rate_per_s, limits.create_burst,
                                         "job creation from this address")
        self.auth_failures = RateLimiter(limits.failed_auth_rate_per_s,
                                         limits.failed_auth_burst,
                                         "failed authentications from this address")
        self.consortia = ConsortiumRelay(config, self.store, self.auth_failures,
                                         self.token_rate, self.creation_rate)
        self._validating: set[str] = set()  # jobs (or query sets) being validated now
        self._claims = threading.Lock()

    def start(self) -> None:
        """Crash recovery (restart dead workers), then supervise in the background."""
        self.supervisor.start()

    def stop(self) -> None:
        """Workers are left running on purpose: they survive an API restart."""
        self.supervisor.shutdown()
        self.store.dispose()

    def job_dir(self, job_id: str) -> Path:
        return self.config.job_dir(job_id)

    def query_dir(self, job_id: str, query_id: str) -> Path:
        return self.config.query_dir(job_id, query_id)

    # ---- access ----------------------------------------------------------------------------
    def create_job(self, client: str = "local") -> dict[str, Any]:
        """New job; the token is returned once (only its SHA-256 is stored).

        Quotas: job creations per client address, jobs held per client address, live jobs
        on the service (429 each); idle jobs are expired first."""
        limits = self.config.limits
        self.creation_rate.charge(client)
        self.expire_idle_jobs()
        job_id, token = new_job_id(), new_token()
        with self.store.session() as session:
            live = session.scalar(select(func.count()).select_from(Job)) or 0
            if live >= limits.max_live_jobs:
                raise TooManyRequests(f"the service holds {live} jobs, its limit; delete "
                                      "finished jobs or try again later", retry_after_s=60)
            held = session.scalar(select(func.count()).select_from(Job).where(
                Job.client == client[:64])) or 0
            if held >= limits.max_jobs_per_client:
                raise TooManyRequests(f"this address holds {held} jobs, the per-client limit; "
                                      "delete some first", retry_after_s=60)
        try:
            with out_of_space_is_507("creating the job"), self.store.session() as session:
                session.add(Job(id=job_id, token_hash=hash_token(token), state=CREATED,
                                client=client[:64]))
                failpoint("disk.job")
                self.job_dir(job_id).mkdir(parents=True)
        except Exception:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        log.info("job %s created", job_id)
        return {"job_id": job_id, "token": token, "chunk_bytes": limits.chunk_bytes,
                "max_upload_bytes": limits.max_upload_bytes,
                "max_job_bytes": limits.max_job_bytes}

    def expire_idle_jobs(self, limit: int = 100) -> int:
        """Delete jobs never started (or failed/cancelled) that saw no request for
        `idle_job_ttl_s`: one client cannot hold the live-job cap with abandoned jobs."""
        cutoff = utcnow() - timedelta(seconds=self.config.limits.idle_job_ttl_s)
        with self.store.session() as session:
            rows = session.execute(select(Job.id, Job.updated_at).where(
                Job.state.in_((CREATED, FAILED, CANCELLED)))).all()
        idle = [job_id for job_id, seen in rows if aware(seen) < cutoff][:limit]
        for job_id in idle:
            self.delete_job(job_id)
            log.info("job %s expired (idle)", job_id)
        return len(idle)

    def authorise(self, job_id: str, token: str | None, client: str = "local") -> str:
        """401 without a bearer token, 404 for unknown jobs, 403 for another job's token.
        Each wrong token or unknown job is charged to the caller's address; once its bucket
        is empty, every authentication from it is a 429 (guessing costs time)."""
        if self.auth_failures.exhausted(client):
            raise TooManyRequests("too many failed authentications from this address; retry "
                                  "later", retry_after_s=self.auth_failures.retry_after_s())
        try:
            self._check_token(job_id, token)
        except (Forbidden, NotFound):  # a guess (no token at all guesses nothing: 401)
            if not self.auth_failures.exhausted(client):
                self.auth_failures.charge(client)
            raise
        self.token_rate.charge(job_id)  # 429 beyond the token's request rate
        return job_id

    def _check_token(self, job_id: str, token: str | None) -> None:
        if not token:
            raise Unauthorized("missing bearer token")
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound("no such job")
            if not token_matches(token, job.token_hash):
                raise Forbidden("this token does not grant access to this job")

    @contextmanager
    def validating(self, key: str) -> Iterator[None]:
        """One validation per job (or query set) at a time: a concurrent start is a 409
        before any validator work is queued."""
        with self._claims:
            if key in self._validating:
                raise Conflict("this job is being validated by another request")
            self._validating.add(key)
        try:
            yield
        finally:
            with self._claims:
                self._validating.discard(key)

    @staticmethod
    def check_kind(kind: str) -> str:
        if kind not in ARTIFACT_KINDS:
            raise NotFound(f"unknown artifact kind {kind!r}; use one of {ARTIFACT_KINDS}")
        return kind

    def query_kind_of(self, job_id: str, query_id: str) -> str:
        """The upload kind of an existing query set of this (authorised) job, else 404."""
        with self.store.session() as session:
            query = session.get(QuerySet, query_id) if is_safe_name(query_id) else None
            if query is None:
                raise NotFound("no such query set")
            if query.job_id != job_id:  # as for jobs: another job's token is a 403
                raise Forbidden("this token does not grant access to this query set")
        return query_kind(query_id)

    # ---- training --------------------------------------------------------------------------
    def status(self, job_id: str) -> dict[str, Any]:
        with self.store.session() as session:
            status = job_status(session.get(Job, job_id))
        return {**status, **self.refreshes.summary(job_id)}

    def start_job(self, job_id: str) -> dict[str, Any]:
        """Verify the bundle and the dataset against it, then start the training worker."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != CREATED:
                raise Conflict(f"job is already {job.state}")
        for kind in ARTIFACT_KINDS:
            self.uploads.require_complete(job_id, kind, kind)
        with self.validating(job_id):
            self._check_state(job_id, CREATED)
            self.validator.check_job(self.job_dir(job_id))  # 400 "refusing to train: ..."
            self._check_state(job_id, CREATED)  # deleted or started while it was checked
        with self.supervisor.starting():
            with self.store.session() as session:
                job = session.get(Job, job_id)
                if job.state != CREATED:
                    raise Conflict(f"job is already {job.state}")
                job.state = QUEUED
                job.started_at = utcnow()
                job.updated_at = utcnow()
            self.supervisor.launch(WorkerRef(job_id))
        return self.status(job_id)

    def _check_state(self, job_id: str, state: str) -> None:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound("the job was deleted")
            if job.state != state:
                raise Conflict(f"job is already {job.state}")

    def validation_loss(self, job_id: str) -> tuple[Path, int, str]:
        """The encrypted loss awaiting a decision: (file, epoch, SHA-256 or "")."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != AWAITING_DECISION or job.awaiting_epoch is None:
                raise Conflict(f"job is {job.state}, not awaiting a decision")
            epoch, digest = job.awaiting_epoch, job.loss_sha256
        return decision_path(self.job_dir(job_id), epoch), epoch, digest or ""

    def decide(self, job_id: str, continue_training: bool, best_epoch: int,
               epoch: int | None = None) -> dict[str, Any]:
        """Record the hospital's answer for the awaited epoch (the worker polls for it)."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != AWAITING_DECISION or job.awaiting_epoch is None:
                raise Conflict(f"job is {job.state}, not awaiting a decision")
            awaited = job.awaiting_epoch
            if epoch is not None and epoch != awaited:
                raise Conflict(f"the job awaits the decision for epoch {awaited}, not {epoch}")
            allowed = {awaited, job.best_epoch} - {0}
            if best_epoch not in allowed:
                raise Unprocessable(f"best_epoch must be one of {sorted(allowed)} (only the "
                                    "current and the previous best epoch are kept)")
            if session.get(DecisionRow, (job_id, awaited)) is not None:
                raise Conflict(f"epoch {awaited} was already answered")
            session.add(DecisionRow(job_id=job_id, epoch=awaited,
                                    continue_training=continue_training,
                                    best_epoch=best_epoch))
            job.updated_at = utcnow()
        log.info("job %s: decision for epoch %d recorded", job_id, awaited)
        return {"accepted": True, "epoch": awaited}

    def refresh_request(self, job_id: str) -> tuple[tuple[int, bytes, str] | None, bool]:
        """The refresh request awaiting the hospital's answer (index, bytes, SHA-256) or
        None, and whether the job is training now (refresh mode "hospital",
        `service.refreshes`)."""
        return self.refreshes.pending(job_id)

    def refresh_answer_bound(self, job_id: str) -> int:
        """Largest refresh answer this job's parameters allow (409 for a bootstrap job)."""
        return self.refreshes.answer_bound(job_id)

    def answer_refresh(self, job_id: str, data: bytes) -> dict[str, Any]:
        """Record the hospital's answer to the pending refresh (422/409 when it is not one)."""
        return self.refreshes.accept(job_id, data)

    def result_manifest(self, job_id: str) -> dict[str, Any]:
        """Manifest of the encrypted best-epoch weights, once the job finished."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != FINISHED or not job.result_ready:
                raise Conflict(f"job is {job.state}; the result is not ready")
        return json.loads((self.job_dir(job_id) / RESULT_DIR / MANIFEST_NAME).read_text())

    def result_file(self, job_id: str, name: str) -> tuple[Path, str]:
        return listed_file(self.result_manifest(job_id), self.job_dir(job_id) / RESULT_DIR,
                           name, "result")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop the worker (SIGTERM, then SIGKILL); the job ends `cancelled`."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state in (FINISHED, FAILED):
                raise Conflict(f"job already {job.state}")
            job.state = CANCELLED
            job.awaiting_epoch = None
            job.finished_at = job.finished_at or utcnow()
            job.updated_at = utcnow()
        self.supervisor.stop(WorkerRef(job_id), job.worker_pid)
        log.info("job %s cancelled", job_id)
        return self.status(job_id)

    def delete_job(self, job_id: str) -> None:
        """Cancel, then drop DB rows, job files, staging and unreferenced blobs."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state in ACTIVE_STATES:
                job.state = CANCELLED
        self.supervisor.stop(WorkerRef(job_id), job.worker_pid)
        with self.store.session() as session:
            digests = self.uploads.drop_rows(session, job_id)
            session.execute(delete(DecisionRow).where(DecisionRow.job_id == job_id))
            session.execute(delete(RefreshRow).where(RefreshRow.job_id == job_id))
            queries = session.scalars(select(QuerySet.id).where(
                QuerySet.job_id == job_id)).all()
            session.execute(delete(QuerySet).where(QuerySet.job_id == job_id))
            session.execute(delete(Job).where(Job.id == job_id))
        for query_id in queries:  # scorers of this job: their sets are gone, stop them
            self.supervisor.stop(WorkerRef(job_id, query_id), grace_s=0)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        shutil.rmtree(self.config.staging_dir / job_id, ignore_errors=True)
        removed = self.blobs.collect(digests)
        log.info("job %s deleted (%d unreferenced blobs removed)", job_id, removed)

    # ---- encrypted inference ---------------------------------------------------------------
    def create_query(self, job_id: str) -> dict[str, Any]:
        """A new (empty) query set; only a finished job has weights to score with."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job.state != FINISHED or not job.result_ready:
                raise Conflict(f"job is {job.state}: encrypted inference needs a finished job")
            count = session.scalar(select(func.count()).select_from(QuerySet).where(
                QuerySet.job_id == job_id)) or 0
            if count >= self.config.limits.max_query_sets_per_job:
                raise TooManyRequests(f"the job has {count} query sets, its limit; delete "
                                      "some first", retry_after_s=60)
            query = QuerySet(id=new_query_id(), job_id=job_id, state=Q_UPLOADING)
            session.add(query)
            session.flush()
            self.query_dir(job_id, query.id).mkdir(parents=True, exist_ok=True)
            status = query_status(query)
        log.info("job %s: query set %s created", job_id, status["query_id"])
        return status

    def list_queries(self, job_id: str) -> dict[str, Any]:
        with self.store.session() as session:
            rows = session.scalars(select(QuerySet).where(QuerySet.job_id == job_id)
                                   .order_by(QuerySet.created_at)).all()
            return {"queries": [query_status(q) for q in rows]}

    def query_status(self, job_id: str, query_id: str) -> dict[str, Any]:
        """Scoring state plus the upload resume point."""
        with self.store.session() as session:
            status = query_status(session.get(QuerySet, query_id))
        return {**status, **self.uploads.status(job_id, query_kind(query_id))}

    def start_scoring(self, job_id: str, query_id: str) -> dict[str, Any]:
        """All query files finalized -> spawn the scoring worker (idempotent once started)."""
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            if query.state in (*Q_ACTIVE_STATES, Q_DONE):
                return query_status(query)
        self.uploads.require_complete(job_id, query_kind(query_id), "query")
        with self.validating(f"{job_id}/{query_id}"):
            self.validator.check_job(self.job_dir(job_id), query_id)  # 400 "refusing to score"
        with self.supervisor.starting():
            with self.store.session() as session:
                query = session.get(QuerySet, query_id)
                if query.state not in (Q_UPLOADING, Q_FAILED):
                    return query_status(query)
                query.state = Q_QUEUED
                query.error = None
                query.restarts = 0
                query.started_at = utcnow()
                query.finished_at = None
                query.updated_at = utcnow()
            self.supervisor.launch(WorkerRef(job_id, query_id))
        with self.store.session() as session:
            return query_status(session.get(QuerySet, query_id))

    def scores_manifest(self, job_id: str, query_id: str) -> dict[str, Any]:
        """Manifest of the encrypted scores; 409 until scoring is done."""
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            if query.state != Q_DONE:
                raise Conflict(f"query set is {query.state}; the scores are not ready")
        manifest = json.loads(
            (self.query_dir(job_id, query_id) / SCORES_DIR / MANIFEST_NAME).read_text())
        if manifest.get("format") != SCORES_FORMAT:
            raise Internal("scores manifest has an unexpected format")
        return manifest

    def score_file(self, job_id: str, query_id: str, name: str) -> tuple[Path, str]:
        return listed_file(self.scores_manifest(job_id, query_id),
                           self.query_dir(job_id, query_id) / SCORES_DIR, name, "scores")

    def delete_query(self, job_id: str, query_id: str) -> None:
        """Stop its scorer, drop its DB rows, files, staging and unreferenced blobs."""
        kind = query_kind(query_id)
        with self.store.session() as session:
            query = session.get(QuerySet, query_id)
            query.state = Q_FAILED
            query.error = "deleted"
        self.supervisor.stop(WorkerRef(job_id, query_id), grace_s=0)
        with self.store.session() as session:
            digests = self.uploads.drop_rows(session, job_id, kind)
            session.execute(delete(QuerySet).where(QuerySet.id == query_id))
        shutil.rmtree(self.query_dir(job_id, query_id), ignore_errors=True)
        shutil.rmtree(self.config.staging_dir / job_id / kind, ignore_errors=True)
        self.blobs.collect(digests)
        log.info("job %s: query set %s deleted", job_id, query_id)
