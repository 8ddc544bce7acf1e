"""A 3-hospital consortium against one key holder on the same pooled data and plan.

    python benchmarks/consortium.py --out /tmp/consortium.json          # insecure test ring

Runs `run_consortium` on synthetic skewed shards (`consortium.__main__.skewed_split`), then
trains the same plan on the union under one key (`HospitalKeys`, the one-key parameters) and
reports both runs' key generation, encryption, training and decryption times and this
process's peak RSS. Insecure test ring only (the joint depth does not fit the production
ring: docs/security.md), so these are mechanics timings, not product numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from medblindtuner.cloud.cloud import Cloud
from medblindtuner.consortium.__main__ import skewed_split, synthetic_features
from medblindtuner.consortium.run import HospitalShard, run_consortium
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import INSECURE_TEST
from medblindtuner.hospital.crypto import HospitalJudge, decrypt_weights, encrypt_dataset


def one_key_run(result, workdir: Path) -> dict:
    plan, parts = result.plan, result.scaled
    union = [np.concatenate([getattr(s, f) for s in parts])
             for f in ("x_train", "y_train", "x_val", "y_val")]
    start = time.perf_counter()
    keys = HospitalKeys.generate(INSECURE_TEST.with_bootstrap_slots(plan.bootstrap_slots),
                                 plan.rotation_indices, allow_insecure=True,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    seconds = {"keys": time.perf_counter() - start}
    start = time.perf_counter()
    dataset = encrypt_dataset(keys, plan, *union)
    seconds["encrypt"] = time.perf_counter() - start
    start = time.perf_counter()
    cloud = Cloud.sharing_context(keys.context, keys.params, keys.public_key)
    trainer = cloud.trainer(dataset, workdir / "one-key")
    state = cloud.train(trainer, decide=HospitalJudge(keys, plan, len(union[3])))
    seconds["training"] = time.perf_counter() - start
    weights = decrypt_weights(keys, plan, trainer.weights_of_epoch(state.best_epoch))
    return {"seconds": {k: round(v, 2) for k, v in seconds.items()},
            "best_epoch": state.best_epoch, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    features = synthetic_features()
    train = skewed_split(*features.splits["train"], args.hospitals, seed=1)
    val = skewed_split(*features.splits["val"], args.hospitals, seed=2)
    shards = [HospitalShard(xt, yt, xv, yv) for (xt, yt), (xv, yv) in zip(train, val,
                                                                        strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        result = run_consortium(shards, 2, INSECURE_TEST, Path(tmp), epochs=args.epochs,
                                allow_insecure=True, log=print)
        peak_consortium = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        single = one_key_run(result, Path(tmp))
    report = {
        "params": "INSECURE test ring (2^12): mechanics timings, not product numbers",
        "hospitals": args.hospitals, "train_rows": [len(s.y_train) for s in result.scaled],
        "plan": {"features": result.plan.n_features, "epochs": result.plan.config.epochs,
                 "batch": result.plan.config.batch_size,
                 "steps_per_epoch": len(result.plan.train_batch_sizes)},
        "consortium": {"seconds": {k: round(v, 2) for k, v in result.seconds.items()},
                       "best_epoch": result.state.best_epoch,
                       "key_round_MiB": round(result.relay_bytes / 2**20, 2),
                       "joint_depth": result.params.depth},
        "one_key": {k: v for k, v in single.items() if k != "weights"},
        "max_weight_difference": float(np.max(np.abs(result.weights[0] - single["weights"]))),
        "peak_rss_gib_after_consortium": round(peak_consortium, 2),
        "peak_rss_gib_end": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                  2),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
