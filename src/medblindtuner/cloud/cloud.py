"""The cloud's side of a job as one object (this project's `FHEModelServer`).

`Cloud` opens a public bundle (never a secret key) and is the one place that builds the
evaluator and the trainer: it trains on an encrypted dataset (here or on Ray shards) with the
hospital's decision callback, checkpoints, writes the `EncryptedResult` and scores encrypted
query sets. The service's worker, the Python API's in-process cloud, the experiment pipeline
and the benchmarks call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openfhe as ofhe

from medblindtuner.cloud.cluster import LOCAL, cluster_shards
from medblindtuner.cloud.inference import score_queries
from medblindtuner.cloud.trainer import EncryptedState, EncryptedTrainer, Shards
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import CloudCrypto, verify_public_bundle
from medblindtuner.he.params import CkksParams
from medblindtuner.training.artifacts import (
    EncryptedDataset,
    EncryptedQueries,
    EncryptedResult,
    save_scores,
)
from medblindtuner.training.plan import Decision, TrainingPlan

DecisionCallback = Callable[[int, ofhe.Ciphertext], Decision]


@dataclass(frozen=True)
class TrainingRun:
    """What one call of `Cloud.run_training` did: the trainer's final state, the result
    manifest as written, and the seconds spent in training proper."""

    state: EncryptedState
    result: dict[str, Any]
    train_seconds: float


@dataclass(frozen=True)
class ScoringRun:
    """One scored query set: ciphertexts and rows read, the weights' best epoch, seconds."""

    ciphertexts: int
    rows: int
    best_epoch: int
    seconds: float


class Cloud:
    """The untrusted compute of one job: a public bundle, its evaluator, trainers on it."""

    def __init__(self, bundle_dir: str | Path, *, allow_insecure: bool = False,
                 verify: bool = True, evaluator_options: dict[str, Any] | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.allow_insecure = allow_insecure
        if verify:
            verify_public_bundle(self.bundle_dir, allow_insecure=allow_insecure)
        self.crypto = CloudCrypto.load(self.bundle_dir, allow_insecure=allow_insecure)
        self.evaluator = self.build_evaluator(**(evaluator_options or {}))

    @classmethod
    def sharing_context(cls, context: ofhe.CryptoContext, params: CkksParams,
                        public_key: ofhe.PublicKey, *,
                        evaluator_options: dict[str, Any] | None = None) -> Cloud:
        """A cloud over a context already loaded in this process, for single-process runs
        that hold every role (the consortium's in-process run, benchmarks): loading a bundle
        would reset OpenFHE's shared state under the hospitals' keys. No bundle, no Ray."""
        cloud = cls.__new__(cls)
        cloud.bundle_dir = None
        cloud.allow_insecure = not params.is_secure
        cloud.crypto = CloudCrypto(params, context, public_key, (), {})
        cloud.evaluator = cloud.build_evaluator(**(evaluator_options or {}))
        return cloud

    @property
    def params(self) -> CkksParams:
        return self.crypto.params

    def build_evaluator(self, **options: Any) -> Evaluator:
        """The evaluator every step and score runs on, built here only (`options` go to
        `Evaluator`, so a different way to refresh ciphertexts plugs in at this one place)."""
        return Evaluator(self.crypto.context, self.crypto.params, self.crypto.public_key,
                         **options)

    # ---- training -------------------------------------------------------------------------
    def load_dataset(self, dataset_dir: str | Path) -> EncryptedDataset:
        """The hospital's encrypted dataset, its ciphertexts adopted into this context."""
        return EncryptedDataset.load(Path(dataset_dir), self.params, adopt=self.evaluator.adopt)

    def start_shards(self, dataset: EncryptedDataset, ray_address: str | None = LOCAL,
                     **options: Any) -> Shards | None:
        """Ray actors holding the dataset's training chunks (None: `local`, in this process);
        `options` go to `RayShards.start` (actors, CPUs per actor)."""
        return cluster_shards(ray_address, dataset, self.bundle_dir, self.evaluator,
                              allow_insecure=self.allow_insecure, **options)

    def trainer(self, dataset: EncryptedDataset, checkpoint_dir: str | Path,
                shards: Shards | None = None) -> EncryptedTrainer:
        """The trainer of `dataset` (resumes from the checkpoints in `checkpoint_dir`)."""
        return EncryptedTrainer(self.evaluator, dataset, Path(checkpoint_dir), shards=shards)

    @staticmethod
    def train(trainer: EncryptedTrainer, decide: DecisionCallback | None = None,
              on_step: Callable[[dict], None] | None = None) -> EncryptedState:
        """Train (or resume) to the end; the trainer's Ray actors, if any, stop afterwards."""
        try:
            return trainer.train(decide=decide, on_step=on_step)
        finally:
            close = getattr(trainer.shards, "close", None)
            if trainer.shards is not trainer.kernel and close is not None:
                close()

    def write_result(self, trainer: EncryptedTrainer, state: EncryptedState,
                     result_dir: str | Path, meta: dict[str, Any] | None = None) -> dict:
        """The best epoch's encrypted weights as the result artifact; returns its manifest."""
        result = EncryptedResult(trainer.weights_of_epoch(state.best_epoch), state.best_epoch,
                                 state.epoch, state.steps,
                                 {**(meta or {}), "ops": self.evaluator.ops.snapshot()})
        return result.save(Path(result_dir), self.params)

    def run_training(self, dataset_dir: str | Path, checkpoint_dir: str | Path,
                     result_dir: str | Path, *, decide: DecisionCallback | None = None,
                     on_step: Callable[[dict], None] | None = None,
                     ray_address: str | None = LOCAL, meta: dict[str, Any] | None = None,
                     log: Callable[[str], None] | None = None) -> TrainingRun:
        """Dataset -> trainer (on Ray shards unless `local`) -> training -> result."""
        dataset = self.load_dataset(dataset_dir)
        shards = self.start_shards(dataset, ray_address)
        if shards is not None and log is not None:
            log(f"step kernels on {len(shards.actors)} Ray actors ({ray_address})")
        trainer = self.trainer(dataset, checkpoint_dir, shards=shards)
        start = time.perf_counter()
        state = self.train(trainer, decide, on_step)
        seconds = time.perf_counter() - start
        return TrainingRun(state, self.write_result(trainer, state, result_dir, meta), seconds)

    # ---- encrypted inference --------------------------------------------------------------
    def score(self, plan: TrainingPlan, result_dir: str | Path, queries_dir: str | Path,
              scores_dir: str | Path, log: Callable[[str], None] | None = None) -> ScoringRun:
        """Score an uploaded query set with the result's best-epoch weights; the encrypted
        scores are written to `scores_dir` (which must not exist yet)."""
        start = time.monotonic()
        result = EncryptedResult.load(Path(result_dir), self.params, plan.rows)
        queries = EncryptedQueries.load(Path(queries_dir), self.params)
        if log is not None:
            log(f"scoring {len(queries.cts)} ciphertexts ({sum(queries.sizes)} rows) against "
                f"{len(result.weights)} weight rows (best epoch {result.best_epoch})")
        scores = score_queries(self.evaluator, plan, result.weights, queries)
        save_scores(Path(scores_dir), scores, queries.sizes, self.params)
        return ScoringRun(len(queries.cts), int(sum(queries.sizes)), int(result.best_epoch),
                          time.monotonic() - start)
