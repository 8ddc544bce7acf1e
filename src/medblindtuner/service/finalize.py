"""The upload protocol's last step: a file's whole-file checks, then the blob store and the job.

Finalize takes a file whose chunks all arrived: its size and whole-file SHA-256 against the
manifest, the validator's checks (`service.validate`: not a secret key, parses as its role, of
the declared ring dimension), then it is renamed into the blob store, linked into the job and
recorded. `finalize_many` does the same for several files of one upload with ONE validator
child for those that parse alone as ciphertexts (a child's start, ~0.2 s, costs more than a
ciphertext's parse: a dataset of 124 files spent ~35 s in children at finalize); if the batch
does not pass, every file is checked alone, so a refusal names its file and its reason exactly
as a single finalize would.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from medblindtuner.failpoints import failpoint
from medblindtuner.formats import sha256_file
from medblindtuner.protocol import BUNDLE, MANIFEST_NAME, MAX_FINALIZE_BATCH
from medblindtuner.service.blobs import is_safe_name
from medblindtuner.service.errors import (
    BadRequest,
    CloudError,
    Conflict,
    NotFound,
    Unprocessable,
    printable,
)
from medblindtuner.service.locks import file_lock
from medblindtuner.service.store import Job, Upload, UploadChunk, utcnow
from medblindtuner.service.validate import file_role

log = logging.getLogger("medblindtuner.service")


@dataclass(frozen=True)
class _Staged:
    """A file ready to finalize: its upload row, declared size and digest, where it is staged
    and where it goes."""

    name: str
    upload_id: int
    size: int
    digest: str
    staged: Path
    destination: Path


class Finalizing:
    """Step 3 of `service.uploads.Uploads` (which provides the store, blobs, validator, paths
    and job checks used here)."""

    def finalize(self, job_id: str, kind: str, name: str) -> dict[str, Any]:
        """Whole-file SHA-256 and validator checks, then into the blob store and the job.

        Crash-safe and retryable: the staged file is checked under its upload lock (no chunk
        can change it meanwhile), then renamed into the blob store, linked and recorded. If
        the service fails after the rename, the next finalize finds the blob (verified again)
        and completes the link and the record; nothing is left that cannot be finished.
        """
        with self.job_may_vanish(job_id, f"{name} was finalized"):
            ready = self._ready(job_id, kind, name)
            if isinstance(ready, dict):
                return ready
            with file_lock(self.lock_path(ready.staged)):
                return self._store_checked(job_id, kind, ready, batch_passed=False)

    def finalize_many(self, job_id: str, kind: str, names: list[str]) -> dict[str, Any]:
        """`finalize` for several files of one upload (`MAX_FINALIZE_BATCH` at most, no name
        twice), their ciphertexts checked by one validator child; in name order, stopping at
        the first refused file (400, as `finalize` would; the files before it are stored).
        Returns {"files": {name: finalize's answer}}."""
        if not names or len(names) > MAX_FINALIZE_BATCH or len(set(names)) != len(names):
            raise Unprocessable(f"name between 1 and {MAX_FINALIZE_BATCH} distinct files to "
                                f"finalize (got {len(names)}, {len(set(names))} distinct)")
        with self.job_may_vanish(job_id, "its files were finalized"):
            done: dict[str, Any] = {}
            pending: list[_Staged] = []
            for name in sorted(names):
                ready = self._ready(job_id, kind, name)
                if isinstance(ready, dict):
                    done[name] = ready
                else:
                    pending.append(ready)
            with ExitStack() as locks:  # name order: two batches of one upload cannot deadlock
                for ready in pending:
                    locks.enter_context(file_lock(self.lock_path(ready.staged)))
                batch = [r.staged for r in pending
                         if file_role(kind, r.name) == "ciphertext" and r.staged.exists()]
                passed = len(batch) > 1 and self.validator.batch_passes(
                    batch, "ciphertext", self._declared_params(job_id))
                for ready in pending:
                    done[ready.name] = self._store_checked(job_id, kind, ready,
                                                           batch_passed=passed)
        return {"files": done}

    def _ready(self, job_id: str, kind: str, name: str) -> _Staged | dict[str, Any]:
        """The file to finalize, or finalize's answer if it is already done (404 for a name
        no manifest can list, before it reaches the database: e.g. a NUL byte)."""
        if not is_safe_name(name):
            raise NotFound(f"{printable(name, 80)!r} is not a file of this job's {kind} "
                           "manifest")
        upload_id, size, digest = self._finalizable(job_id, kind, name)
        if upload_id is None:
            return {"name": name, "complete": True, "sha256": digest}
        return _Staged(name, upload_id, size, digest, self.staging_path(job_id, kind, name),
                       self.artifact_dir(job_id, kind) / name)

    def _store_checked(self, job_id: str, kind: str, ready: _Staged,
                       batch_passed: bool) -> dict[str, Any]:
        """Under the file's upload lock: size and SHA-256, the validator's checks (done
        already when the file's batch passed), then blob store, link and record."""
        name, staged = ready.name, ready.staged
        if ready.size == 0:
            raise self._reject(job_id, kind, ready, f"{name} is empty: zero-byte files are "
                                                   "refused")
        if staged.exists():
            if staged.stat().st_size != ready.size or sha256_file(staged) != ready.digest:
                raise self._reject(job_id, kind, ready,
                                   f"{name} does not match the SHA-256 in its manifest "
                                   "(tampered or truncated); upload it again")
            if not (batch_passed and file_role(kind, name) == "ciphertext"):
                try:
                    self.validator.check_file(staged, kind, name, self._declared_params(job_id))
                except BadRequest as exc:
                    raise self._reject(job_id, kind, ready, exc.message) from exc
            failpoint("disk.finalize")
            self.blobs.commit(staged, ready.digest, ready.destination)  # hashed, under the lock
            failpoint("upload.blob_committed")
        elif not self.blobs.relink(ready.digest, ready.destination):
            raise self._reject(job_id, kind, ready,
                               f"the staged bytes of {name} are gone; upload it again")
        if not self._record_finalized(job_id, ready.upload_id, ready.size):
            self._remove_leftovers(job_id)
            self.blobs.collect({ready.digest})
            raise NotFound(f"the job was deleted while {name} was finalized")
        log.info("job %s: %s/%s stored (%d bytes, sha256 %s)", job_id, kind, name, ready.size,
                 ready.digest[:16])
        return {"name": name, "complete": True, "sha256": ready.digest}

    def _declared_params(self, job_id: str) -> dict | None:
        """The CKKS parameters the job's bundle manifest declares (None before it arrived)."""
        path = self.artifact_dir(job_id, BUNDLE) / MANIFEST_NAME
        try:
            return dict(json.loads(path.read_text())["params"])
        except (OSError, KeyError, TypeError, ValueError):
            return None

    def _finalizable(self, job_id: str, kind: str, name: str) -> tuple[int | None, int, str]:
        """(upload id, size, digest) of a file ready to finalize; id None if already done."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            self._check_open(session, job, kind, "uploads are closed")
            upload = self._upload_row(session, job_id, kind, name)
            if upload.finalized:
                return None, upload.size, upload.sha256
            received = set(session.scalars(
                select(UploadChunk.index).where(UploadChunk.upload_id == upload.id)).all())
            missing = sorted(set(range(upload.n_chunks)) - received)
            if missing and upload.size > 0:
                raise Conflict(f"{name}: chunks {missing[:20]} not received yet")
            return upload.id, upload.size, upload.sha256

    def _record_finalized(self, job_id: str, upload_id: int, size: int) -> bool:
        """The DB half of finalize: idempotent (a retry after a crash counts the bytes once).
        False if the upload (its job) was deleted meanwhile."""
        with self.store.session() as session:
            upload = session.get(Upload, upload_id)
            if upload is None or upload.finalized:
                return upload is not None
            upload.finalized = True
            upload.finalized_at = utcnow()
            job = session.get(Job, job_id)
            job.bytes_uploaded += size
            job.updated_at = utcnow()
        return True

    def _reject(self, job_id: str, kind: str, ready: _Staged, message: str) -> CloudError:
        """Drop the staged bytes and chunk records so the client can upload the file again."""
        ready.staged.unlink(missing_ok=True)
        if not self._job_exists(job_id):
            self._remove_leftovers(job_id)
            return NotFound(f"the job was deleted while {ready.name} was finalized")
        with self.store.session() as session:
            session.execute(delete(UploadChunk).where(UploadChunk.upload_id == ready.upload_id))
        log.warning("job %s: %s/%s refused: %s", job_id, kind, ready.name, message[:300])
        return BadRequest(message)
