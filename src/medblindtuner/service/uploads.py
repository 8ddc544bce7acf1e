"""The upload protocol: manifests first, then checksummed chunks, then a verified finalize.

Used for the public bundle, the encrypted dataset and encrypted query sets alike (a query set's
files are recorded under the upload kind `q-<query id>`). Every check here runs before a byte
reaches a place OpenFHE reads from: a manifest is refused unless it fits the job (format,
parameters, file set, size limits), a chunk unless its length and SHA-256 are right, a file
unless its SHA-256 matches the manifest and it is not a secret key. Refusals are `CloudError`s.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from medblindtuner.failpoints import failpoint
from medblindtuner.formats import atomic_write_bytes
from medblindtuner.he import keys as he_keys
from medblindtuner.he.keys import BUNDLE_FORMAT
from medblindtuner.he.params import CkksParams, ParameterError, require_secure
from medblindtuner.protocol import (
    BUNDLE,
    CHUNK_SHA_HEADER,
    CREATED,
    DATASET,
    MANIFEST_NAME,
    Q_UPLOADING,
    QUERY_INPUT_DIR,
    is_query_kind,
    query_file_name,
    query_id_of,
)
from medblindtuner.service.blobs import (
    BlobStore,
    is_safe_name,
    is_sha256,
    sha256_bytes,
    write_at,
)
from medblindtuner.service.errors import (
    BadRequest,
    CloudError,
    Conflict,
    NotFound,
    TooLarge,
    Unprocessable,
    out_of_space_is_507,
)
from medblindtuner.service.finalize import Finalizing
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.locks import file_lock
from medblindtuner.service.manifests import dataset_files, parse_json, validate_manifest
from medblindtuner.service.store import (
    Job,
    QuerySet,
    Store,
    Upload,
    UploadChunk,
    bytes_held,
    utcnow,
)
from medblindtuner.service.validate import Validator
from medblindtuner.training.artifacts import DATASET_FORMAT, QUERIES_FORMAT
from medblindtuner.training.plan import TrainingPlan, max_batch_size

log = logging.getLogger("medblindtuner.service")
# The exact file set of a public bundle: the keys module's definition, so the two never drift.
# The only use of a private name of `he.keys` in the service; to become its public name.
BUNDLE_FILES = frozenset(he_keys._PUBLIC_FILES.values())


def chunk_digest(header: str | None) -> str:
    """The chunk's SHA-256 from its header, checked before its body is read."""
    if not header or not is_sha256(header.lower()):
        raise BadRequest(f"the {CHUNK_SHA_HEADER} header (hex SHA-256 of the chunk) is required")
    return header.lower()


class Uploads(Finalizing):
    """Chunked, resumable, verified uploads into the job folders and the blob store."""

    def __init__(self, config: ServiceConfig, store: Store, blobs: BlobStore,
                 validator: Validator) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self.validator = validator  # OpenFHE parsing of uploaded bytes: in a subprocess

    # ---- paths -----------------------------------------------------------------------------
    def staging_path(self, job_id: str, kind: str, name: str) -> Path:
        return self.config.staging_dir / job_id / kind / f"{name}.part"

    @staticmethod
    def lock_path(staged: Path) -> Path:
        """The lock that serialises chunk writes to `staged` and its finalize."""
        return staged.with_name(f".{staged.name}.lock")

    def artifact_dir(self, job_id: str, kind: str) -> Path:
        """Where OpenFHE will read an artifact: `<job>/<kind>/` or `<job>/queries/<q>/input/`."""
        if is_query_kind(kind):
            return self.config.query_dir(job_id, query_id_of(kind)) / QUERY_INPUT_DIR
        return self.config.job_dir(job_id) / kind

    # ---- a job deleted, a disk full, while a request works ------------------------------------
    def _job_exists(self, job_id: str) -> bool:
        with self.store.session() as session:
            return session.get(Job, job_id) is not None

    @contextmanager
    def job_may_vanish(self, job_id: str, what: str) -> Iterator[None]:
        """A `DELETE` of the job may run meanwhile: what then fails is a 404 (leftovers are
        removed); a full disk is a 507; anything else is a bug and passes unchanged."""
        try:
            with out_of_space_is_507(what):
                yield
        except CloudError:
            raise
        except Exception as exc:
            if self._job_exists(job_id):
                raise
            self._remove_leftovers(job_id)
            raise NotFound(f"the job was deleted while {what}") from exc

    def _remove_leftovers(self, job_id: str) -> None:
        """Files a request re-created for a job deleted meanwhile (staging, links)."""
        shutil.rmtree(self.config.staging_dir / job_id, ignore_errors=True)
        shutil.rmtree(self.config.job_dir(job_id), ignore_errors=True)

    # ---- state -----------------------------------------------------------------------------
    def _check_open(self, session: Session, job: Job, kind: str, closed: str) -> QuerySet | None:
        """Bundle/dataset change only before start; a query set only while it is uploading."""
        if not is_query_kind(kind):
            if job.state != CREATED:
                raise Conflict(f"job is {job.state}: {closed}")
            return None
        query = session.get(QuerySet, query_id_of(kind))
        if query is None or query.job_id != job.id:
            raise NotFound("no such query set")
        if query.state != Q_UPLOADING:
            raise Conflict(f"query set is {query.state}: {closed}")
        return query

    def status(self, job_id: str, kind: str) -> dict[str, Any]:
        """Per file: size, digest, chunk size and the chunks received (the resume point)."""
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

    def require_complete(self, job_id: str, kind: str, label: str) -> None:
        """Before training or scoring: the manifest is in and every file it lists finalized."""
        artifact = self.status(job_id, kind)
        if artifact["manifest"] is None:
            raise Conflict(f"the {label} manifest has not been uploaded")
        pending = [n for n, f in artifact["files"].items() if not f["complete"]]
        if pending:
            raise Conflict(f"{label} files not finalized: {sorted(pending)[:20]}")

    @staticmethod
    def drop_rows(session: Session, job_id: str, kind: str | None = None) -> set[str]:
        """Delete the upload records of a job (or of one kind); returns the blob digests."""
        where = [Upload.job_id == job_id] + ([Upload.kind == kind] if kind is not None else [])
        digests = set(session.scalars(select(Upload.sha256).where(
            *where, Upload.name != MANIFEST_NAME)).all())
        upload_ids = select(Upload.id).where(*where)
        session.execute(delete(UploadChunk).where(UploadChunk.upload_id.in_(upload_ids)))
        session.execute(delete(Upload).where(*where))
        return digests

    # ---- 1. manifest -----------------------------------------------------------------------
    def accept_manifest(self, job_id: str, kind: str, raw: bytes) -> dict[str, Any]:
        """Check the manifest against the limits and the job, then announce its files."""
        with self.job_may_vanish(job_id, "its manifest was stored"):
            return self._accept_manifest(job_id, kind, raw)

    def _accept_manifest(self, job_id: str, kind: str, raw: bytes) -> dict[str, Any]:
        limits = self.config.limits
        what = f"{'query' if is_query_kind(kind) else kind} manifest"
        manifest = parse_json(raw, limits, what)  # size, depth, digits: before parsing
        schema = "queries" if is_query_kind(kind) else kind
        model = validate_manifest(manifest, schema, limits, what)
        files = {name: entry.model_dump(exclude_none=True) for name, entry in model.files.items()}
        declared = len(raw)  # the manifest counts towards the job's quota too
        for name, info in files.items():
            if not is_safe_name(name) or name == MANIFEST_NAME:
                raise BadRequest(f"{kind} manifest: illegal file name {name!r}")
            if info["bytes"] > limits.max_upload_bytes:
                raise TooLarge(f"{name} is {info['bytes']} bytes; the per-file limit is "
                               f"{limits.max_upload_bytes} (--max-upload-bytes)")
            declared += info["bytes"]
        digest = sha256_bytes(raw)
        with self.store.session() as session:
            job = session.get(Job, job_id)
            query = self._check_open(session, job, kind, "artifacts can only change before start")
            existing = session.scalars(select(Upload).where(
                Upload.job_id == job_id, Upload.kind == kind, Upload.name == MANIFEST_NAME)
            ).first()
            if existing is not None:
                if existing.sha256 == digest:
                    return {"accepted": True, "resumed": True}
                raise Conflict(f"a different {kind} manifest was already uploaded; delete the "
                               "job (or query set) and create a new one to change it")
            other = session.scalars(select(Upload).where(
                Upload.job_id == job_id, Upload.kind != kind)).all()
            if declared + sum(u.size for u in other) > limits.max_job_bytes:
                raise TooLarge(f"job would upload {declared + sum(u.size for u in other)} "
                               f"bytes (manifests included); the per-job limit is "
                               f"{limits.max_job_bytes}")
            everyone = self._reserved_bytes(session)
            if declared + everyone > limits.max_total_bytes:
                raise TooLarge(f"the service holds {everyone} bytes (uploads, consortia); "
                               f"{declared} more would pass its disk bound of "
                               f"{limits.max_total_bytes} bytes: try again later")
            if kind == BUNDLE:
                self._check_bundle_manifest(manifest, job)
            elif kind == DATASET:
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

    def _reserved_bytes(self, session: Session) -> int:
        """Bytes counted against the disk bound: every stored file, the declared files of
        jobs that sent something within `upload_reservation_ttl_s` (a declaration with no
        bytes arriving stops reserving space), and every consortium's messages."""
        cutoff = utcnow() - timedelta(seconds=self.config.limits.upload_reservation_ttl_s)
        return bytes_held(session, cutoff)

    def _check_bundle_manifest(self, manifest: dict, job: Job) -> None:
        """Secure (or allowed) parameters matching their fingerprint, exactly the public files."""
        if manifest.get("format") != BUNDLE_FORMAT:
            raise BadRequest(f"not a public bundle manifest (format {manifest.get('format')!r})")
        try:
            params = CkksParams.from_dict(manifest["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Unprocessable(f"bundle manifest has no valid 'params': {exc}") from exc
        if params.fingerprint() != manifest.get("params_fingerprint"):
            raise BadRequest("bundle manifest parameters do not match their fingerprint")
        try:
            require_secure(params, self.config.allow_insecure)
        except ParameterError as exc:
            raise BadRequest(f"refusing bundle: {exc}") from exc
        if set(manifest["files"]) != BUNDLE_FILES:
            raise BadRequest(f"a public bundle must hold exactly {sorted(BUNDLE_FILES)}; the "
                             f"manifest lists {sorted(manifest['files'])}")
        job.params_fingerprint = params.fingerprint()
        job.params_name = params.name
        job.params_secure = params.is_secure

    def _check_dataset_manifest(self, manifest: dict, job: Job) -> None:
        """Same parameters as the bundle, and a training plan that fits them."""
        if manifest.get("format") != DATASET_FORMAT:
            raise BadRequest(f"not an encrypted dataset manifest ({manifest.get('format')!r})")
        if job.params_fingerprint is None:
            raise Conflict("upload the public bundle manifest before the dataset manifest")
        if manifest.get("params_fingerprint") != job.params_fingerprint:
            raise BadRequest("encrypted dataset was made with other CKKS parameters than the "
                             f"job's bundle ({manifest.get('params_fingerprint')} vs "
                             f"{job.params_fingerprint})")
        try:
            plan = TrainingPlan.from_dict(manifest["plan"])
            layout = plan.layout  # refuses more features than the slots can hold
            needed = plan.bootstrap_slots  # softmax: refuses impossible denominator groups
        except (KeyError, TypeError, ValueError) as exc:
            raise Unprocessable(f"dataset manifest has no valid training plan: {exc}") from exc
        bundle = json.loads((self.artifact_dir(job.id, BUNDLE) / MANIFEST_NAME).read_text())
        params = CkksParams.from_dict(bundle["params"])
        if plan.slots != params.slots:
            raise BadRequest("training plan slot count differs from the bundle's parameters")
        if plan.compact_softmax and not plan.compact_softmax_fits(params):
            raise Unprocessable("the training plan takes one exponential a step, which these "
                                "parameters (refresh mode, levels) or its width do not fit")
        if not params.refreshed_by_hospital and not set(needed) <= set(params.bootstrap_slots):
            raise BadRequest(f"the training plan bootstraps at {list(needed)} slots but the "
                             f"bundle has bootstrapping keys for {list(params.bootstrap_slots)}")
        largest = max_batch_size(layout, plan.n_classes)
        if max(plan.train_batch_sizes) > largest:
            raise Unprocessable(f"training batches of up to {largest} samples fit this plan; "
                                f"the manifest has {max(plan.train_batch_sizes)}")
        if any(n > layout.samples_per_ct for n in plan.val_batch_sizes):
            raise Unprocessable(f"validation chunks hold at most {layout.samples_per_ct} "
                                "samples (one ciphertext each)")
        expected = dataset_files(plan)
        if set(manifest["files"]) != expected:
            missing, extra = sorted(expected - set(manifest["files"])), sorted(
                set(manifest["files"]) - expected)
            raise BadRequest(f"dataset manifest files do not match its plan (missing "
                             f"{missing[:5]}, unexpected {extra[:5]})")
        job.max_epochs = plan.config.epochs
        job.steps_per_epoch = len(plan.train_batch_sizes)

    def _check_queries_manifest(self, manifest: dict, job: Job, query: QuerySet) -> None:
        """Queries must fit the job: same CKKS parameters, `samples_per_ct` rows per file."""
        if manifest.get("format") != QUERIES_FORMAT:
            raise BadRequest(f"not an encrypted query-set manifest ({manifest.get('format')!r})")
        if manifest.get("params_fingerprint") != job.params_fingerprint:
            raise BadRequest("encrypted queries were made with other CKKS parameters than the "
                             f"job's bundle ({manifest.get('params_fingerprint')} vs "
                             f"{job.params_fingerprint})")
        sizes = manifest.get("sizes")
        dataset = json.loads((self.artifact_dir(job.id, DATASET) / MANIFEST_NAME).read_text())
        per_ct = TrainingPlan.from_dict(dataset["plan"]).layout.samples_per_ct
        if (not isinstance(sizes, list) or not sizes
                or not all(isinstance(n, int) and 1 <= n <= per_ct for n in sizes)):
            raise BadRequest(f"query manifest 'sizes' must be a non-empty list of row counts "
                             f"between 1 and {per_ct} (rows per ciphertext)")
        expected = {query_file_name(i) for i in range(len(sizes))}
        if set(manifest["files"]) != expected:
            raise BadRequest(f"query manifest must list exactly {query_file_name(0)} .. "
                             f"{query_file_name(len(sizes) - 1)}")
        query.n_rows = sum(sizes)
        query.n_ciphertexts = len(sizes)
        query.updated_at = utcnow()

    # ---- 2. chunks -------------------------------------------------------------------------
    def _upload_row(self, session: Session, job_id: str, kind: str, name: str) -> Upload:
        upload = session.scalars(select(Upload).where(
            Upload.job_id == job_id, Upload.kind == kind, Upload.name == name)).first()
        if upload is None or name == MANIFEST_NAME:
            raise NotFound(f"{name!r} is not a file of this job's {kind} manifest")
        return upload

    def accept_chunk(self, job_id: str, kind: str, name: str, index: int, data: bytes,
                     chunk_sha: str) -> dict[str, Any]:
        """Write a verified chunk durably into staging, then record it (crash-safe order)."""
        with self.job_may_vanish(job_id, f"chunk {index} of {name} was written"):
            return self._accept_chunk(job_id, kind, name, index, data, chunk_sha)

    def _accept_chunk(self, job_id: str, kind: str, name: str, index: int, data: bytes,
                      chunk_sha: str) -> dict[str, Any]:
        with self.store.session() as session:
            job = session.get(Job, job_id)
            self._check_open(session, job, kind, "uploads are closed")
            upload = self._upload_row(session, job_id, kind, name)
            if upload.finalized:
                return {"index": index, "complete": True}
            if not 0 <= index < upload.n_chunks:
                raise BadRequest(f"chunk index {index} outside 0..{upload.n_chunks - 1}")
            offset = index * upload.chunk_size
            expected = min(upload.chunk_size, upload.size - offset)
            if len(data) != expected:
                raise BadRequest(f"chunk {index} of {name} has {len(data)} bytes, expected "
                                 f"{expected} (truncated?)")
            if sha256_bytes(data) != chunk_sha:
                raise BadRequest(f"chunk {index} of {name} does not match its SHA-256 header "
                                 "(corrupted in transit?); resend it")
            upload_id, chunk_size, n_chunks = upload.id, upload.chunk_size, upload.n_chunks
            job.updated_at = utcnow()  # bytes arrive: its reservation stays alive
        staged = self.staging_path(job_id, kind, name)
        with file_lock(self.lock_path(staged)):  # never while a finalize reads the file
            with self.store.session() as session:
                upload = session.get(Upload, upload_id)
                if upload is None:
                    raise NotFound(f"{name!r} is no longer part of this upload")
                if upload.finalized:  # finalized while this request waited for the lock
                    return {"index": index, "complete": True}
            failpoint("disk.chunk")
            write_at(staged, index * chunk_size, data)
            with self.store.session() as session:
                if session.get(UploadChunk, (upload_id, index)) is None:
                    session.add(UploadChunk(upload_id=upload_id, index=index,
                                            sha256=chunk_sha))
        return {"index": index, "n_chunks": n_chunks, "complete": False}
