"""Refresh mode "hospital" over the service: the relay between a job's worker and its hospital.

The worker's `CloudRefresher` (`he.refresh`) asks the key holder for each refresh; here that
question goes through the job folder and the database:

    worker   publish(k, request)   refreshes/request_k.bin, then its row (k, SHA-256)
    hospital GET  /jobs/{id}/refresh       the newest unanswered request (long poll)
    hospital POST /jobs/{id}/refresh       answer: framing, index and request digest
                                           checked, refreshes/answer_k.bin, then the row
    worker   answer(k)             the stored answer (SHA-256 checked)

Requests and answers are ciphertext parts (`c1`; `a`, `h0`, `h1`): no plaintext, and the web
process only reads their framing (JSON header and part lengths), never OpenFHE. The worker
parses an answer in the limited child (`he.untrusted`) before it uses it.

Idempotent for crash safety: a request published again with the same bytes (a restarted
worker replaying its journal) gets the stored answer, if any; the same answer posted again is
accepted again; another answer for an answered refresh is a 409. Files are written before
their rows, both atomically, so a row never names a missing file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from medblindtuner.failpoints import failpoint
from medblindtuner.formats import atomic_write_bytes
from medblindtuner.he.params import CkksParams
from medblindtuner.he.refresh import RefreshAnswer, RefreshError, RefreshRequest, message_bound
from medblindtuner.protocol import (
    ACTIVE_STATES,
    BUNDLE,
    MANIFEST_NAME,
    QUEUED,
    REFRESHES_DIR,
    RUNNING,
    refresh_path,
)
from medblindtuner.service.errors import Conflict, NotFound, Unprocessable
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.store import Job, RefreshRow, Store, utcnow

log = logging.getLogger("medblindtuner.service")

# Relayed files kept behind the newest refresh (the worker's journal holds every answer it
# received; only the latest can be asked again after a crash).
KEPT_FILES = 8


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RefreshRelay:
    """The relayed refreshes of the jobs under one data directory."""

    def __init__(self, config: ServiceConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def _path(self, job_id: str, index: int, kind: str) -> Path:
        return refresh_path(self.config.job_dir(job_id), index, kind)

    # ---- worker side ----------------------------------------------------------------------
    def publish(self, job_id: str, index: int, request: bytes) -> None:
        """Offer request `index` to the hospital (again: a no-op when the bytes are the
        same; other bytes replace it and its answer, which the hospital's ledger judges)."""
        digest = sha256(request)
        with self.store.session() as session:
            row = session.get(RefreshRow, (job_id, index))
            if row is not None and row.request_sha256 == digest:
                return
        atomic_write_bytes(self._path(job_id, index, "request"), request)
        self._path(job_id, index, "answer").unlink(missing_ok=True)
        with self.store.session() as session:
            row = session.get(RefreshRow, (job_id, index))
            if row is None:
                session.add(RefreshRow(job_id=job_id, index=index, request_sha256=digest))
            else:
                row.request_sha256, row.answer_sha256, row.answered_at = digest, None, None
        self._prune(job_id, index)
        log.info("job %s: refresh %d requested (%d bytes, sha256 %s)", job_id, index,
                 len(request), digest[:16])

    def answer(self, job_id: str, index: int) -> bytes | None:
        """The hospital's answer to request `index`, once given (its SHA-256 checked)."""
        with self.store.session() as session:
            row = session.get(RefreshRow, (job_id, index))
            expected = None if row is None else row.answer_sha256
        if expected is None:
            return None
        data = self._path(job_id, index, "answer").read_bytes()
        if sha256(data) != expected:
            raise RefreshError(f"the stored answer to refresh {index} does not match its "
                               "SHA-256")
        return data

    def _prune(self, job_id: str, index: int) -> None:
        for path in (self.config.job_dir(job_id) / REFRESHES_DIR).glob("*_*.bin"):
            number = path.stem.rpartition("_")[2]
            if number.isdigit() and int(number) < index - KEPT_FILES:
                path.unlink(missing_ok=True)

    # ---- web side -------------------------------------------------------------------------
    def pending(self, job_id: str) -> tuple[tuple[int, bytes, str] | None, bool]:
        """(index, bytes, SHA-256) of the request awaiting an answer, or None; and whether
        the job is training now (queued or running: a request can come at any moment)."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound("the job was deleted")
            training = job.state in (QUEUED, RUNNING)
            row = None
            if job.state in ACTIVE_STATES:
                row = session.scalars(select(RefreshRow).where(
                    RefreshRow.job_id == job_id, RefreshRow.answer_sha256.is_(None))
                    .order_by(RefreshRow.index.desc()).limit(1)).first()
            if row is None:
                return None, training
            index, digest = row.index, row.request_sha256
        try:
            data = self._path(job_id, index, "request").read_bytes()
        except FileNotFoundError:  # replaced meanwhile: the next look finds the new one
            return None, training
        return ((index, data, digest) if sha256(data) == digest else None), training

    def summary(self, job_id: str) -> dict[str, Any]:
        """For the job's status: refreshes answered, and the index awaiting an answer."""
        with self.store.session() as session:
            answered = session.scalar(select(func.count()).select_from(RefreshRow).where(
                RefreshRow.job_id == job_id, RefreshRow.answer_sha256.is_not(None))) or 0
        with self.store.session() as session:
            awaiting = session.scalar(select(func.max(RefreshRow.index)).where(
                RefreshRow.job_id == job_id, RefreshRow.answer_sha256.is_(None)))
        return {"refreshes": answered, "awaiting_refresh": awaiting}

    def answer_bound(self, job_id: str) -> int:
        """Largest answer this job's parameters allow (read from its bundle manifest)."""
        manifest = self.config.job_dir(job_id) / BUNDLE / MANIFEST_NAME
        try:
            params = CkksParams.from_dict(json.loads(manifest.read_text())["params"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise Conflict("the job has no public bundle: it asks no refresh") from exc
        if not params.refreshed_by_hospital:
            raise Conflict("this job's parameters bootstrap on the cloud: it asks no refresh")
        return message_bound(params)

    def accept(self, job_id: str, data: bytes) -> dict[str, Any]:
        """Record the hospital's answer to a pending request: 422 when it is not a refresh
        answer or answers another request, 409 when no such request awaits one."""
        try:
            answer = RefreshAnswer.from_bytes(data)
        except RefreshError as exc:
            raise Unprocessable(f"not a refresh answer: {exc}") from exc
        if not (answer.a and answer.h0 and answer.h1):
            raise Unprocessable("a refresh answer holds three non-empty ciphertext parts")
        digest = sha256(data)
        with self.store.session() as session:
            job = session.get(Job, job_id)
            row = session.get(RefreshRow, (job_id, answer.index))
            if job is None or job.state not in ACTIVE_STATES:
                raise Conflict(f"job is {job.state if job else 'gone'}; it awaits no refresh")
            if row is None:
                raise Conflict(f"refresh {answer.index} was not requested")
            if row.answer_sha256 is not None:
                if row.answer_sha256 == digest:
                    return {"accepted": True, "index": answer.index, "again": True}
                raise Conflict(f"refresh {answer.index} was already answered")
            request_sha = row.request_sha256
        try:
            request = self._path(job_id, answer.index, "request").read_bytes()
        except FileNotFoundError as exc:  # pruned: long past
            raise Conflict(f"refresh {answer.index} is no longer pending") from exc
        if sha256(request) != request_sha:
            raise Conflict(f"refresh {answer.index} was requested again meanwhile; retry")
        if RefreshRequest.from_bytes(request).digest != answer.request_digest:
            raise Unprocessable(f"the answer names another request than refresh "
                                f"{answer.index}'s")
        atomic_write_bytes(self._path(job_id, answer.index, "answer"), data)
        failpoint("refresh.answer_stored")
        with self.store.session() as session:
            row = session.get(RefreshRow, (job_id, answer.index))
            if row is None or row.request_sha256 != request_sha:
                raise Conflict(f"refresh {answer.index} was requested again meanwhile; retry")
            row.answer_sha256, row.answered_at = digest, utcnow()
        log.info("job %s: refresh %d answered (%d bytes, sha256 %s)", job_id, answer.index,
                 len(data), digest[:16])
        return {"accepted": True, "index": answer.index, "again": False}
