"""Job store: SQLAlchemy 2.0 models for jobs, uploads, chunks and early-stopping decisions.

The database holds only metadata (ids, token hashes, sizes, SHA-256 digests, counters and
timestamps): never features, labels, weights or key material, so a leaked DB reveals nothing
about patients. SQLite (WAL mode) is the default; any SQLAlchemy URL (e.g. PostgreSQL) works
because only portable column types are used.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from medblindtuner.protocol import CREATED, Q_UPLOADING

# The states, upload kinds and file names these rows refer to are wire constants: `protocol`.


def new_query_id() -> str:
    """12 hex digits: short enough for the Upload.kind column, unguessable enough per job."""
    return secrets.token_hex(6)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)  # noqa: UP017 - explicit for readers on older Pythons


def aware(value: datetime) -> datetime:
    """A stored timestamp as UTC-aware (SQLite hands them back naive)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value  # noqa: UP017


def hash_token(token: str) -> str:
    """Only this digest is stored: a DB leak must not let anyone act as the hospital."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, digest: str) -> bool:
    return hmac.compare_digest(hash_token(token), digest)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def new_job_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    # The address that created it (per-client job cap); not patient data.
    client: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(32), default=CREATED, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Public facts about the job (from the manifests): parameters and schedule.
    params_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    params_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    params_secure: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    max_epochs: Mapped[int] = mapped_column(Integer, default=0)
    steps_per_epoch: Mapped[int] = mapped_column(Integer, default=0)
    # Progress, written by the worker.
    epoch: Mapped[int] = mapped_column(Integer, default=0)  # epoch being trained (1-based)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    step_in_epoch: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    bootstraps: Mapped[int] = mapped_column(Integer, default=0)
    seconds_per_step: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_epoch: Mapped[int] = mapped_column(Integer, default=0)
    awaiting_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    loss_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_ready: Mapped[bool] = mapped_column(Boolean, default=False)
    # Supervision.
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    bytes_uploaded: Mapped[int] = mapped_column(BigInteger, default=0)


class Upload(Base):
    """One file of one artifact (bundle or dataset), announced by that artifact's manifest."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("job_id", "kind", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    chunk_size: Mapped[int] = mapped_column(BigInteger)
    finalized: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


class UploadChunk(Base):
    """A chunk that was checksum-verified and is durably on disk (resume point)."""

    __tablename__ = "upload_chunks"

    upload_id: Mapped[int] = mapped_column(
        ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))


class QuerySet(Base):
    """One encrypted query set of a finished job and the state of its scoring worker.

    Metadata only (ids, counts, states): the query and score ciphertexts live on disk.
    """

    __tablename__ = "query_sets"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=Q_UPLOADING, index=True)
    n_rows: Mapped[int] = mapped_column(Integer, default=0)
    n_ciphertexts: Mapped[int] = mapped_column(Integer, default=0)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DecisionRow(Base):
    """The hospital's early-stopping answer for one epoch (kept so a restarted worker reuses it)."""

    __tablename__ = "decisions"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    continue_training: Mapped[bool] = mapped_column(Boolean)
    best_epoch: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RefreshRow(Base):
    """One refresh request relayed to the hospital (refresh mode "hospital") and, once given,
    its answer: SHA-256s only (the bytes are ciphertext parts in the job's `refreshes/`)."""

    __tablename__ = "refreshes"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    answer_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Consortium(Base):
    """A consortium job: n hospitals relaying key rounds and sealed shares (`consortia`)."""

    __tablename__ = "consortia"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    n_parties: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    messages: Mapped[int] = mapped_column(Integer, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ConsortiumToken(Base):
    """One hospital's bearer token (its SHA-256): the token decides the hospital's index."""

    __tablename__ = "consortium_tokens"

    consortium_id: Mapped[str] = mapped_column(
        ForeignKey("consortia.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))


class ConsortiumMessage(Base):
    """One relayed message's slot (channel, topic, sender, recipient) and its SHA-256; the
    bytes are a file in the consortium's folder (`protocol.consortium_message_path`)."""

    __tablename__ = "consortium_messages"

    consortium_id: Mapped[str] = mapped_column(
        ForeignKey("consortia.id", ondelete="CASCADE"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(8), primary_key=True)
    topic: Mapped[str] = mapped_column(String(128), primary_key=True)
    sender: Mapped[int] = mapped_column(Integer, primary_key=True)
    recipient: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    # a request of the cloud that every hospital answers in the same round (a refresh phase)
    awaits_answers: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# The states of a consortium's training job (`ConsortiumJob.state`), run by the service's
# consortium worker (`consortium.service_worker`, started by the supervisor).
C_QUEUED, C_TRAINING, C_PAUSED, C_DONE, C_FAILED = ("queued", "training", "paused", "done",
                                                    "failed")
C_ACTIVE_STATES = (C_QUEUED, C_TRAINING, C_PAUSED)


class ConsortiumJob(Base):
    """A consortium's training, started once by its coordinator (hospital 0): the public
    plan's SHA-256 (the plan is a file beside the worker), the union's counts, the progress
    and, while paused, the hospitals the worker waits for. No key material, no plaintext."""

    __tablename__ = "consortium_jobs"

    consortium_id: Mapped[str] = mapped_column(
        ForeignKey("consortia.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=C_QUEUED, index=True)
    plan_sha256: Mapped[str] = mapped_column(String(64))
    insecure: Mapped[bool] = mapped_column(Boolean, default=False)
    n_train: Mapped[int] = mapped_column(Integer)
    n_val: Mapped[int] = mapped_column(Integer)
    max_epochs: Mapped[int] = mapped_column(Integer, default=0)
    steps_per_epoch: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    step_in_epoch: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    best_epoch: Mapped[int] = mapped_column(Integer, default=0)
    waiting_for: Mapped[str | None] = mapped_column(String(256), nullable=True)  # "1,2"
    pause_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    pauses: Mapped[int] = mapped_column(Integer, default=0)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def bytes_held(session: Session, reservation_cutoff: datetime) -> int:
    """What counts against the service's disk bound (`max_total_bytes`): every stored upload,
    the declared uploads of jobs active since `reservation_cutoff`, and every consortium's
    relayed messages."""
    rows = session.execute(select(Upload.size, Upload.finalized, Job.updated_at).join(
        Job, Job.id == Upload.job_id)).all()
    uploads = sum(size for size, finalized, seen in rows
                  if finalized or aware(seen) >= reservation_cutoff)
    return uploads + int(session.scalar(select(func.sum(Consortium.bytes_stored))) or 0)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API object
    """WAL lets the web process read while a worker writes; busy_timeout instead of errors."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """Engine + session factory shared by the web process and (separately) each worker."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict = {"future": True, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_all(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
