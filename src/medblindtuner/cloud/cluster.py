"""Step kernels on a Ray cluster: a step's chunks computed in parallel, one actor per node.

`RayShards` is the `cloud.trainer.Shards` of a cluster. Chunk j of every step (its
position in the step) belongs to shard j mod S, so the chunks of one step run on S actors at
once; each actor is a `ShardWorker` holding only its own chunks and the step kernel's keys
(`he.keys.ShardKeys`: context, public, relinearisation and the kernel's rotation keys; never
a bootstrapping key, never a secret key). The driver (the trainer's process) adds the actors'
partial results, bootstraps and updates the model, exactly as with the local kernel.

What crosses the wire is bytes: the shard keys and each chunk once (`ray.put` by the driver,
so nodes need no shared disk), then per step the look-ahead model (softmax: the model pair and
the look-ahead's coefficients, then the refreshed inverses) out and one partial ciphertext back
per actor. A lost actor (killed, its node gone) is replaced by a new one built from the same
objects, and its part of the step is computed again (a softmax backward first repeats that
shard's forward, whose exponentials died with it); the driver's checkpoints and resume are
unchanged.

Ray is imported on first use: the product runs without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openfhe as ofhe

from medblindtuner.cloud.kernel import PlacedChunk, StepKernel
from medblindtuner.he.ciphertexts import ciphertext_from_bytes, ciphertext_to_bytes
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import BundleError, ShardKeys
from medblindtuner.training.artifacts import EncryptedChunk, EncryptedDataset
from medblindtuner.training.plan import TrainingPlan

log = logging.getLogger("medblindtuner.cluster")

LOCAL = "local"  # the `--ray-address` value that keeps the kernel in the trainer's process
# the service's workers read the cluster address from here (`medblindtuner serve` passes its
# environment on to them)
RAY_ADDRESS_ENV = "MEDBLINDTUNER_RAY_ADDRESS"
# how often one shard's part of a step is retried on a new actor before the step fails
MAX_REPLACEMENTS = 3


def chunk_owners(plan: TrainingPlan, n_shards: int) -> dict[int, int]:
    """Training chunk index -> shard: chunk j of each step on shard j mod S."""
    return {index: position % n_shards
            for batch in range(len(plan.train_batch_sizes))
            for position, index in enumerate(plan.batch_chunks(batch))}


@dataclass(frozen=True)
class ChunkBlobs:
    """One training chunk as bytes (`EncryptedChunk.files()` kinds), for the object store."""

    n_samples: int
    files: dict[str, bytes]

    @classmethod
    def of(cls, chunk: EncryptedChunk) -> ChunkBlobs:
        return cls(chunk.n_samples, {kind: ciphertext_to_bytes(ct)
                                     for kind, ct in chunk.files().items()})

    def chunk(self, adopt: Callable[[ofhe.Ciphertext], ofhe.Ciphertext]) -> EncryptedChunk:
        cts = {kind: adopt(ciphertext_from_bytes(blob)) for kind, blob in self.files.items()}
        labels = [cts[f"y{j}"] for j in range(len(cts) - 2)]
        return EncryptedChunk(self.n_samples, cts["x_dup"], cts["x_grad"], labels)


# (the partial ciphertexts by softmax denominator group, a binary head's under 0; the op
# counts and seconds it took) as an actor returns them
PartialResult = tuple[dict[int, bytes], dict[str, int], dict[str, float]]


class ShardWorker:
    """A Ray actor's state: its chunks and a `StepKernel` with the shard keys only.

    Softmax exponentials stay here between `softmax_forward` and `softmax_backward` (in the
    kernel), so only one ciphertext per phase travels back."""

    def __init__(self, keys: ShardKeys, plan: dict, chunks: dict[int, Any]) -> None:
        """`chunks`: training chunk index -> object ref of its `ChunkBlobs` (this shard's)."""
        import ray

        crypto = keys.load()
        self.evaluator = Evaluator(crypto.context, crypto.params, crypto.public_key)
        # one chunk's bytes at a time: fetching all first held every chunk twice at the peak
        held = {index: ray.get(ref).chunk(self.evaluator.adopt) for index, ref in chunks.items()}
        self.kernel = StepKernel(self.evaluator, TrainingPlan.from_dict(plan), held)

    def _result(self, cts: dict[int, ofhe.Ciphertext]) -> PartialResult:
        ops = self.evaluator.ops
        counts, seconds = dict(ops.counts), dict(ops.seconds)
        ops.counts.clear()
        ops.seconds.clear()
        return {group: ciphertext_to_bytes(ct) for group, ct in cts.items()}, counts, seconds

    def _read(self, blob: bytes) -> ofhe.Ciphertext:
        return self.evaluator.adopt(ciphertext_from_bytes(blob))

    def binary_terms(self, lookahead: bytes, placed: list[PlacedChunk],
                     scale: float) -> PartialResult:
        return self._result({0: self.kernel.binary_terms(self._read(lookahead), placed, scale)})

    def binary_forward(self, lookahead: bytes, placed: list[PlacedChunk]) -> PartialResult:
        return self._result({0: self.kernel.binary_forward(self._read(lookahead), placed)})

    def binary_backward(self, probabilities: bytes, placed: list[PlacedChunk],
                        scale: float) -> PartialResult:
        return self._result({0: self.kernel.binary_backward(self._read(probabilities), placed,
                                                            scale)})

    def softmax_forward(self, model: list[bytes], weights: list[float],
                        placed: list[PlacedChunk]) -> PartialResult:
        return self._result(self.kernel.softmax_forward(
            [self._read(blob) for blob in model], weights, placed))

    def softmax_backward(self, inverses: dict[int, bytes], scale: float) -> PartialResult:
        return self._result({0: self.kernel.softmax_backward(
            {group: self._read(blob) for group, blob in inverses.items()}, scale)})

    def softmax_gather(self, model: list[bytes], weights: list[float],
                       placed: list[PlacedChunk]) -> PartialResult:
        return self._result(self.kernel.softmax_gather(
            [self._read(blob) for blob in model], weights, placed))

    def softmax_scatter(self, deltas: dict[int, bytes], placed: list[PlacedChunk],
                        scale: float) -> PartialResult:
        return self._result({0: self.kernel.softmax_scatter(
            {group: self._read(blob) for group, blob in deltas.items()}, placed, scale)})

    def held_chunks(self) -> list[int]:
        return sorted(self.kernel.chunks)

    def automorphism_indices(self) -> list[int]:
        """The automorphism indices of every key this process holds (the tests' audit)."""
        context = self.evaluator.context
        return sorted(index for tag in ofhe.CryptoContext.GetAllEvalAutomorphismKeys()
                      for index in context.GetExistingEvalAutomorphismKeyIndices(tag))


def _lost_actor_errors() -> tuple[type[BaseException], ...]:
    """The errors after which a shard is moved to a new actor (the actor or its node died)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (RayActorError, ActorDiedError, ActorUnavailableError)


class RayShards:
    """`Shards` on a Ray cluster (`start` connects, places the actors and ships their data)."""

    def __init__(self, evaluator: Evaluator, plan: TrainingPlan, keys_ref: Any,
                 chunk_refs: dict[int, Any], n_shards: int, cpus_per_actor: float,
                 owns_connection: bool) -> None:
        self.ev = evaluator
        self.plan = plan
        self.owners = chunk_owners(plan, n_shards)
        self._keys_ref = keys_ref
        self._chunk_refs = chunk_refs
        self._cpus = cpus_per_actor
        self._owns_connection = owns_connection
        self.actors: list[Any] = [self._new_actor(shard) for shard in range(n_shards)]
        self.replacements = 0
        # softmax: the last forward's look-ahead and placed chunks per shard (for a recovery)
        self._forward: tuple[Any, list[float], dict[int, list[PlacedChunk]]] | None = None

    @classmethod
    def start(cls, address: str, dataset: EncryptedDataset, bundle_dir: Path,
              evaluator: Evaluator, n_actors: int | None = None, cpus_per_actor: float = 1,
              allow_insecure: bool = False) -> RayShards:
        """Connect to the cluster at `address` (`auto`, `host:port`, `ray://host:port`; an
        already connected process keeps its connection), start `n_actors` shard actors
        (default: one per alive node, at most the chunks of the largest step) and wait until
        each has loaded its keys and chunks."""
        import ray

        owns = not ray.is_initialized()
        if owns:
            ray.init(address=address)
        try:
            plan = dataset.plan
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            n_shards = max(1, min(n_actors or nodes, plan.chunks_per_step))
            keys = ShardKeys.read(bundle_dir, allow_insecure=allow_insecure)
            needed = {i for i in plan.kernel_rotation_indices if i % plan.slots}
            if missing := sorted(needed - set(keys.rotation_indices)):
                raise BundleError(f"{bundle_dir}: the shard keys lack the step kernel's "
                                  f"rotations {missing}; generate the bundle for this plan")
            keys_ref = ray.put(keys)
            chunk_refs = {index: ray.put(ChunkBlobs.of(chunk))
                          for index, chunk in enumerate(dataset.train)}
            shards = cls(evaluator, plan, keys_ref, chunk_refs, n_shards, cpus_per_actor, owns)
            ray.get([actor.held_chunks.remote() for actor in shards.actors])
        except BaseException:
            if owns:
                ray.shutdown()
            raise
        log.info("%d shard actors on %d nodes hold %d training chunks", n_shards, nodes,
                 len(chunk_refs))
        return shards

    def close(self) -> None:
        """Stop the actors (and the connection, if `start` made it)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self._keys_ref, self._chunk_refs = None, {}  # their objects leave the store
        if self._owns_connection:
            ray.shutdown()

    def __enter__(self) -> RayShards:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- actors ---------------------------------------------------------------------------
    def _new_actor(self, shard: int):
        import ray

        mine = {index: ref for index, ref in self._chunk_refs.items()
                if self.owners[index] == shard}
        worker = ray.remote(ShardWorker).options(
            num_cpus=self._cpus, scheduling_strategy="SPREAD", max_restarts=0)
        return worker.remote(self._keys_ref, self.plan.to_dict(), mine)

    def _replace(self, shard: int, error: BaseException) -> None:
        import ray

        self.replacements += 1
        log.warning("shard %d lost its actor (%s): starting a new one", shard,
                    type(error).__name__)
        ray.kill(self.actors[shard])
        self.actors[shard] = self._new_actor(shard)

    def _by_shard(self, placed: Sequence[PlacedChunk]) -> dict[int, list[PlacedChunk]]:
        split: dict[int, list[PlacedChunk]] = {}
        for position, index in placed:
            split.setdefault(self.owners[index], []).append((position, index))
        return split

    def _run(self, method: str, args_of: dict[int, tuple]) -> dict[int, ofhe.Ciphertext]:
        """`method` on each shard of `args_of` in parallel; the driver adds the partials group
        by group. A shard whose actor is lost is redone on a new actor (up to
        MAX_REPLACEMENTS)."""
        import ray

        lost = _lost_actor_errors()
        pending = {shard: getattr(self.actors[shard], method).remote(*args)
                   for shard, args in args_of.items()}
        partials: dict[int, list[ofhe.Ciphertext]] = {}
        for shard, ref in pending.items():
            for attempt in range(MAX_REPLACEMENTS + 1):
                try:
                    blobs, counts, seconds = ray.get(ref)
                    break
                except lost as exc:
                    if attempt == MAX_REPLACEMENTS:
                        raise
                    self._replace(shard, exc)
                    ref = self._resubmit(shard, method, args_of[shard])
            self.ev.ops.counts.update(counts)
            self.ev.ops.seconds.update(seconds)
            for group, blob in blobs.items():
                partials.setdefault(group, []).append(self.ev.adopt(ciphertext_from_bytes(blob)))
        return {group: self.ev.add_many(cts) for group, cts in sorted(partials.items())}

    def _resubmit(self, shard: int, method: str, args: tuple):
        """The call again on the shard's new actor; a softmax backward first repeats the
        shard's forward (its exponentials were lost with the old actor)."""
        actor = self.actors[shard]
        if method == "softmax_backward":
            model, weights, placed = self._forward
            actor.softmax_forward.remote(model, weights, placed[shard])
        return getattr(actor, method).remote(*args)

    # ---- Shards ---------------------------------------------------------------------------
    def binary_terms(self, lookahead: ofhe.Ciphertext, placed: Sequence[PlacedChunk],
                     scale: float) -> ofhe.Ciphertext:
        import ray

        model = ray.put(ciphertext_to_bytes(lookahead))
        return self._run("binary_terms", {shard: (model, mine, scale)
                                          for shard, mine in self._by_shard(placed).items()})[0]

    def binary_forward(self, lookahead: ofhe.Ciphertext,
                       placed: Sequence[PlacedChunk]) -> ofhe.Ciphertext:
        import ray

        model = ray.put(ciphertext_to_bytes(lookahead))
        return self._run("binary_forward", {shard: (model, mine)
                                            for shard, mine in self._by_shard(placed).items()})[0]

    def binary_backward(self, probabilities: ofhe.Ciphertext, placed: Sequence[PlacedChunk],
                        scale: float) -> ofhe.Ciphertext:
        import ray

        blob = ray.put(ciphertext_to_bytes(probabilities))
        return self._run("binary_backward", {shard: (blob, mine, scale)
                                             for shard, mine in self._by_shard(placed).items()})[0]

    def softmax_gather(self, model: Sequence[ofhe.Ciphertext], weights: Sequence[float],
                       placed: Sequence[PlacedChunk]) -> dict[int, ofhe.Ciphertext]:
        import ray

        blobs = ray.put([ciphertext_to_bytes(ct) for ct in model])
        weights = [float(w) for w in weights]
        return self._run("softmax_gather", {shard: (blobs, weights, mine)
                                            for shard, mine in self._by_shard(placed).items()})

    def softmax_scatter(self, deltas: dict[int, ofhe.Ciphertext],
                        placed: Sequence[PlacedChunk], scale: float) -> ofhe.Ciphertext:
        import ray

        blob = ray.put({group: ciphertext_to_bytes(ct) for group, ct in deltas.items()})
        return self._run("softmax_scatter", {shard: (blob, mine, scale)
                                             for shard, mine in self._by_shard(placed).items()})[0]

    def softmax_forward(self, model: Sequence[ofhe.Ciphertext], weights: Sequence[float],
                        placed: Sequence[PlacedChunk]) -> dict[int, ofhe.Ciphertext]:
        import ray

        blobs = ray.put([ciphertext_to_bytes(ct) for ct in model])
        weights = [float(w) for w in weights]
        split = self._by_shard(placed)
        self._forward = (blobs, weights, split)
        return self._run("softmax_forward", {shard: (blobs, weights, mine)
                                             for shard, mine in split.items()})

    def softmax_backward(self, inverses: dict[int, ofhe.Ciphertext],
                         scale: float) -> ofhe.Ciphertext:
        import ray

        if self._forward is None:
            raise RuntimeError("softmax_backward needs the chunks of a softmax_forward")
        refreshed = ray.put({group: ciphertext_to_bytes(inverse)
                             for group, inverse in inverses.items()})
        try:
            return self._run("softmax_backward", {shard: (refreshed, scale)
                                                  for shard in self._forward[2]})[0]
        finally:
            self._forward = None


def cluster_shards(address: str | None, dataset: EncryptedDataset, bundle_dir: Path,
                   evaluator: Evaluator, allow_insecure: bool = False,
                   **options: Any) -> RayShards | None:
    """The `shards` of a trainer for `address`: None for `local` (or no address), which keeps
    the kernel in the trainer's process; otherwise `RayShards` started on that cluster
    (`options`: `RayShards.start`'s actor count and CPUs per actor)."""
    if address is None or address.strip() in ("", LOCAL):
        return None
    return RayShards.start(address.strip(), dataset, bundle_dir, evaluator,
                           allow_insecure=allow_insecure, **options)
