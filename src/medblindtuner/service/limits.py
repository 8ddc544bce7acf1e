"""Service configuration and upload limits.

Limits exist because the service accepts multi-GB key material from clients it does not trust:
without a cap on chunk, file and job sizes one client could fill the disk and starve the other
jobs. Everything is checked *before* bytes are written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from medblindtuner.he.untrusted import machine_memory_bytes
from medblindtuner.protocol import query_dir

GIB = 1 << 30
MIB = 1 << 20


def machine_share(fraction: float, cap: int) -> int:
    """`fraction` of this machine's memory (or its cgroup limit), at most `cap`."""
    return min(cap, int(machine_memory_bytes() * fraction))


@dataclass(frozen=True)
class ServiceLimits:
    """Upper bounds on what one job may upload (production rotation keys are several GB)."""

    max_upload_bytes: int = 64 * GIB  # one artifact file
    max_job_bytes: int = 128 * GIB  # everything one job uploads, all files together
    chunk_bytes: int = 8 * MIB  # chunk size the server asks clients to use
    max_manifest_bytes: int = 4 * MIB  # checked before the JSON is parsed
    max_files_per_artifact: int = 100_000
    # JSON shape, checked on the raw bytes before parsing (deep nesting and huge integers
    # cost the parser time and memory before any schema can refuse them).
    max_json_depth: int = 16
    max_json_int_digits: int = 20
    max_epochs: int = 1_000
    max_batches: int = 100_000  # training batches (or validation chunks) in a plan
    # The subprocesses that parse uploaded OpenFHE files (`validate`): wall clock and address
    # space. One file at finalize (context, public key, ciphertexts: MBs; a length field
    # flipped to 2^62 must fail fast, not swap) and the whole job at start (rotation keys: GBs).
    # The memory bounds are shares of this machine; at most `max_concurrent_validators` run
    # at once (the others queue, up to `validator_queue_s`, then 503), so together they stay
    # under half the machine's memory.
    validate_timeout_s: float = 120.0
    validate_memory_bytes: int = field(default_factory=lambda: machine_share(0.25, 4 * GIB))
    validate_job_timeout_s: float = 1800.0
    validate_job_memory_bytes: int = field(
        default_factory=lambda: machine_share(0.5, 48 * GIB))
    max_concurrent_validators: int = 1
    validator_queue_s: float = 900.0
    # Quotas: per job token (requests), per client address (job creation), global.
    max_live_jobs: int = 1_000  # jobs stored at once (any state); POST /jobs answers 429 beyond
    max_total_bytes: int = 1 << 40  # everything all jobs may upload together (disk bound)
    max_query_sets_per_job: int = 100
    token_rate_per_s: float = 50.0  # sustained requests per job token ...
    token_burst: int = 400  # ... after a burst of this many
    create_rate_per_s: float = 2.0  # job creations per client address ...
    create_burst: int = 60
    failed_auth_rate_per_s: float = 1.0  # wrong tokens / unknown jobs per client address ...
    failed_auth_burst: int = 100  # ... beyond which its every authentication is a 429
    max_jobs_per_client: int = 100  # jobs one client address may hold at once
    # Consortium jobs (`consortia`): hospitals per consortium, one relayed message (an
    # automorphism round of 4 keys is ~360 MB at ring 2^16), all messages of one consortium.
    max_consortium_hospitals: int = 16
    max_consortium_message_bytes: int = 1 * GIB
    max_consortium_bytes: int = 64 * GIB
    max_consortium_messages: int = 100_000
    # The consortium worker waits this long for the hospitals' answers (a refresh phase, an
    # epoch's decisions) before it shows "paused: waiting for hospitals ..."; it keeps
    # waiting and resumes when they answer.
    consortium_wait_s: float = 600.0
    # A job not started (or failed/cancelled) with no activity for this long is deleted when
    # the next job is created; its declared-but-unsent bytes stop counting towards
    # `max_total_bytes` after `upload_reservation_ttl_s` without a byte.
    idle_job_ttl_s: float = 24 * 3600.0
    upload_reservation_ttl_s: float = 900.0


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the web process and its workers need to agree on."""

    data_dir: Path
    db_url: str | None = None  # default: SQLite file in data_dir
    allow_insecure: bool = False  # accept INSECURE_TEST parameter bundles (tests only)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    python: str = sys.executable  # interpreter that runs `-m medblindtuner.service.worker`
    worker_poll_s: float = 0.25  # how often a waiting worker re-reads the DB
    refresh_poll_s: float = 0.01  # how often a worker awaiting a refresh answer looks for it
    monitor_interval_s: float = 2.0  # how often the web process checks its workers
    max_worker_restarts: int = 3
    # Addresses of reverse proxies whose X-Forwarded-For is believed (uvicorn's
    # forwarded_allow_ips, e.g. "10.0.0.5"); None: no proxy headers at all.
    forwarded_allow_ips: str | None = None

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{(Path(self.data_dir) / 'jobs.sqlite3').resolve()}"

    @property
    def blobs_dir(self) -> Path:
        return Path(self.data_dir) / "blobs"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.data_dir) / "jobs"

    @property
    def staging_dir(self) -> Path:
        return Path(self.data_dir) / "staging"

    def job_dir(self, job_id: str) -> Path:
        """`<data dir>/jobs/<job id>/`; its layout is in `protocol`."""
        return self.jobs_dir / job_id

    def query_dir(self, job_id: str, query_id: str) -> Path:
        return query_dir(self.job_dir(job_id), query_id)
