"""What the service shows of its rows: job and query-set status, listed result files, and its
log file (ids, sizes and hashes only; never plaintext)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medblindtuner.protocol import Q_DONE, TERMINAL_STATES
from medblindtuner.service.errors import NotFound
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.store import Job, QuerySet, aware

log = logging.getLogger("medblindtuner.service")
__all__ = ["aware", "configure_logging", "job_status", "listed_file", "query_status"]


def configure_logging(config: ServiceConfig) -> None:
    """Service log file in the data dir (ids, sizes and hashes only; never plaintext)."""
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    path = Path(config.data_dir) / "service.log"
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in log.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _iso(value) -> str | None:  # noqa: ANN001 - datetime or None
    return value.isoformat() if value else None


def job_status(job: Job) -> dict[str, Any]:
    """What `GET /jobs/{id}` shows: progress, ETA and public facts, never data."""
    total = job.max_epochs * job.steps_per_epoch
    eta = None
    if job.state in TERMINAL_STATES:
        eta = 0.0
    elif job.seconds_per_step and total:
        # Upper bound: early stopping may end the job sooner.
        eta = round(max(total - job.steps, 0) * job.seconds_per_step, 1)
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
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
    }


def query_status(query: QuerySet) -> dict[str, Any]:
    """The scoring state of one query set."""
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
        "created_at": _iso(query.created_at),
        "started_at": _iso(query.started_at),
        "finished_at": _iso(query.finished_at),
    }


def listed_file(manifest: dict[str, Any], directory: Path, name: str,
                what: str) -> tuple[Path, str]:
    """Path and SHA-256 of a file that `manifest` lists (result weights, scores); names not
    listed are refused, so no other file of the job can be read this way."""
    if name not in manifest["files"]:
        raise NotFound(f"{name!r} is not part of the {what}")
    return directory / name, manifest["files"][name]["sha256"]
