"""One supervisor for the worker processes of the cloud: training jobs, query-set scoring and
consortium training.

Every kind of worker is the same thing seen from the web process: a detached
`python -m medblindtuner.service.worker` process that loads the job's keys (which the web process
never does), holds a lock file while it lives and reports through the DB. So one class starts
them, tells whether they still run, stops them, and restarts the ones that died (crash, OOM
kill, service restart) until `max_worker_restarts`, after which the job or query set is marked
failed. What differs between them is data (`WorkerRef`).

A consortium's training runs the cloud's side of `consortium.relayed_training`, a layer above
this package: the supervisor starts it by module name (`CONSORTIUM_WORKER_MODULE`), never
imports it. Its lock, pid file and log are in `<consortium>/cloud/`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from medblindtuner.protocol import (
    ACTIVE_STATES,
    FAILED,
    Q_ACTIVE_STATES,
    Q_FAILED,
    SCORE_LOCK,
    WORKER_LOCK,
    WORKER_LOG,
    WORKER_PID,
)
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.locks import worker_alive
from medblindtuner.service.store import (
    C_ACTIVE_STATES,
    C_FAILED,
    ConsortiumJob,
    Job,
    QuerySet,
    Store,
    utcnow,
)

log = logging.getLogger("medblindtuner.service")
WORKER_MODULE = "medblindtuner.service.worker"
CONSORTIUM_WORKER_MODULE = "medblindtuner.consortium.service_worker"
CONSORTIUM_CLOUD_DIR = "cloud"  # <consortium>/cloud/: plan, lock, pid, log, checkpoints


@dataclass(frozen=True)
class WorkerRef:
    """What one worker works on: a job's training, (with `query_id`) scoring a query set, or
    (with `consortium`, `job_id` being the consortium's id) a consortium's training."""

    job_id: str
    query_id: str | None = None
    consortium: bool = False

    @property
    def scoring(self) -> bool:
        return self.query_id is not None

    @property
    def key(self) -> str:
        """Key of the child process table."""
        if self.consortium:
            return f"consortium/{self.job_id}"
        return self.job_id if self.query_id is None else f"{self.job_id}/{self.query_id}"

    @property
    def label(self) -> str:
        """How logs name it (ids only)."""
        if self.consortium:
            return f"consortium {self.job_id}"
        if self.query_id is None:
            return f"job {self.job_id}"
        return f"job {self.job_id} query set {self.query_id}"

    @property
    def noun(self) -> str:
        if self.consortium:
            return "consortium worker"
        return "scoring worker" if self.scoring else "worker"

    @property
    def lock_name(self) -> str:
        return SCORE_LOCK if self.scoring else WORKER_LOCK

    @property
    def model(self) -> type[Job] | type[QuerySet] | type[ConsortiumJob]:
        """The DB row that carries its state, restarts and pid."""
        if self.consortium:
            return ConsortiumJob
        return QuerySet if self.scoring else Job

    @property
    def row_id(self) -> str:
        return self.query_id if self.query_id is not None else self.job_id

    @property
    def active_states(self) -> tuple[str, ...]:
        if self.consortium:
            return C_ACTIVE_STATES
        return Q_ACTIVE_STATES if self.scoring else ACTIVE_STATES

    @property
    def failed_state(self) -> str:
        if self.consortium:
            return C_FAILED
        return Q_FAILED if self.scoring else FAILED

    def directory(self, config: ServiceConfig) -> Path:
        """Where its lock, pid file and log live."""
        if self.consortium:
            return config.job_dir(self.job_id) / CONSORTIUM_CLOUD_DIR
        if self.query_id is None:
            return config.job_dir(self.job_id)
        return config.query_dir(self.job_id, self.query_id)


def spawn_worker(config: ServiceConfig, ref: WorkerRef) -> subprocess.Popen:
    """Start a detached worker (own session: it survives a restart of the web service)."""
    directory = ref.directory(config)
    directory.mkdir(parents=True, exist_ok=True)
    store = ["--data-dir", str(Path(config.data_dir).resolve()), "--db-url",
             config.resolved_db_url]
    if ref.consortium:
        command = [config.python, "-m", CONSORTIUM_WORKER_MODULE, "--consortium", ref.job_id,
                   *store, "--wait-s", str(config.limits.consortium_wait_s)]
    else:
        command = [config.python, "-m", WORKER_MODULE, "--job", ref.job_id, *store]
    if ref.query_id is not None:
        command += ["--score", ref.query_id]
    if config.allow_insecure:
        command.append("--insecure-test-params")
    with open(directory / WORKER_LOG, "ab") as log_file:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )


Spawner = Callable[[ServiceConfig, WorkerRef], subprocess.Popen]


class Supervisor:
    """Starts, watches, restarts and stops worker processes; its state is in the DB and the
    lock files, so a fresh supervisor (after a service restart) picks up where one left off."""

    def __init__(self, config: ServiceConfig, store: Store,
                 spawn: Spawner = spawn_worker) -> None:
        self.config = config
        self.store = store
        self._spawn = spawn  # replaceable: in-process tests start stand-in processes
        # held while a worker is started and while the monitor checks: a route that commits a
        # job's active state and launches its worker (`starting`) is never seen half-way
        self._lock = threading.RLock()
        self.children: dict[str, tuple[subprocess.Popen, float]] = {}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # ---- one worker ------------------------------------------------------------------------
    @contextmanager
    def starting(self) -> Iterator[None]:
        """Hold while committing a job's active state and launching its worker: the monitor
        (`check`) waits, so it never finds the job active without its worker and starts a
        second one."""
        with self._lock:
            yield

    def launch(self, ref: WorkerRef) -> int:
        """Start the worker and record its pid on its DB row."""
        with self._lock:
            process = self._spawn(self.config, ref)
            self.children[ref.key] = (process, time.monotonic())
        log.info("%s: %s started (pid %d)", ref.label, ref.noun, process.pid)
        with self.store.session() as session:
            row = session.get(ref.model, ref.row_id)
            if row is not None:
                row.worker_pid = process.pid
        return process.pid

    def running(self, ref: WorkerRef) -> bool:
        """Own child still running, or any process (e.g. from a previous run) holds the lock."""
        child = self.children.get(ref.key)
        if child is not None and child[0].poll() is None:
            return True
        return worker_alive(ref.directory(self.config), ref.lock_name)

    def stop(self, ref: WorkerRef, fallback_pid: int | None = None,
             grace_s: float = 10.0) -> None:
        """SIGTERM, and SIGKILL after `grace_s` (at once with 0), only while it provably runs.

        The pid comes from the worker's own pid file (written under its lock), else
        `fallback_pid` (the pid recorded when it was started).
        """
        if not self.running(ref):
            return
        pid = _read_pid(ref.directory(self.config) / WORKER_PID) or fallback_pid
        if not pid:
            return
        if grace_s > 0:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self.running(ref):
                time.sleep(0.1)
        if grace_s <= 0 or self.running(ref):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child = self.children.pop(ref.key, None)
        if child is not None:
            try:
                child[0].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    # ---- all workers -----------------------------------------------------------------------
    def check(self) -> None:
        """Reap finished children; restart workers of active jobs, query sets and consortium
        trainings that died (under the lock `starting` holds)."""
        with self._lock:
            for key, (process, _started) in list(self.children.items()):
                if process.poll() is not None:  # reap, so no zombies accumulate
                    self.children.pop(key, None)
            for kind in ("scoring", "training", "consortium"):
                for ref in self._active(kind):
                    if not self.running(ref):
                        self._revive(ref)

    def _active(self, kind: str) -> list[WorkerRef]:
        """Everything of `kind` that should have a live worker now, according to the DB."""
        with self.store.session() as session:
            if kind == "consortium":
                ids = session.scalars(select(ConsortiumJob.consortium_id).where(
                    ConsortiumJob.state.in_(C_ACTIVE_STATES))).all()
                return [WorkerRef(cid, consortium=True) for cid in ids]
            if kind == "scoring":
                rows = session.execute(select(QuerySet.job_id, QuerySet.id).where(
                    QuerySet.state.in_(Q_ACTIVE_STATES))).all()
                return [WorkerRef(job_id, query_id) for job_id, query_id in rows]
            ids = session.scalars(select(Job.id).where(Job.state.in_(ACTIVE_STATES))).all()
            return [WorkerRef(job_id) for job_id in ids]

    def _revive(self, ref: WorkerRef) -> None:
        """A dead worker: restart it (it resumes from its checkpoint) or give up on it."""
        with self.store.session() as session:
            row = session.get(ref.model, ref.row_id)
            if row is None or row.state not in ref.active_states:
                return  # the worker finished (or failed and said so) just now
            if row.restarts >= self.config.max_worker_restarts:
                row.state = ref.failed_state
                row.error = f"{ref.noun} died {row.restarts + 1} times; giving up"
                row.finished_at = utcnow()
                log.error("%s: %s died again; failed", ref.label, ref.noun)
                restart = False
            else:
                row.restarts += 1
                resume = "" if ref.scoring else " from the last checkpoint"  # and journal
                log.warning("%s: %s gone in state %s; restarting%s (restart %d)", ref.label,
                            ref.noun, row.state, resume, row.restarts)
                restart = True
            row.updated_at = utcnow()
        if restart:
            self.launch(ref)

    # ---- the monitor thread ----------------------------------------------------------------
    def start(self) -> None:
        """Crash recovery now, then a check every `monitor_interval_s`."""
        self.check()
        self._stop.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, name="worker-monitor",
                                         daemon=True)
        self._monitor.start()

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.monitor_interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - supervision must survive a transient DB error
                log.exception("worker check failed")

    def shutdown(self) -> None:
        """Stop watching. Workers are left running on purpose: they survive an API restart."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
