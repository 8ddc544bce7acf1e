"""Encrypted training cost at hospital scale: ms per sample-epoch, bootstraps, memory.

    python benchmarks/scale.py --out runs/bench/scale.json                 # local, all sizes
    python benchmarks/scale.py --heads binary --sizes 2000 --steps 2       # one quick case
    python benchmarks/scale.py --ray-nodes 1 2 --out runs/bench/scale_ray.json
    python benchmarks/scale.py --refresh hospital bootstrap --sizes 10000   # both modes

For each head (binary at PCA 63, 5-class softmax at PCA 31, the same on [-12, 12] with the
saturating exponential: `--heads softmax softmax-wide` compares them; `softmax-chunkwise`: the
5-class head with an exponential a chunk and diagonal, as before one exponential a step) and
each training-set size N, it makes synthetic features of that width (cost does not depend on the
values; accuracy is measured on the real sets by benchmarks/encrypted_training.py), lets the
product derive the settings (batch size from N), generates production keys, encrypts and writes
the dataset chunk by chunk with the public bundle (the hospital's process), then loads bundle
and dataset as the service's worker does and times `--steps` steps (the cloud's process): each
role's peak RSS is its own, as in a deployment. `--ray-nodes S` also runs the steps on a local
Ray cluster of S worker nodes (`cloud.cluster`). The per-step split into the chunks' part
(parallel over nodes) and the driver's part (serial: update, bootstraps) gives a projection for
more nodes, printed and stored as a projection.

`--refresh hospital` (issue #24): the key holder refreshes instead of the cloud bootstrapping
(`he.refresh`); the cloud's process then talks to a third process, the hospital's key holder
(`--key-holder`, its secret key and refresh ledger only), over a pipe with the same request and
answer bytes as the service, so the round trip and the key holder's own peak RSS are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HEADS = {"binary": (2, 63), "softmax": (5, 31), "softmax-wide": (5, 31),
         "softmax-chunkwise": (5, 31)}
# a head whose logits need the saturating exponential (`ActivationPlan.softmax_for`): its cost
WIDE_LOGIT_BOUND = {"softmax-wide": 12.0}
PROJECTED_NODES = (4, 16, 64)


def synthetic_features(n_train: int, n_classes: int, dim: int, seed: int = 0):
    from medblindtuner.features.backbones import BackboneInfo
    from medblindtuner.features.extract import FeatureSet

    rng = np.random.default_rng(seed)
    # classes about 1.7 noise deviations apart (AUC near 0.9, like the real sets): clearly
    # separated means would let the exact head's logits outgrow the approximations at large N
    means = rng.normal(0, 0.15, (n_classes, dim))
    splits = {}
    for split, size in (("train", n_train), ("val", max(n_classes, n_train // 10)),
                        ("test", max(n_classes, n_train // 10))):
        labels = rng.integers(0, n_classes, size)
        labels[:n_classes] = np.arange(n_classes)
        x = means[labels] + rng.normal(0, 1, (size, dim))
        splits[split] = (x.astype(np.float32), labels.astype(np.int64))
    info = BackboneInfo(name="synthetic", arch="none", feature_dim=dim, weights_source="none",
                        weights_sha256="-", pretrained=False, input_size=0,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return FeatureSet(dataset_name=f"synthetic-{n_classes}", dataset_md5="-",
                      n_classes=n_classes, splits=splits, backbone=info)


class TimedShards:
    """The local kernel, timing the chunks' part of each step (what nodes would share)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def _timed(self, name: str, *args):
        start = time.perf_counter()
        try:
            return getattr(self.inner, name)(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def binary_terms(self, *args):
        return self._timed("binary_terms", *args)

    def binary_forward(self, *args):
        return self._timed("binary_forward", *args)

    def binary_backward(self, *args):
        return self._timed("binary_backward", *args)

    def softmax_forward(self, *args):
        return self._timed("softmax_forward", *args)

    def softmax_backward(self, *args):
        return self._timed("softmax_backward", *args)

    def softmax_gather(self, *args):
        return self._timed("softmax_gather", *args)

    def softmax_scatter(self, *args):
        return self._timed("softmax_scatter", *args)


def cpus_per_node(nodes: int) -> int:
    """This machine's cores shared among the nodes (an actor's OpenMP threads follow them)."""
    import os

    return max(1, (os.cpu_count() or 1) // nodes)


def local_cluster(nodes: int, dataset_gb: float):
    """A Ray cluster of `nodes` worker nodes on this machine (the head schedules no actor);
    each node's object store holds its share of the chunks (Ray spills beyond it)."""
    import ray
    from ray.cluster_utils import Cluster

    store = int(max(0.3, min(4.0, 1.2 * dataset_gb / nodes)) * 2**30)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 2**28, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node(nodes), object_store_memory=store)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    return cluster


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def hospital_part(head: str, n_train: int, workdir: Path, insecure: bool, mode: str,
                  batch: int | None = None) -> dict:
    """The hospital's process of a case: settings, keys, the encrypted dataset and the public
    bundle written under `workdir` (what a hospital uploads; in refresh mode "hospital" also
    the secret key and the plan, for the key-holder process)."""
    from medblindtuner.he.keys import HospitalKeys, bundle_size_bytes
    from medblindtuner.he.params import params_for_mode
    from medblindtuner.hospital.crypto import write_encrypted_dataset
    from medblindtuner.hospital.recipe import Overrides, derive_recipe

    params = params_for_mode(mode, insecure)
    n_classes, dim = HEADS[head]
    data, recipe = derive_recipe(synthetic_features(n_train, n_classes, dim), params,
                                 Overrides(pca_dims=0, batch_size=batch))
    plan = recipe.plan
    if head in WIDE_LOGIT_BOUND:
        from medblindtuner.training.approx import ActivationPlan
        from medblindtuner.training.plan import TrainingPlan

        plan = TrainingPlan.create(params, data.x["train"], data.x["val"], n_classes,
                                   recipe.config, ActivationPlan.softmax_for(
                                       n_classes, WIDE_LOGIT_BOUND[head]))
    if head == "softmax-chunkwise":
        from dataclasses import replace

        plan = replace(plan, compact_softmax=False)
    keyed = params.with_bootstrap_slots(plan.bootstrap_slots)
    result: dict = {"head": head, "compact_softmax": plan.compact_softmax, "n_train": n_train,
                    "features": dim, "params": keyed.name,
                    "refresh": mode, "ring_dim": keyed.ring_dim, "depth": keyed.depth,
                    "batch_size": plan.config.batch_size,
                    "samples_per_step": round(float(np.mean(plan.train_batch_sizes)), 1),
                    "chunks_per_step": plan.chunks_per_step,
                    "samples_per_ct": plan.layout.samples_per_ct,
                    "steps_per_epoch": len(plan.train_batch_sizes),
                    "bootstrap_slots": list(keyed.bootstrap_slots)}
    start = time.perf_counter()
    keys = HospitalKeys.generate(keyed, plan.rotation_indices, allow_insecure=insecure,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    result["keygen_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    manifest = write_encrypted_dataset(workdir / "data", keys, plan, data.x["train"],
                                       data.y["train"], data.x["val"], data.y["val"])
    result["encrypt_s"] = round(time.perf_counter() - start, 1)
    result["dataset_gb"] = round(sum(f["bytes"] for f in manifest["files"].values()) / 1e9, 2)
    keys.save_public_bundle(workdir / "bundle")
    result["bundle_mb"] = round(bundle_size_bytes(workdir / "bundle") / 1e6, 1)
    if keyed.refreshed_by_hospital:
        keys.save_secret_key(workdir / "secret_key.bin")
        (workdir / "plan.json").write_text(json.dumps(plan.to_dict(), default=float))
    result["hospital_peak_rss_gb"] = round(peak_rss_gb(), 2)
    return result


def own_peak_rss_gb() -> float:
    """This process's own peak RSS (VmHWM): unlike ru_maxrss it does not carry over the
    parent's peak from before a fork and exec (the key holder is started by the cloud)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return peak_rss_gb()


def _send(stream, data: bytes) -> None:
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def _receive(stream) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    return stream.read(int.from_bytes(head, "big"))


def key_holder_part(workdir: Path, insecure: bool) -> None:
    """The hospital's key holder while the cloud trains: answers refresh requests read from
    stdin (length-prefixed bytes) on stdout; at the end of input, its own measurements."""
    from medblindtuner.he.keys import HospitalKeys
    from medblindtuner.hospital.refresher import HospitalRefresher
    from medblindtuner.training.plan import TrainingPlan

    keys = HospitalKeys.load(workdir / "bundle", workdir / "secret_key.bin",
                             allow_insecure=insecure, with_eval_keys=False)
    plan = TrainingPlan.from_dict(json.loads((workdir / "plan.json").read_text()))
    holder = HospitalRefresher(keys, plan, workdir / "key_holder")
    seconds, count = 0.0, 0
    while (request := _receive(sys.stdin.buffer)) is not None:
        start = time.perf_counter()
        answer = holder(request)
        seconds += time.perf_counter() - start
        count += 1
        _send(sys.stdout.buffer, answer)
    _send(sys.stdout.buffer, json.dumps({
        "key_holder_peak_rss_gb": round(own_peak_rss_gb(), 2),
        "key_holder_s_per_refresh": round(seconds / max(count, 1), 3)}).encode())


class PipeKeyHolder:
    """The cloud's end of the pipe to the key-holder process; times each round trip."""

    def __init__(self, workdir: Path, insecure: bool) -> None:
        command = [sys.executable, __file__, "--key-holder", str(workdir)]
        command += ["--insecure-test-params"] if insecure else []
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.seconds, self.count, self.request_bytes, self.answer_bytes = 0.0, 0, 0, 0

    def __call__(self, request: bytes) -> bytes:
        start = time.perf_counter()
        _send(self.process.stdin, request)
        answer = _receive(self.process.stdout)
        if answer is None:
            raise RuntimeError("the key-holder process ended without an answer")
        self.seconds += time.perf_counter() - start
        self.count += 1
        self.request_bytes, self.answer_bytes = len(request), len(answer)
        return answer

    def close(self) -> dict:
        self.process.stdin.close()
        final = json.loads(_receive(self.process.stdout) or b"{}")
        self.process.wait()
        return {**final, "refresh_round_trip_s": round(self.seconds / max(self.count, 1), 3),
                "request_mb": round(self.request_bytes / 1e6, 2),
                "answer_mb": round(self.answer_bytes / 1e6, 2)}


def cloud_part(ray_nodes: int, steps: int, workdir: Path, dataset_gb: float,
               insecure: bool) -> dict:
    """The cloud's process of a case: the public bundle and the dataset as the service's
    worker loads them, `steps` timed steps (on a local Ray cluster with `ray_nodes`)."""
    from medblindtuner.cloud.cloud import Cloud

    cloud = Cloud(workdir / "bundle", allow_insecure=insecure, verify=False)
    dataset = cloud.load_dataset(workdir / "data")
    plan = dataset.plan
    holder = None
    crypto = cloud.crypto
    if crypto.params.refreshed_by_hospital:
        from medblindtuner.he.refresh import CloudRefresher

        holder = PipeKeyHolder(workdir, insecure)
        cloud.evaluator.refresher = CloudRefresher(crypto.context, crypto.params,
                                                   crypto.public_key, holder,
                                                   plan.job_tag(crypto.params))
    result: dict = {"ray_nodes": ray_nodes,
                    "resident": bool(getattr(dataset.train, "resident", True))}
    cluster = shards = None
    if ray_nodes:
        cluster = local_cluster(ray_nodes, dataset_gb)
        start = time.perf_counter()
        shards = cloud.start_shards(dataset, cluster.address, n_actors=ray_nodes,
                                    cpus_per_actor=cpus_per_node(ray_nodes))
        result["ray_start_s"] = round(time.perf_counter() - start, 1)
    trainer = cloud.trainer(dataset, workdir / "ckpt", shards=shards)
    timed = TimedShards(trainer.shards)
    trainer.shards = timed
    trainer.initialise_or_resume()
    result["peak_rss_before_training_gb"] = round(peak_rss_gb(), 2)
    records = []
    for step in range(steps):
        batch = step % len(plan.train_batch_sizes)
        before_boot, timed.seconds = trainer.ev.ops["bootstraps"], 0.0
        start = time.perf_counter()
        trainer.step(batch)
        seconds = time.perf_counter() - start
        records.append({"batch": batch, "samples": plan.train_batch_sizes[batch],
                        "chunks": len(plan.batch_chunks(batch)), "step_s": round(seconds, 2),
                        "chunk_part_s": round(timed.seconds, 2),
                        "bootstraps": trainer.ev.ops["bootstraps"] - before_boot})
        print(json.dumps({"steps_done": step + 1, **records[-1]}), file=sys.stderr, flush=True)
    result["ops"] = trainer.ev.ops.snapshot()  # every step's operations: counts and seconds
    if shards is not None:
        import psutil  # comes with Ray
        import ray

        result["actor_rss_gb"] = [
            round(proc.memory_info().rss / 2**30, 2) for proc in psutil.process_iter(["cmdline"])
            if "ShardWorker" in " ".join(proc.info["cmdline"] or [])]

        shards.close()
        ray.shutdown()
        cluster.shutdown()
    if holder is not None:
        result.update(holder.close())
    timed_records = records[1:] or records  # the first step also encodes the masks once
    samples = sum(r["samples"] for r in timed_records)
    step_s = sum(r["step_s"] for r in timed_records)
    chunk_s = sum(r["chunk_part_s"] for r in timed_records)
    chunks = sum(r["chunks"] for r in timed_records)
    result.update({
        "steps": records,
        "ms_per_sample_epoch": round(1000 * step_s / samples, 2),
        "bootstraps_per_1000_samples": round(
            1000 * sum(r["bootstraps"] for r in timed_records) / samples, 2),
        "serial_s_per_step": round((step_s - chunk_s) / len(timed_records), 2),
        "chunk_s": round(chunk_s / chunks, 3),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    })
    return result


def run_part(part: list[str], args: argparse.Namespace, mode: str) -> dict | None:
    """One part of a case in its own process (its peak RSS is its own); None if it failed."""
    command = [sys.executable, __file__, *part, "--steps", str(args.steps), "--refresh", mode]
    command += ["--insecure-test-params"] if args.insecure_test_params else []
    command += ["--batch", str(args.batch)] if args.batch else []
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(f"{' '.join(part)}: failed (exit {done.returncode})", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def projection(case: dict, nodes: int) -> float:
    """ms per sample-epoch if each step's chunks were spread over `nodes` nodes (serial part
    unchanged, transfers ignored): a projection, not a measurement."""
    per_step = case["serial_s_per_step"] + math.ceil(case["chunks_per_step"] / nodes) * \
        case["chunk_s"]
    return round(1000 * per_step / case["samples_per_step"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[2000, 10000, 50000])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ray-nodes", nargs="*", type=int, default=[0],
                        help="0 = local process; S = a local Ray cluster of S worker nodes")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/scale_work"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scale.json"))
    parser.add_argument("--insecure-test-params", action="store_true")
    parser.add_argument("--refresh", nargs="+", default=["bootstrap"],
                        choices=["hospital", "bootstrap"],
                        help="refresh modes to run, each case in each mode (issue #24)")
    parser.add_argument("--batch", type=int, help="samples a step in every case (default: the "
                        "product's rule, which differs between the modes' rings)")
    parser.add_argument("--key-holder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hospital", nargs=3, metavar=("HEAD", "N", "DIR"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--cloud", nargs=3, metavar=("NODES", "DIR", "DATASET_GB"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.key_holder:
        key_holder_part(args.key_holder, args.insecure_test_params)
        return
    if args.hospital:
        head, n, folder = args.hospital
        print(json.dumps(hospital_part(head, int(n), Path(folder), args.insecure_test_params,
                                       args.refresh[0], args.batch)))
        return
    if args.cloud:
        nodes, folder, dataset_gb = args.cloud
        print(json.dumps(cloud_part(int(nodes), args.steps, Path(folder), float(dataset_gb),
                                    args.insecure_test_params)))
        return
    cases = []
    for head, n, mode in ((h, n, m) for h in args.heads for n in args.sizes
                          for m in args.refresh):
        folder = args.workdir / f"{head}_{n}_{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        hospital = run_part(["--hospital", head, str(n), str(folder)], args, mode)
        if hospital is None:
            continue
        for nodes in args.ray_nodes:
            shutil.rmtree(folder / "ckpt", ignore_errors=True)
            cloud = run_part(["--cloud", str(nodes), str(folder),
                              str(hospital["dataset_gb"])], args, mode)
            if cloud is None:
                continue
            case = {**hospital, **cloud}
            if nodes == 0:
                case["projection_ms_per_sample_epoch"] = {
                    str(k): projection(case, k) for k in PROJECTED_NODES}
            cases.append(case)
            where = f"Ray {nodes} node(s)" if nodes else "local"
            print(f"{head:8s} N={n:6d} {mode:9s} {where:14s} batch {case['batch_size']:5d} "
                  f"({case['chunks_per_step']} cts) {case['ms_per_sample_epoch']:7.2f} "
                  f"ms/sample-epoch, {case['bootstraps_per_1000_samples']:.2f} "
                  f"bootstraps/1000 samples, peak RSS GiB: cloud {case['peak_rss_gb']:.1f}"
                  f", hospital {case['hospital_peak_rss_gb']:.1f}, key holder "
                  f"{case.get('key_holder_peak_rss_gb', '-')}; bundle "
                  f"{case['bundle_mb']:.0f} MB", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"command": " ".join(sys.argv),
                                            "cases": cases}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
    for case in cases:
        if "projection_ms_per_sample_epoch" in case:
            print(f"projection {case['head']} N={case['n_train']}: " + ", ".join(
                f"{k} nodes {v} ms" for k, v in case["projection_ms_per_sample_epoch"].items())
                + " (serial part + chunks spread evenly; transfers not included)")


if __name__ == "__main__":
    main()
