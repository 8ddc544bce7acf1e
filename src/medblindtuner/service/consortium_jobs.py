"""A consortium's training as a job of the service: started once, run by a supervised worker.

    coordinator  hospital 0's token, `POST /consortia/{id}/start` with the agreed public plan
                 and the union's counts, once every hospital's rows are in (its manifest
                 round `rows-<i>`, `consortium.relayed_training.send_rows`)
    service      writes the plan beside the worker (`<consortium>/cloud/plan.json`), a
                 `ConsortiumJob` row (queued) and has the supervisor start the consortium
                 worker (`consortium.service_worker`: the cloud's side of
                 `relayed_training.train_over_relay` on this store), restarted if it dies
    members      `GET /consortia/{id}` shows `job`: queued / training (epoch, step) /
                 paused: waiting for hospitals i, j / done (model published) / failed

Only hospital 0 starts: one decision, so a second start is a plain 409 and no member can
start a training the coordinator has not agreed to. The web process parses the plan's JSON
only (no OpenFHE bytes); the worker holds only the joint public keys it assembles from the
store.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from medblindtuner.formats import atomic_write_bytes
from medblindtuner.protocol import ROUNDS_CHANNEL
from medblindtuner.service.blobs import sha256_bytes
from medblindtuner.service.consortia import ConsortiumRelay, waiting_for
from medblindtuner.service.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Unprocessable,
    out_of_space_is_507,
)
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.locks import file_lock
from medblindtuner.service.store import (
    C_DONE,
    C_FAILED,
    C_PAUSED,
    C_QUEUED,
    C_TRAINING,
    ConsortiumJob,
    Store,
    utcnow,
)
from medblindtuner.service.supervisor import CONSORTIUM_CLOUD_DIR, Supervisor, WorkerRef
from medblindtuner.training.plan import TrainingPlan

log = logging.getLogger("medblindtuner.service")
COORDINATOR = 0
PLAN_FILE = "plan.json"


def rows_manifest_round(hospital: int) -> str:
    """Hospital `hospital`'s rows manifest (`relayed_training.rows_topic(hospital)`)."""
    return f"rows-{hospital}"


def plan_path(config: ServiceConfig, consortium_id: str) -> Path:
    """The agreed plan the worker trains by (written once, at start)."""
    return config.job_dir(consortium_id) / CONSORTIUM_CLOUD_DIR / PLAN_FILE


def job_view(job: ConsortiumJob | None) -> dict[str, Any] | None:
    """What members see of the training (None: not started): its state, progress, the
    hospitals a paused worker waits for, and `detail`, one line saying all that."""
    if job is None:
        return None
    waiting = [int(i) for i in job.waiting_for.split(",")] if job.waiting_for else []
    details = {
        C_QUEUED: "queued",
        C_TRAINING: f"training: epoch {job.epoch}, step {job.step_in_epoch}/"
                    f"{job.steps_per_epoch} ({job.steps} steps)" if job.epoch else
                    "training: starting (the joint keys and the union's rows)",
        C_PAUSED: f"paused: {waiting_for(waiting)}" if waiting else "paused",
        C_DONE: f"done: model published (best epoch {job.best_epoch})",
        C_FAILED: f"failed: {job.error}",
    }
    return {"state": job.state, "detail": details.get(job.state, job.state),
            "epoch": job.epoch, "step_in_epoch": job.step_in_epoch,
            "steps_per_epoch": job.steps_per_epoch, "steps": job.steps,
            "max_epochs": job.max_epochs, "best_epoch": job.best_epoch,
            "waiting_for": waiting, "pause_reason": job.pause_reason, "pauses": job.pauses,
            "restarts": job.restarts, "error": job.error,
            "n_train": job.n_train, "n_val": job.n_val, "plan_sha256": job.plan_sha256}


class ConsortiumJobs:
    """Start, show and stop consortium trainings (the relay's rows, the supervisor's
    workers). Callers pass a consortium id and hospital index that `authorise` accepted."""

    def __init__(self, config: ServiceConfig, store: Store, relay: ConsortiumRelay,
                 supervisor: Supervisor) -> None:
        self.config, self.store, self.relay, self.supervisor = config, store, relay, supervisor

    def status(self, consortium_id: str) -> dict[str, Any] | None:
        with self.store.session() as session:
            return job_view(session.get(ConsortiumJob, consortium_id))

    def start(self, consortium_id: str, index: int, plan: dict[str, Any], n_train: int,
              n_val: int, insecure: bool = False) -> dict[str, Any] | None:
        """Queue the training and start its worker. 403: not the coordinator; 409: already
        started, or a hospital's rows are missing (named); 400: insecure parameters on a
        service that refuses them; 422: not a plan for these counts."""
        if index != COORDINATOR:
            raise Forbidden(f"only hospital {COORDINATOR}, the consortium's coordinator, starts "
                            f"its training; this token is hospital {index}'s")
        self._refuse_started(consortium_id)
        if insecure and not self.config.allow_insecure:
            raise BadRequest("refusing to train: this service does not accept insecure test "
                             "parameters")
        raw = self._checked_plan(plan, n_train, n_val)
        self._require_rows(consortium_id)
        with self.supervisor.starting():
            self._queue(consortium_id, raw, (n_train, n_val), insecure)
            self.supervisor.launch(WorkerRef(consortium_id, consortium=True))
        log.info("consortium %s: training queued (plan sha256 %s)", consortium_id,
                 sha256_bytes(raw)[:16])
        return self.status(consortium_id)

    def _queue(self, consortium_id: str, raw: bytes, counts: tuple[int, int],
               insecure: bool) -> None:
        """The plan file, then the job's row (queued), once, under the consortium's lock."""
        parsed = TrainingPlan.from_dict(json.loads(raw))
        path = plan_path(self.config, consortium_id)
        with file_lock(self.relay.folder(consortium_id) / ".lock"):
            self._refuse_started(consortium_id)
            try:
                with out_of_space_is_507("starting the training"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(path, raw)
                    with self.store.session() as session:
                        session.add(ConsortiumJob(
                            consortium_id=consortium_id, state=C_QUEUED, insecure=insecure,
                            plan_sha256=sha256_bytes(raw), n_train=counts[0],
                            n_val=counts[1], max_epochs=parsed.config.epochs,
                            steps_per_epoch=len(parsed.train_batch_sizes),
                            started_at=utcnow()))
            except IntegrityError as exc:
                raise Conflict("the consortium's training was already started") from exc

    def _refuse_started(self, consortium_id: str) -> None:
        with self.store.session() as session:
            job = session.get(ConsortiumJob, consortium_id)
            if job is not None:
                raise Conflict(f"the consortium's training was already started (it is "
                               f"{job.state}); a consortium trains once")

    def _checked_plan(self, plan: dict[str, Any], n_train: int, n_val: int) -> bytes:
        """The plan's canonical JSON once it parses and fits the counts and the limits."""
        limits = self.config.limits
        try:
            parsed = TrainingPlan.from_dict(plan)
            batches = parsed.train_batch_sizes + parsed.val_batch_sizes
            if not all(type(b) is int and b > 0 for b in batches) or type(
                    parsed.config.epochs) is not int:
                raise ValueError("batch sizes and epochs are positive integers")
            canonical = json.dumps(parsed.to_dict(), sort_keys=True).encode()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Unprocessable(f"not a training plan ({type(exc).__name__}: {exc})") from exc
        if (sum(parsed.train_batch_sizes), sum(parsed.val_batch_sizes)) != (n_train, n_val):
            raise Unprocessable(f"the plan's batches hold {sum(parsed.train_batch_sizes)} "
                                f"training and {sum(parsed.val_batch_sizes)} validation rows, "
                                f"not the union's {n_train} and {n_val}")
        if not 1 <= parsed.config.epochs <= limits.max_epochs:
            raise Unprocessable(f"the plan's epochs must be 1 to {limits.max_epochs}")
        if len(parsed.train_batch_sizes) + len(parsed.val_batch_sizes) > limits.max_batches:
            raise Unprocessable(f"the plan has more than {limits.max_batches} batches")
        return canonical

    def _require_rows(self, consortium_id: str) -> None:
        """409 naming the hospitals whose rows manifest is not in yet."""
        n = self.relay.n_parties(consortium_id)
        missing = [i for i in range(n) if str(i) not in self.relay.listing(
            consortium_id, COORDINATOR, ROUNDS_CHANNEL, rows_manifest_round(i))["posted"]]
        if missing:
            raise Conflict(f"the rows are not all in: {waiting_for(missing)}")

    def stop(self, consortium_id: str) -> None:
        """Stop the worker (before the consortium is deleted)."""
        with self.store.session() as session:
            job = session.get(ConsortiumJob, consortium_id)
            pid = None if job is None else job.worker_pid
            if job is not None and job.state not in (C_DONE, C_FAILED):
                job.state, job.error = C_FAILED, "the consortium was deleted"
        self.supervisor.stop(WorkerRef(consortium_id, consortium=True), pid, grace_s=5)
