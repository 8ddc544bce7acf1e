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
writing its progress to the row.

Pauses. While the cloud's latest request (a refresh phase, an epoch's loss) has gone
unanswered by some hospitals for `--wait-s`, the job shows `paused`, naming them
(`PauseWatch`, a thread reading the store); the worker keeps waiting in place, nothing is
recomputed, and the job is `training` again as soon as they answer. Past `PATIENCE` times
that wait (`RefreshPaused`, `TimeoutError`), or at once for disagreeing or malformed answers
(`RelayError`), the run stops and is run again after a wait: the re-run resumes from the
trainer's checkpoints and the refresh journal (`<consortium>/cloud/work/`; the store's
slots take the same bytes again). Killed, the worker is restarted by the supervisor and
resumes the same way. Any other error: `failed`, with its message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import select

from medblindtuner.cloud.trainer import EncryptedState
from medblindtuner.he.joint_refresh import RefreshPaused
from medblindtuner.protocol import CLOUD_PARTY, ROUNDS_CHANNEL, WORKER_PID
from medblindtuner.service.consortia import ConsortiumRelay, waiting_for
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
    ConsortiumMessage,
    Store,
    utcnow,
)
from medblindtuner.service.supervisor import CONSORTIUM_CLOUD_DIR
from medblindtuner.training.plan import TrainingPlan

from .ceremony import JOINT_KEYS_DIR, JointKeys, key_files_in
from .relayed_training import train_over_relay
from .remote import RelayError
from .roles import cloud_keys

log = logging.getLogger("medblindtuner.consortium.worker")
PAUSES = (RefreshPaused, TimeoutError, RelayError)
PATIENCE = 6  # the relay's waits last this many pause thresholds before a run stops
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


class PauseWatch:
    """Shows the job `paused` while the cloud's latest request awaiting every hospital's
    answer has gone unanswered by some for `wait_s`, and `training` again once it is
    answered (`tick`, every `look_s` in a thread). A job deleted or ended under it ends this
    process (a relay wait cannot be interrupted otherwise)."""

    def __init__(self, runner: ConsortiumJobRunner, look_s: float = 1.0) -> None:
        self.runner, self.look_s = runner, look_s
        self.topic: str | None = None
        self.since = time.monotonic()
        self.shown: list[int] | None = None  # the hospitals the row names as missing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pause-watch", daemon=True)

    def awaited(self) -> tuple[str, list[int]] | None:
        """The cloud's latest request awaiting answers, and the hospitals missing."""
        relay, cid = self.runner.relay, self.runner.consortium_id
        with relay.store.session() as session:
            topic = session.scalars(select(ConsortiumMessage.topic).where(
                ConsortiumMessage.consortium_id == cid,
                ConsortiumMessage.channel == ROUNDS_CHANNEL,
                ConsortiumMessage.sender == CLOUD_PARTY, ConsortiumMessage.awaits_answers)
                .order_by(ConsortiumMessage.created_at.desc()).limit(1)).first()
        if topic is None:
            return None
        return topic, relay.listing(cid, 0, ROUNDS_CHANNEL, topic)["missing"]

    def tick(self) -> None:
        awaited = self.awaited()
        topic, missing = awaited if awaited else (None, [])
        if topic != self.topic:
            self.topic, self.since = topic, time.monotonic()
        stalled = bool(missing) and time.monotonic() - self.since >= self.runner.wait_s
        if stalled and missing != self.shown:
            self.runner.show_pause(missing, f"no answer to {topic!r} for "
                                            f"{self.runner.wait_s:g} s ({waiting_for(missing)})",
                                   again=self.shown is not None)
            self.shown = missing
        elif not stalled and self.shown is not None:
            self.runner.show_training()
            self.shown = None

    def _loop(self) -> None:
        while not self._stop.wait(self.look_s):
            try:
                self.tick()
            except JobGone as exc:
                log.info("consortium %s: %s; worker exits", self.runner.consortium_id, exc)
                os._exit(0)
            except Exception:  # noqa: BLE001 - showing a pause must not end the training
                log.exception("consortium %s: pause watch failed", self.runner.consortium_id)

    def __enter__(self) -> PauseWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


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

    def show_pause(self, waiting: list[int], reason: str, again: bool = False) -> None:
        """The job waits for `waiting` (`again`: the same pause, fewer missing)."""
        self._update(state=C_PAUSED, waiting_for=",".join(str(i) for i in waiting) or None,
                     pause_reason=reason[:2000],
                     pauses=ConsortiumJob.pauses + (0 if again else 1))
        log.warning("consortium %s paused: %s", self.consortium_id, reason)

    def show_training(self) -> None:
        self._update(state=C_TRAINING, waiting_for=None)
        log.info("consortium %s: the hospitals answered; training", self.consortium_id)

    def _on_step(self, info: dict) -> None:
        self._update(state=C_TRAINING, waiting_for=None, epoch=int(info["epoch"]),
                     step_in_epoch=int(info["step_in_epoch"]),
                     steps_per_epoch=int(info["steps_per_epoch"]), steps=int(info["steps"]))
        log.info("consortium %s epoch %d step %d/%d", self.consortium_id, info["epoch"],
                 info["step_in_epoch"], info["steps_per_epoch"])


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
        with key_files_in(self.dir / JOINT_KEYS_DIR) as key_files:
            keys, _n = cloud_keys(self.relay, self.consortium_id, plan, insecure, self.wait_s,
                                  key_files)
            state = self._train(keys, plan, n_train, n_val)
        self._update(state=C_DONE, waiting_for=None, epoch=state.epoch, steps=state.steps,
                     best_epoch=state.best_epoch, finished_at=utcnow(), error=None)
        log.info("consortium %s: model published (%d epochs, best epoch %d)",
                 self.consortium_id, state.epoch, state.best_epoch)

    def _train(self, keys: JointKeys, plan: TrainingPlan, n_train: int,
               n_val: int) -> EncryptedState:
        """`train_over_relay` until it finishes, showing a pause (and asking again) while
        hospitals are missing."""
        with PauseWatch(self):
            while True:
                started = time.monotonic()
                try:
                    return train_over_relay(self.relay, self.consortium_id, keys, plan,
                                            n_train, n_val, self.dir / WORK_DIR,
                                            timeout_s=PATIENCE * self.wait_s,
                                            on_step=self._on_step)
                except PAUSES as exc:
                    self.show_pause(waiting_of(exc), f"{type(exc).__name__}: {exc}")
                    time.sleep(max(0.0, self.wait_s - (time.monotonic() - started)))


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
