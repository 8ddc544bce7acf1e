"""Training worker: one OS process per job, started by the web service.

Why a separate process: OpenFHE keeps keys in process-wide static maps, training pins CPU cores
for minutes to hours, and a crash (or OOM kill) in the C++ library must not take the API down.
The worker loads *only* the job's public bundle (`CloudCrypto`, after `verify_public_bundle`),
so it holds no secret key and cannot decrypt anything; the DB is its only channel to the web
process: it writes progress counters and polls for the hospital's early-stopping decisions.

An exclusive `flock` on `<job>/worker.lock` guarantees a single worker per job and lets the
web process detect a dead worker (lock free) even across service restarts. Training resumes
from the last epoch checkpoint (`EncryptedTrainer` does this itself).

Scoring (encrypted inference) of an uploaded query set runs in a worker of its own, for the
same reasons: `--score QUERY_ID` loads the bundle, the job's best-epoch encrypted weights
(`result/`) and the encrypted queries, and writes the encrypted scores atomically to
`<job>/queries/<query id>/scores/`. Its lock is `<job>/queries/<query id>/score.lock`.

Run: python -m medblindtuner.service.worker --job ID --data-dir DIR [--db-url URL]
     [--score QUERY_ID] [--insecure-test-params]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from medblindtuner.failpoints import failpoint
from medblindtuner.he.untrusted import PrewarmedChecker
from medblindtuner.protocol import (
    AWAITING_DECISION,
    BUNDLE,
    CANCELLED,
    CHECKPOINTS_DIR,
    DATASET,
    FAILED,
    FINISHED,
    Q_ACTIVE_STATES,
    Q_DONE,
    Q_FAILED,
    Q_QUEUED,
    Q_SCORING,
    QUERY_INPUT_DIR,
    QUEUED,
    REFRESH_JOURNAL_DIR,
    RESULT_DIR,
    RUNNING,
    SCORE_LOCK,
    SCORES_DIR,
    SCORES_TMP_DIR,
    TERMINAL_STATES,
    WORKER_PID,
    decision_path,
    decision_tmp_path,
)
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.locks import acquire_lock
from medblindtuner.service.refreshes import RefreshRelay
from medblindtuner.service.store import DecisionRow, Job, QuerySet, Store, utcnow

log = logging.getLogger("medblindtuner.worker")


def peak_rss_bytes() -> int:
    """This worker's peak resident memory (the cloud's cost of holding the public bundle)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class JobCancelled(Exception):
    """The hospital cancelled (or deleted) the job while this worker was running it."""


# ---- the worker itself ---------------------------------------------------------------------------
class JobRunner:
    """Runs one job's encrypted training against the DB-backed decision channel."""

    def __init__(self, config: ServiceConfig, store: Store, job_id: str) -> None:
        self.config = config
        self.store = store
        self.job_id = job_id
        self.dir = config.job_dir(job_id)
        self._last_step_time: float | None = None
        self.answer_parser: PrewarmedChecker | None = None  # refresh mode "hospital"

    def _update(self, **fields) -> Job:
        with self.store.session() as session:
            job = session.get(Job, self.job_id)
            if job is None:
                raise JobCancelled("job was deleted")
            if job.state == CANCELLED:
                raise JobCancelled("job was cancelled")
            for key, value in fields.items():
                setattr(job, key, value)
            job.updated_at = utcnow()
            return job

    def _on_step(self, info: dict) -> None:
        seconds = float(info["step_seconds"])
        with self.store.session() as session:
            job = session.get(Job, self.job_id)
            if job is None or job.state == CANCELLED:
                raise JobCancelled("job was cancelled")
            average = job.seconds_per_step
            job.seconds_per_step = seconds if not average else 0.7 * average + 0.3 * seconds
            job.epoch = int(info["epoch"])
            job.epochs_done = int(info["epoch"]) - 1
            job.step_in_epoch = int(info["step_in_epoch"])
            job.steps_per_epoch = int(info["steps_per_epoch"])
            job.steps = int(info["steps"])
            job.bootstraps = int(info["bootstraps"])
            job.updated_at = utcnow()
        log.info("job %s epoch %d step %d/%d (%.1f s)", self.job_id, info["epoch"],
                 info["step_in_epoch"], info["steps_per_epoch"], seconds)

    def _decide(self, epoch: int, loss_ct):
        """Publish the encrypted loss and block until the hospital answers (or cancels)."""
        from medblindtuner.he.ciphertexts import save_ciphertext
        from medblindtuner.training.plan import Decision

        with self.store.session() as session:
            known = session.get(DecisionRow, (self.job_id, epoch)) is not None
        if not known:  # a resumed worker does not republish a question already answered
            final = decision_path(self.dir, epoch)
            tmp = decision_tmp_path(self.dir, epoch)
            final.parent.mkdir(exist_ok=True)
            info = save_ciphertext(tmp, loss_ct)
            os.replace(tmp, final)
            failpoint("decision.published")
            with self.store.session() as session:
                job = session.get(Job, self.job_id)
                if job is None or job.state == CANCELLED:
                    raise JobCancelled("job was cancelled")
                job.epochs_done = epoch - 1
                job.loss_sha256 = info["sha256"]
                job.updated_at = utcnow()
                job.state = AWAITING_DECISION
                job.awaiting_epoch = epoch
            log.info("job %s epoch %d: encrypted validation loss published (%d bytes, sha256 "
                     "%s)", self.job_id, epoch, info["bytes"], info["sha256"][:16])
        while True:
            with self.store.session() as session:
                job = session.get(Job, self.job_id)
                if job is None or job.state == CANCELLED:
                    raise JobCancelled("job was cancelled while awaiting a decision")
                row = session.get(DecisionRow, (self.job_id, epoch))
                if row is not None:
                    job.state = RUNNING
                    job.awaiting_epoch = None
                    job.best_epoch = row.best_epoch
                    job.epochs_done = epoch
                    job.updated_at = utcnow()
                    decision = Decision(bool(row.continue_training), int(row.best_epoch))
                    break
            time.sleep(self.config.worker_poll_s)
        log.info("job %s epoch %d: decision continue=%s best_epoch=%d", self.job_id, epoch,
                 decision.continue_training, decision.best_epoch)
        return decision

    def _refresh(self, request: bytes) -> bytes:
        """Refresh mode "hospital": relay one request to the hospital and block until its
        answer (or a cancel); the answer is parsed in the limited child before it is used."""
        from medblindtuner.he.refresh import RefreshError, RefreshRequest

        index = RefreshRequest.from_bytes(request).index
        relay = RefreshRelay(self.config, self.store)
        relay.publish(self.job_id, index, request)
        failpoint("refresh.published")
        asked = looked = time.monotonic()
        while (answer := relay.answer(self.job_id, index)) is None:
            if time.monotonic() - looked > self.config.worker_poll_s:  # cancelled meanwhile?
                self._update()
                looked = time.monotonic()
            time.sleep(self.config.refresh_poll_s)
        waited = time.monotonic() - asked
        verdict = self.answer_parser.check(answer, f"the hospital's answer to refresh {index}")
        if not verdict.ok:
            raise RefreshError(str(verdict.error))
        log.info("job %s: refresh %d answered after %.3f s (answer parsed in %.3f s)",
                 self.job_id, index, waited, time.monotonic() - asked - waited)
        failpoint("refresh.received")
        return answer

    def _refresher(self, cloud, plan):  # noqa: ANN001, ANN202 - Cloud, TrainingPlan
        """The evaluator's refresher in refresh mode "hospital" (None when it bootstraps):
        journaled beside the checkpoints, asking through the relay."""
        from medblindtuner.he.refresh import CloudRefresher

        if not cloud.params.refreshed_by_hospital:
            return None
        self.answer_parser = PrewarmedChecker("refresh_answer", cloud.params.ring_dim)
        return CloudRefresher(cloud.crypto.context, cloud.params, cloud.crypto.public_key,
                              self._refresh, plan.job_tag(cloud.params),
                              self.dir / REFRESH_JOURNAL_DIR)

    def run(self) -> None:
        from medblindtuner.cloud.cloud import Cloud
        from medblindtuner.cloud.cluster import RAY_ADDRESS_ENV

        with self.store.session() as session:
            job = session.get(Job, self.job_id)
            if job is None or job.state in TERMINAL_STATES:
                log.info("job %s is %s: nothing to do", self.job_id,
                         job.state if job else "gone")
                return
            if job.state == QUEUED:
                job.state = RUNNING
            job.worker_pid = os.getpid()
            job.started_at = job.started_at or utcnow()
            job.updated_at = utcnow()
        cloud = Cloud(self.dir / BUNDLE, allow_insecure=self.config.allow_insecure)
        dataset = cloud.load_dataset(self.dir / DATASET)
        # $MEDBLINDTUNER_RAY_ADDRESS: the chunks' kernels on that Ray cluster (its actors end
        # with this process, their driver)
        shards = cloud.start_shards(dataset, os.environ.get(RAY_ADDRESS_ENV))
        trainer = cloud.trainer(dataset, self.dir / CHECKPOINTS_DIR, shards=shards)
        cloud.evaluator.refresher = self._refresher(cloud, trainer.plan)
        self._update(steps_per_epoch=len(trainer.plan.train_batch_sizes),
                     max_epochs=trainer.plan.config.epochs)
        log.info("job %s: loaded bundle %s and %d train / %d val chunks; resuming: %s",
                 self.job_id, cloud.params.fingerprint(), len(trainer.data.train),
                 len(trainer.data.val), (self.dir / CHECKPOINTS_DIR / "state.json").exists())
        state = cloud.train(trainer, decide=self._decide, on_step=self._on_step)
        manifest = cloud.write_result(trainer, state, self.dir / RESULT_DIR,
                                      {"job_id": self.job_id, "peak_rss_bytes": peak_rss_bytes()})
        failpoint("result.written")
        self._update(state=FINISHED, result_ready=True, finished_at=utcnow(),
                     epochs_done=state.epoch, best_epoch=state.best_epoch, steps=state.steps,
                     bootstraps=int(manifest["ops"].get("bootstraps", 0)),
                     awaiting_epoch=None, error=None)
        log.info("job %s finished: %d epochs, best epoch %d", self.job_id, state.epoch,
                 state.best_epoch)


class ScoreRunner:
    """Scores one uploaded query set with the job's best-epoch encrypted weights."""

    def __init__(self, config: ServiceConfig, store: Store, job_id: str, query_id: str) -> None:
        self.config = config
        self.store = store
        self.job_id = job_id
        self.query_id = query_id
        self.dir = config.query_dir(job_id, query_id)

    def _set(self, **fields) -> None:
        with self.store.session() as session:
            query = session.get(QuerySet, self.query_id)
            if query is None or query.job_id != self.job_id:
                raise JobCancelled("query set was deleted")
            for key, value in fields.items():
                setattr(query, key, value)
            query.updated_at = utcnow()

    def run(self) -> None:
        from medblindtuner.cloud.cloud import Cloud
        from medblindtuner.he.ciphertexts import replace_dir
        from medblindtuner.training.artifacts import read_dataset_manifest
        from medblindtuner.training.plan import TrainingPlan

        with self.store.session() as session:
            query = session.get(QuerySet, self.query_id)
            job = session.get(Job, self.job_id)
            if query is None or job is None or query.job_id != self.job_id:
                log.info("query set %s of job %s is gone: nothing to do", self.query_id,
                         self.job_id)
                return
            if query.state not in Q_ACTIVE_STATES:
                log.info("query set %s is %s: nothing to do", self.query_id, query.state)
                return
            if job.state != FINISHED or not job.result_ready:
                raise RuntimeError(f"job is {job.state}: no trained weights to score with")
            query.state = Q_SCORING
            query.worker_pid = os.getpid()
            query.started_at = query.started_at or utcnow()
            query.updated_at = utcnow()
        started = time.monotonic()
        job_root = self.config.job_dir(self.job_id)
        cloud = Cloud(job_root / BUNDLE, allow_insecure=self.config.allow_insecure)
        plan = TrainingPlan.from_dict(
            read_dataset_manifest(job_root / DATASET, cloud.params)["plan"])
        tmp = self.dir / SCORES_TMP_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        cloud.score(plan, job_root / RESULT_DIR, self.dir / QUERY_INPUT_DIR, tmp,
                    log=lambda line: log.info("job %s query set %s: %s", self.job_id,
                                              self.query_id, line))
        replace_dir(tmp, self.dir / SCORES_DIR)
        seconds = time.monotonic() - started
        self._set(state=Q_DONE, finished_at=utcnow(), seconds=round(seconds, 3), error=None)
        log.info("job %s query set %s: scores written (%.1f s)", self.job_id, self.query_id,
                 seconds)


def _score_main(config: ServiceConfig, store: Store, job_id: str, query_id: str) -> int:
    """Worker entry for `--score`: one process per query set, guarded by its own lock."""
    directory = config.query_dir(job_id, query_id)
    if not directory.is_dir():
        log.error("query set %s of job %s has no directory", query_id, job_id)
        return 2
    lock = acquire_lock(directory, lock_name=SCORE_LOCK)
    if lock is None:
        log.info("query set %s: another worker holds the lock; exiting", query_id)
        return 0
    (directory / WORKER_PID).write_text(str(os.getpid()))
    try:
        ScoreRunner(config, store, job_id, query_id).run()
    except JobCancelled as exc:
        log.info("query set %s: %s; worker exits", query_id, exc)
    except Exception as exc:  # noqa: BLE001 - any failure must be reported, not lost
        log.exception("scoring query set %s of job %s failed", query_id, job_id)
        try:
            with store.session() as session:
                query = session.get(QuerySet, query_id)
                if query is not None and query.state in (Q_QUEUED, Q_SCORING):
                    query.state = Q_FAILED
                    query.error = f"{type(exc).__name__}: {exc}"[:2000]
                    query.finished_at = utcnow()
                    query.updated_at = utcnow()
        except Exception:  # noqa: BLE001
            log.exception("could not record the failure of query set %s", query_id)
        return 1
    finally:
        store.dispose()
        lock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--db-url", default=None)
    parser.add_argument("--score", default=None, metavar="QUERY_ID",
                        help="Score this uploaded query set instead of training.")
    parser.add_argument("--insecure-test-params", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(message)s")
    config = ServiceConfig(data_dir=args.data_dir, db_url=args.db_url,
                           allow_insecure=args.insecure_test_params)
    store = Store(config.resolved_db_url)
    if args.score is not None:
        return _score_main(config, store, args.job, args.score)
    directory = config.job_dir(args.job)
    if not directory.is_dir():
        log.error("job %s has no directory under %s", args.job, config.jobs_dir)
        return 2
    lock = acquire_lock(directory)
    if lock is None:
        log.info("job %s: another worker holds the lock; exiting", args.job)
        return 0
    (directory / WORKER_PID).write_text(str(os.getpid()))
    runner = JobRunner(config, store, args.job)
    try:
        runner.run()
    except JobCancelled as exc:
        log.info("job %s: %s; worker exits", args.job, exc)
    except Exception as exc:  # noqa: BLE001 - any failure must be reported, not lost
        log.exception("job %s failed", args.job)
        message = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            with store.session() as session:
                job = session.get(Job, args.job)
                if job is not None and job.state not in TERMINAL_STATES:
                    job.state = FAILED
                    job.error = message
                    job.finished_at = utcnow()
                    job.updated_at = utcnow()
        except Exception:  # noqa: BLE001
            log.exception("could not record the failure of job %s", args.job)
        return 1
    finally:
        store.dispose()
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
