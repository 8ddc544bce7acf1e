"""Step kernels on a real local Ray cluster (head + 2 nodes, one CPU each; insecure test ring).

The Ray shards must give the local trainer's weights (both run the same arithmetic; only the
order of the partial sums and the noise of the bytes' round trip differ), survive a lost
actor, and hold no secret and no bootstrapping key.
"""

from __future__ import annotations

import numpy as np
import openfhe as ofhe
import pytest
from helpers_he import plan_and_keys, toy_problem

from medblindtuner.cloud.trainer import EncryptedTrainer
from medblindtuner.he.engine import Evaluator
from medblindtuner.hospital.crypto import decrypt_weights, encrypt_dataset
from medblindtuner.training.plain import TrainConfig

ray = pytest.importorskip("ray")
from medblindtuner.cloud.cluster import (  # noqa: E402
    LOCAL,
    RayShards,
    chunk_owners,
    cluster_shards,
)

WEIGHT_TOL = 1e-3
STORE_BYTES = 200 * 2**20  # object store per node: the shard keys and chunks are tens of MB


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    local = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": STORE_BYTES, "include_dashboard": False})
    for _ in range(2):
        local.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
    ray.init(address=local.address)
    local.wait_for_nodes()
    yield local
    ray.shutdown()
    local.shutdown()


def _job(n_classes: int, n_train: int, batch: int, seed: int, tmp_path_factory,
         denominator_chunks: int | None = None, base=None, dim: int = 7):
    """Keys, bundle and encrypted dataset of a toy job whose steps hold several chunks."""
    data = toy_problem(n_classes, n_train=n_train, n_val=30, seed=seed, dim=dim)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=batch,
                         patience=2)
    plan, keys = plan_and_keys(n_classes, config, data, denominator_chunks,
                               **({} if base is None else {"base": base}))
    bundle = tmp_path_factory.mktemp("bundle")
    keys.save_public_bundle(bundle)
    return data, plan, keys, encrypt_dataset(keys, plan, *data), bundle


# The binary tests come first, then the softmax ones: generating a job's keys releases OpenFHE's
# cached contexts, after which ciphertexts deserialised here would not bind to an earlier job's
# context (a real driver holds one context).
@pytest.fixture(scope="module")
def binary_job(tmp_path_factory):
    return _job(2, 300, 300, 6, tmp_path_factory)  # 3 chunks per step (128 + 128 + 44)


@pytest.fixture(scope="module")
def softmax_job(tmp_path_factory):
    # 3 classes, 3 chunks per step (128 + 128 + 44) whose denominators are refreshed in two
    # groups (chunks 0-1 and chunk 2): the actors' partials are added group by group
    return _job(3, 300, 300, 8, tmp_path_factory, denominator_chunks=2)


def _train(job, directory, shards=None, on_step=None) -> np.ndarray:
    """Fixed epochs (validation runs in the driver whoever computes the chunks)."""
    _, plan, keys, dataset, _ = job
    evaluator = Evaluator(keys.context, keys.params, keys.public_key)
    trainer = EncryptedTrainer(evaluator, dataset, directory, shards=shards)
    trainer.train(on_step=on_step)
    return decrypt_weights(keys, plan, trainer.weights)


@pytest.fixture(scope="module")
def binary_local(binary_job, tmp_path_factory) -> np.ndarray:
    return _train(binary_job, tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def softmax_local(softmax_job, tmp_path_factory) -> np.ndarray:
    return _train(softmax_job, tmp_path_factory.mktemp("local"))


def _start(job, n_actors: int = 2) -> RayShards:
    data, plan, keys, dataset, bundle = job
    evaluator = Evaluator(keys.context, keys.params, keys.public_key)
    return RayShards.start("auto", dataset, bundle, evaluator, n_actors=n_actors,
                           allow_insecure=True)


def test_binary_head_on_ray_shards_equals_local(cluster, binary_job, binary_local, tmp_path):
    plan = binary_job[1]
    assert plan.chunks_per_step == 3
    with _start(binary_job) as shards:
        held = ray.get([actor.held_chunks.remote() for actor in shards.actors])
        owners = chunk_owners(plan, 2)
        assert held == [[i for i, s in owners.items() if s == shard] for shard in (0, 1)]
        nodes = ray.get([actor.__ray_call__.remote(
            lambda worker: ray.get_runtime_context().get_node_id()) for actor in shards.actors])
        assert len(set(nodes)) == 2  # spread: one actor per node
        remote = _train(binary_job, tmp_path / "ray", shards=shards)
    assert np.max(np.abs(remote - binary_local)) < WEIGHT_TOL


def test_lost_actor_is_replaced_and_its_part_redone(cluster, binary_job, binary_local, tmp_path):
    """An actor killed after the first step: the next step's part of that shard runs on a
    new actor (it reloads its chunks and keys) and training ends with the same weights."""
    with _start(binary_job) as shards:
        def kill_after_first(info: dict) -> None:
            if info["steps"] == 1:
                ray.kill(shards.actors[1])

        remote = _train(binary_job, tmp_path / "ray", shards=shards, on_step=kill_after_first)
        assert shards.replacements == 1
    assert np.max(np.abs(remote - binary_local)) < WEIGHT_TOL


@pytest.mark.parametrize(("n_classes", "n_train", "dim"), [(2, 300, 7), (3, 192, 15)])
def test_compact_step_on_ray_shards_equals_local(cluster, tmp_path_factory, tmp_path,
                                                 n_classes, n_train, dim):
    """Refresh mode "hospital": the step's two phases (gathered logits, then the terms from
    the one sigmoid, or the one exponential and inverse) run on the actors; the driver's
    refreshes go to the key holder. Same weights as the local trainer."""
    from medblindtuner.he.params import HOSPITAL, params_for_mode
    from medblindtuner.he.refresh import CloudRefresher
    from medblindtuner.hospital.refresher import HospitalRefresher

    job = _job(n_classes, n_train, n_train, 6, tmp_path_factory,
               base=params_for_mode(HOSPITAL, insecure=True), dim=dim)
    _, plan, keys, dataset, bundle = job
    assert (plan.compact_sigmoid or plan.compact_softmax) and plan.chunks_per_step == 3
    weights = []
    for remote in (False, True):
        holder = HospitalRefresher(keys, plan)
        evaluator = Evaluator(keys.context, keys.params, keys.public_key, CloudRefresher(
            keys.context, keys.params, keys.public_key, holder, holder.job))
        shards = RayShards.start("auto", dataset, bundle, evaluator, n_actors=2,
                                 allow_insecure=True) if remote else None
        trainer = EncryptedTrainer(evaluator, dataset, tmp_path / str(remote), shards=shards)
        trainer.train()
        if shards is not None:
            shards.close()
        weights.append(decrypt_weights(keys, plan, trainer.weights))
        # one sigmoid (or exponential and inverse) a step, in the driver (no judge)
        assert evaluator.ops["polynomial_evaluations"] == trainer.state.steps * (
            1 if n_classes == 2 else 2)
    assert np.max(np.abs(weights[1] - weights[0])) < WEIGHT_TOL


def test_softmax_head_on_ray_shards_equals_local(cluster, softmax_job, softmax_local, tmp_path):
    """Through `cluster_shards`, as the CLI and the service's worker start them: by default
    one actor per node, at most the chunks of a step (3 here, on 3 nodes); the two
    denominator groups' partials come from different actors."""
    _, plan, keys, dataset, bundle = softmax_job
    assert plan.chunks_per_step == 3 and plan.softmax_layout.chunks == 2
    evaluator = Evaluator(keys.context, keys.params, keys.public_key)
    assert cluster_shards(LOCAL, dataset, bundle, evaluator) is None
    shards = cluster_shards(cluster.address, dataset, bundle, evaluator, allow_insecure=True)
    with shards:
        assert len(shards.actors) == 3
        remote = _train(softmax_job, tmp_path / "ray", shards=shards)
    assert np.max(np.abs(remote - softmax_local)) < WEIGHT_TOL


class _KillBeforeBackward:
    """The Ray shards, with one actor killed between a softmax step's two phases: its
    exponentials are lost, so the new actor repeats that shard's forward first."""

    def __init__(self, shards: RayShards) -> None:
        self.shards, self.killed = shards, False
        self.binary_terms = shards.binary_terms
        self.softmax_forward = shards.softmax_forward

    def softmax_backward(self, inverses, scale):
        if not self.killed:
            ray.kill(self.shards.actors[1])
            self.killed = True
        return self.shards.softmax_backward(inverses, scale)


def test_actor_lost_inside_a_softmax_step_is_recovered(cluster, softmax_job, softmax_local,
                                                        tmp_path):
    with _start(softmax_job) as shards:
        remote = _train(softmax_job, tmp_path / "ray", shards=_KillBeforeBackward(shards))
        assert shards.replacements == 1
    assert np.max(np.abs(remote - softmax_local)) < WEIGHT_TOL


def test_shard_actor_holds_no_secret_and_no_bootstrapping_key(cluster, softmax_job):
    _, plan, keys, _, _ = softmax_job
    expected = sorted(keys.context.FindAutomorphismIndices(
        [i for i in plan.kernel_rotation_indices if i % plan.slots]))
    conjugation = 2 * keys.params.ring_dim - 1  # every CKKS bootstrap needs this key
    with _start(softmax_job, n_actors=1) as shards:
        actor = shards.actors[0]
        held = ray.get(actor.automorphism_indices.remote())
        assert held == expected and conjugation not in held
        everything = sorted(keys.context.GetExistingEvalAutomorphismKeyIndices(
            keys.secret_key.GetKeyTag()))
        assert len(held) < len(everything)

        def audit(worker) -> dict:
            """Inside the actor: no private key object, and a bootstrap fails for lack of
            keys even after the public precomputation."""
            from medblindtuner.he.params import setup_bootstrapping

            found = [type(v).__name__ for v in vars(worker).values()]
            found += [type(v).__name__ for v in vars(worker.evaluator).values()]
            ev = worker.evaluator
            setup_bootstrapping(ev.context, ev.params)
            chunk = next(iter(worker.kernel.chunks.values()))
            work = chunk.x_grad.Clone()
            work.SetSlots(ev.params.bootstrap_slots[0])
            try:
                ev.context.EvalBootstrap(work)
                bootstrapped = True
            except Exception:  # noqa: BLE001 - OpenFHE reports the missing keys
                bootstrapped = False
            return {"types": found, "bootstrapped": bootstrapped}

        report = ray.get(actor.__ray_call__.remote(audit))
        assert "PrivateKey" not in report["types"] and not report["bootstrapped"]
    # what is shipped: the four shard roles (no rotation_keys.bin, which holds the
    # bootstrapping keys), none of which parses as a secret key
    from medblindtuner.he.keys import SHARD_KEY_ROLES, ShardKeys

    shipped = ShardKeys.read(softmax_job[4], allow_insecure=True)
    assert tuple(shipped.blobs) == SHARD_KEY_ROLES
    for blob in shipped.blobs.values():
        with pytest.raises(RuntimeError):
            ofhe.DeserializePrivateKeyString(blob, ofhe.BINARY)
