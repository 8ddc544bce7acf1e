"""Wire protocol of the cloud service: the names hospital client, web app and worker share.

Everything both ends (or both cloud processes) must spell the same way lives here, once:
manifest name, HTTP headers, job and query-set states, artifact kinds and the layout of a job
folder on the cloud. Standard library only, because the hospital client imports it and must not
pull in the server's database or web stack.
"""

from __future__ import annotations

from pathlib import Path

from medblindtuner.formats import (  # noqa: F401 (artifact names are part of the protocol)
    MANIFEST_NAME,
    RESULT_FORMAT,
    query_file_name,
    result_weight_name,
)

# ---- files and headers -------------------------------------------------------------------------
AUTHORIZATION_HEADER = "Authorization"  # "Bearer <token of the job>"
CHUNK_SHA_HEADER = "X-Chunk-SHA256"  # hex SHA-256 of one uploaded chunk
CONTENT_SHA_HEADER = "X-Content-SHA256"  # hex SHA-256 of a downloaded file
EPOCH_HEADER = "X-Epoch"  # the epoch a validation-loss download belongs to
REFRESH_INDEX_HEADER = "X-Refresh-Index"  # the index of a refresh request download
# Refresh mode "hospital": the longest a `GET /jobs/{id}/refresh?wait=S` waits for a request
# (the client's default long poll; docs/service.md, "Refresh requests").
MAX_REFRESH_WAIT_S = 60.0
REFRESH_WAIT_S = 25.0
# Files one "finalize several" request may name (POST .../finalize, {"names": [...]}): one
# validator child parses their ciphertexts (~0.1 s each) instead of one child per file.
MAX_FINALIZE_BATCH = 64


def bearer(token: str | None) -> dict[str, str]:
    """The request header that authenticates a job (none without a token)."""
    return {AUTHORIZATION_HEADER: f"Bearer {token}"} if token else {}


# ---- job states --------------------------------------------------------------------------------
# `queued`: start accepted, worker not yet reporting. Terminal states never change.
CREATED = "created"
QUEUED = "queued"
RUNNING = "running"
AWAITING_DECISION = "awaiting_decision"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"
ACTIVE_STATES = (QUEUED, RUNNING, AWAITING_DECISION)
TERMINAL_STATES = (FINISHED, FAILED, CANCELLED)

# ---- query-set (encrypted inference) states ---------------------------------------------------
# `uploading`: files may still arrive; `queued`: scoring requested, worker not yet reporting;
# `done`: encrypted scores ready for download.
Q_UPLOADING = "uploading"
Q_QUEUED = "queued"
Q_SCORING = "scoring"
Q_DONE = "done"
Q_FAILED = "failed"
Q_ACTIVE_STATES = (Q_QUEUED, Q_SCORING)
Q_TERMINAL_STATES = (Q_DONE, Q_FAILED)

# ---- upload kinds ------------------------------------------------------------------------------
BUNDLE = "bundle"
DATASET = "dataset"
ARTIFACT_KINDS = (BUNDLE, DATASET)
QUERY_KIND_PREFIX = "q-"  # Upload.kind of a query set's files: "q-<query id>" (<= 16 chars)


def query_kind(query_id: str) -> str:
    """The upload kind under which a query set's files are recorded (reuses the upload tables)."""
    return f"{QUERY_KIND_PREFIX}{query_id}"


def is_query_kind(kind: str) -> bool:
    return kind.startswith(QUERY_KIND_PREFIX)


def query_id_of(kind: str) -> str:
    """Inverse of `query_kind`."""
    return kind[len(QUERY_KIND_PREFIX):]


# ---- layout of a job folder on the cloud (`<data dir>/jobs/<job id>/`) ------------------------
# bundle/ dataset/        uploaded artifacts, as OpenFHE reads them (hard links into blobs/)
# checkpoints/            per-epoch training state (EncryptedTrainer)
# decisions/              loss_epoch_NNNN.bin: encrypted validation loss awaiting a decision
# result/                 w{j}.bin + manifest.json: encrypted weights of the best epoch
# refreshes/              request_NNNNNNN.bin / answer_NNNNNNN.bin: refresh requests relayed
#                         to the hospital and its answers (refresh mode "hospital")
# refresh_journal/        the worker's CloudRefresher journal (he.refresh)
# queries/<q>/            input/ (uploaded queries), scores/ (encrypted scores), score.lock
# worker.lock worker.pid worker.log   the training worker (the same three in queries/<q>/)
CHECKPOINTS_DIR = "checkpoints"
DECISIONS_DIR = "decisions"
REFRESHES_DIR = "refreshes"
REFRESH_JOURNAL_DIR = "refresh_journal"
RESULT_DIR = "result"
QUERIES_DIR = "queries"
QUERY_INPUT_DIR = "input"
SCORES_DIR = "scores"
SCORES_TMP_DIR = ".scores_tmp"
WORKER_LOCK = "worker.lock"
SCORE_LOCK = "score.lock"
WORKER_PID = "worker.pid"
WORKER_LOG = "worker.log"


def decision_path(job_dir: Path, epoch: int) -> Path:
    """Encrypted validation loss of `epoch`, published by the worker for the hospital."""
    return Path(job_dir) / DECISIONS_DIR / f"loss_epoch_{epoch:04d}.bin"


def decision_tmp_path(job_dir: Path, epoch: int) -> Path:
    """Where the worker writes the loss before renaming it to `decision_path`."""
    return Path(job_dir) / DECISIONS_DIR / f".loss_epoch_{epoch:04d}.tmp"


def refresh_path(job_dir: Path, index: int, kind: str) -> Path:
    """The relayed refresh request (`kind` "request") or the hospital's answer ("answer")."""
    return Path(job_dir) / REFRESHES_DIR / f"{kind}_{index:07d}.bin"


def query_dir(job_dir: Path, query_id: str) -> Path:
    """`<job>/queries/<query id>/`: `input/` (uploaded queries) and `scores/` (result)."""
    return Path(job_dir) / QUERIES_DIR / query_id


# ---- consortium relay (n hospitals under a joint key; service/consortia.py) ---------------------
# Two channels: "rounds" (broadcast: a key round's `RoundMessage` by party, readable by every
# member; party CLOUD_PARTY = what the cloud publishes, e.g. a ciphertext to decrypt) and
# "sealed" (an envelope from one hospital to another, readable by its recipient only).
ROUNDS_CHANNEL = "rounds"
SEALED_CHANNEL = "sealed"
CONSORTIUM_CHANNELS = (ROUNDS_CHANNEL, SEALED_CHANNEL)
CLOUD_PARTY = -1
ROUND_FORMAT = "medblindtuner-threshold-round/1"  # he.threshold.RoundMessage
SEALED_FORMAT = "medblindtuner-sealed-share/1"  # consortium.sealing envelopes
# Long polls of the relay (`?wait=S`): the longest the service waits, the client's default.
MAX_CONSORTIUM_WAIT_S = 60.0
CONSORTIUM_WAIT_S = 25.0
CONSORTIUM_DIR = "consortium"


def consortium_message_path(consortium_dir: Path, channel: str, topic: str, sender: int,
                            recipient: int) -> Path:
    """One relayed message: `<consortium>/consortium/<channel>/<topic>/s<sender>_r<recipient>`
    (recipient -1: a broadcast round message)."""
    return Path(consortium_dir) / CONSORTIUM_DIR / channel / topic / f"s{sender}_r{recipient}.bin"
