"""The service's worker for a consortium's training: the cloud's side of
`relayed_training.train_over_relay` on the service's store, in a process the supervisor
starts by name (`service.supervisor.CONSORTIUM_WORKER_MODULE`; the service package, a layer
below, never imports this module).

    python -m medblindtuner.consortium.service_worker --consortium ID --data-dir DIR
           [--db-url URL] [--wait-s S] [--insecure-test-params]

It holds the consortium's worker lock (`<consortium>/cloud/worker.lock`), reads the plan the
coordinator started with (`<consortium>/cloud/plan.json`, checked against its SHA-256 in the
`ConsortiumJob` row), assembles the joint public keys from the store's key rounds (no secret
key exists here: each hospital keeps its own share; no plaintext either) and trains,
writing its progress to the row. When hospitals do not answer within `--wait-s` (a refresh
phase: `RefreshPaused`; an epoch's decisions: `TimeoutError`; disagreeing or malformed
answers: `RelayError`) the job is `paused`, naming the hospitals it waits for, and the
worker keeps asking: a re-run resumes from the trainer's checkpoints and the refresh journal
(`<consortium>/cloud/work/`; the store's slots take the same bytes again), so the job goes
on once they answer. Killed, it is restarted by the supervisor and resumes the same way.
Any other error: `failed`, with its message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from medblindtuner.he.joint_refresh import RefreshPaused
from medblindtuner.protocol import WORKER_PID
from medblindtuner.service.consortia import ConsortiumRelay
from medblindtuner.service.consortium_jobs import plan_path
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.locks import acquire_lock
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
from medblindtuner.service.supervisor import CONSORTIUM_CLOUD_DIR
from medblindtuner.training.plan import TrainingPlan

from .relayed_training import train_over_relay
from .remote import RelayError
from .roles import cloud_keys

log = logging.getLogger("medblindtuner.consortium.worker")
PAUSES = (RefreshPaused, TimeoutError, RelayError)
WORK_DIR = "work"  # checkpoints and the refresh journal
_WAITING = re.compile(r"waiting for hospitals? ([0-9][0-9, ]*)")


class JobGone(Exception):
    """The consortium (or its training) was deleted while this worker ran."""


def waiting_of(exc: BaseException) -> list[int]:
    """The hospitals an exception, or one it was raised from, says it waits for."""
    texts = []
    while exc is not None:
        texts.append(str(exc))
        exc = exc.__cause__
    found = _WAITING.findall(" ".join(texts))
    return sorted({int(i) for group in found for i in group.split(",") if i.strip()})


class ConsortiumJobRunner:
    """Runs one consortium's training (the cloud's side) against its `ConsortiumJob` row."""

    def __init__(self, config: ServiceConfig, store: Store, consortium_id: str,
                 wait_s: float) -> None:
        self.config, self.store, self.consortium_id = config, store, consortium_id
        self.wait_s = wait_s
        self.relay = ConsortiumRelay(config, store)
        self.dir = config.job_dir(consortium_id) / CONSORTIUM_CLOUD_DIR

    def _update(self, **fields) -> None:
        """Set fields of the job's row; `JobGone` once it was deleted or ended."""
        with self.store.session() as session:
            job = session.get(ConsortiumJob, self.consortium_id)
            if job is None or job.state in (C_DONE, C_FAILED):
                raise JobGone(f"the training is {job.state if job else 'deleted'}")
            for key, value in fields.items():
                setattr(job, key, value)
            job.updated_at = utcnow()

    def _on_step(self, info: dict) -> None:
        self._update(state=C_TRAINING, waiting_for=None, epoch=int(info["epoch"]),
                     step_in_epoch=int(info["step_in_epoch"]),
                     steps_per_epoch=int(info["steps_per_epoch"]), steps=int(info["steps"]))
        log.info("consortium %s epoch %d step %d/%d", self.consortium_id, info["epoch"],
                 info["step_in_epoch"], info["steps_per_epoch"])

    def _pause(self, exc: BaseException) -> None:
        """The job waits: state paused, the hospitals named, the reason kept."""
        waiting = waiting_of(exc)
        self._update(state=C_PAUSED, waiting_for=",".join(str(i) for i in waiting) or None,
                     pause_reason=f"{type(exc).__name__}: {exc}"[:2000],
                     pauses=ConsortiumJob.pauses + 1)
        log.warning("consortium %s paused (waiting for %s): %s", self.consortium_id,
                    waiting or "answers", exc)

    def _begin(self) -> tuple[TrainingPlan, bool, int, int] | None:
        """The plan, insecurity and counts of a job to run (None: nothing to do); the job
        is marked training by this process."""
        with self.store.session() as session:
            job = session.get(ConsortiumJob, self.consortium_id)
            if job is None or job.state in (C_DONE, C_FAILED):
                log.info("consortium %s: training %s, nothing to do", self.consortium_id,
                         job.state if job else "gone")
                return None
            if job.state == C_QUEUED:
                job.state = C_TRAINING
            job.worker_pid, job.updated_at = os.getpid(), utcnow()
            expected, insecure, counts = job.plan_sha256, job.insecure, (job.n_train, job.n_val)
        raw = plan_path(self.config, self.consortium_id).read_bytes()
        if hashlib.sha256(raw).hexdigest() != expected:
            raise RuntimeError("the stored plan does not match the SHA-256 it was started with")
        if insecure and not self.config.allow_insecure:
            raise RuntimeError("the training uses insecure test parameters; this worker was "
                               "not allowed them")
        return TrainingPlan.from_dict(json.loads(raw)), insecure, *counts

    def run(self) -> None:
        """Train to a published model, pausing (and asking again) while hospitals are
        missing."""
        begun = self._begin()
        if begun is None:
            return
        plan, insecure, n_train, n_val = begun
        keys, _n = cloud_keys(self.relay, self.consortium_id, plan, insecure, self.wait_s)
        while True:
            started = time.monotonic()
            try:
                state = train_over_relay(self.relay, self.consortium_id, keys, plan, n_train,
                                         n_val, self.dir / WORK_DIR, timeout_s=self.wait_s,
                                         on_step=self._on_step)
                break
            except PAUSES as exc:
                self._pause(exc)
                time.sleep(max(0.0, min(self.wait_s, 5.0) - (time.monotonic() - started)))
        self._update(state=C_DONE, waiting_for=None, epoch=state.epoch, steps=state.steps,
                     best_epoch=state.best_epoch, finished_at=utcnow(), error=None)
        log.info("consortium %s: model published (%d epochs, best epoch %d)",
                 self.consortium_id, state.epoch, state.best_epoch)


def _record_failure(store: Store, consortium_id: str, exc: BaseException) -> None:
    try:
        with store.session() as session:
            job = session.get(ConsortiumJob, consortium_id)
            if job is not None and job.state not in (C_DONE, C_FAILED):
                job.state, job.error = C_FAILED, f"{type(exc).__name__}: {exc}"[:2000]
                job.finished_at = job.updated_at = utcnow()
    except Exception:  # noqa: BLE001 - the failure is logged either way
        log.exception("could not record the failure of consortium %s", consortium_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consortium", required=True)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--db-url", default=None)
    parser.add_argument("--wait-s", type=float, default=600.0)
    parser.add_argument("--insecure-test-params", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(message)s")
    config = ServiceConfig(data_dir=args.data_dir, db_url=args.db_url,
                           allow_insecure=args.insecure_test_params)
    directory = config.job_dir(args.consortium) / CONSORTIUM_CLOUD_DIR
    if not directory.is_dir():
        log.error("consortium %s has no %s folder", args.consortium, CONSORTIUM_CLOUD_DIR)
        return 2
    lock = acquire_lock(directory)
    if lock is None:
        log.info("consortium %s: another worker holds the lock; exiting", args.consortium)
        return 0
    (directory / WORKER_PID).write_text(str(os.getpid()))
    store = Store(config.resolved_db_url)
    try:
        ConsortiumJobRunner(config, store, args.consortium, args.wait_s).run()
    except JobGone as exc:
        log.info("consortium %s: %s; worker exits", args.consortium, exc)
    except Exception as exc:  # noqa: BLE001 - any failure must be reported, not lost
        log.exception("consortium %s: training failed", args.consortium)
        _record_failure(store, args.consortium, exc)
        return 1
    finally:
        store.dispose()
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
