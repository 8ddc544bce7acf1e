"""A 3-hospital consortium against one key holder on the same pooled data and plan.

    python benchmarks/consortium.py --out /tmp/consortium.json          # insecure test ring
    python benchmarks/consortium.py --refresh hospital --features breast.npz --pca 31 \
        --production --out /tmp/c.json     # 128-bit, joint refresh vs one key holder's refresh

Runs `run_consortium` on skewed shards (`consortium.job.skewed_split`) of synthetic or given
features, then trains the same plan on the union under one key (`HospitalKeys`, the one-key
parameters of the same refresh mode; in mode "hospital" the one key holder refreshes) and
reports both runs' key generation, encryption, training and decryption times, their training
ratio and this process's peak RSS. Bootstrap mode: insecure test ring only (the joint depth
does not fit the production ring: docs/security.md); refresh mode "hospital" also at 128 bits
(`--production`, under `flock /work/prod.lock`).

`--profile DIR`: each half under cProfile (`consortium.prof`, `one_key.prof`) and, in the
report, the cumulative seconds of the parts a training is made of (`PROFILED`): the steps,
the refreshes (the members' answers, the cloud's joining), the validation losses and the
decisions. cProfile slows the Python parts (the joint refresh protocol more than the HE
operations): compare ratios of unprofiled runs.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from medblindtuner.cloud.cloud import Cloud
from medblindtuner.consortium.__main__ import skewed_split, synthetic_features
from medblindtuner.consortium.job import mirror_comparison, report_of
from medblindtuner.consortium.run import HospitalShard, run_consortium
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import BOOTSTRAP, REFRESH_MODES, CkksParams, params_for_mode
from medblindtuner.he.refresh import CloudRefresher
from medblindtuner.hospital.crypto import HospitalJudge, decrypt_weights, encrypt_dataset
from medblindtuner.hospital.refresher import HospitalRefresher

# function (file:name) -> what it is, for `--profile`'s summary
PROFILED = {
    "trainer.py:step": "training steps (with their refreshes)",
    "joint_refresh.py:refresh": "joint refreshes (cloud side, members' answers included)",
    "joint_refresh.py:_ask_all": "  the members' answers (3 phases)",
    "joint_refresh.py:finish_joint": "  the cloud joining the answers",
    "refresh.py:refresh": "one key holder's refreshes",
    "trainer.py:validation_loss_ciphertext": "validation losses",
    "run.py:decide": "the hospitals' decisions (threshold decryption)",
    "engine.py:rotate": "rotations",
    "engine.py:mul": "ciphertext products",
    "engine.py:chebyshev": "Chebyshev series",
}


def profiled(directory: Path | None, name: str, run):
    """`run()`, under cProfile when `directory` is given (stats in `<name>.prof`); returns
    (its result, {PROFILED part: cumulative seconds})."""
    if directory is None:
        return run(), {}
    profile = cProfile.Profile()
    result = profile.runcall(run)
    directory.mkdir(parents=True, exist_ok=True)
    profile.dump_stats(directory / f"{name}.prof")
    cumulative: dict[str, float] = {}
    for (file, _line, function), row in pstats.Stats(profile).stats.items():
        key = f"{Path(file).name}:{function}"
        cumulative[key] = cumulative.get(key, 0.0) + row[3]
    return result, {label: round(cumulative[key], 2) for key, label in PROFILED.items()
                    if key in cumulative}


def one_key_run(result, workdir: Path, base: CkksParams, insecure: bool) -> dict:
    plan, parts = result.plan, result.scaled
    union = [np.concatenate([getattr(s, f) for s in parts])
             for f in ("x_train", "y_train", "x_val", "y_val")]
    start = time.perf_counter()
    keys = HospitalKeys.generate(base.with_bootstrap_slots(plan.bootstrap_slots),
                                 plan.rotation_indices, allow_insecure=insecure,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    seconds = {"keys": time.perf_counter() - start}
    start = time.perf_counter()
    dataset = encrypt_dataset(keys, plan, *union)
    seconds["encrypt"] = time.perf_counter() - start
    start = time.perf_counter()
    cloud = Cloud.sharing_context(keys.context, keys.params, keys.public_key)
    judge = HospitalJudge(keys, plan, len(union[3]))
    if keys.params.refreshed_by_hospital:  # the one key holder refreshes (he.refresh)
        holder = HospitalRefresher(keys, plan, stopped=lambda: judge.stopped)
        cloud.evaluator.refresher = CloudRefresher(keys.context, keys.params, keys.public_key,
                                                   holder, holder.job)
    trainer = cloud.trainer(dataset, workdir / "one-key")
    state = cloud.train(trainer, decide=judge)
    seconds["training"] = time.perf_counter() - start
    weights = decrypt_weights(keys, plan, trainer.weights_of_epoch(state.best_epoch))
    return {"seconds": {k: round(v, 2) for k, v in seconds.items()},
            "best_epoch": state.best_epoch, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="at most this many (default: the allowance's; judges stop)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--refresh", choices=REFRESH_MODES, default=BOOTSTRAP)
    parser.add_argument("--features", type=Path, default=None,
                        help="a FeatureSet .npz (default: synthetic 16-d blobs)")
    parser.add_argument("--pca", type=int, default=None)
    parser.add_argument("--production", action="store_true",
                        help="128-bit (refresh mode hospital only; run under flock)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a folder: each half under cProfile, a summary in the report")
    args = parser.parse_args()
    if args.production and args.refresh != "hospital":
        parser.error("--production needs --refresh hospital (joint bootstrapping does not fit "
                     "the 128-bit ring)")
    insecure = not args.production
    base = params_for_mode(args.refresh, insecure=insecure)
    features = FeatureSet.load(args.features) if args.features else synthetic_features()
    train = skewed_split(*features.splits["train"], args.hospitals, seed=1)
    val = skewed_split(*features.splits["val"], args.hospitals, seed=2)
    shards = [HospitalShard(xt, yt, xv, yv) for (xt, yt), (xv, yv) in zip(train, val,
                                                                        strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        result, consortium_profile = profiled(args.profile, "consortium", lambda: run_consortium(
            shards, features.n_classes, base, Path(tmp), epochs=args.epochs,
            pca_dims=args.pca, allow_insecure=insecure, log=print))
        peak_consortium = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        single, one_key_profile = profiled(args.profile, "one_key", lambda: one_key_run(
            result, Path(tmp), base, insecure))
    report = {
        "params": (f"{result.params.name}, ring {result.params.ring_dim}, refresh "
                   f"{args.refresh}" + ("" if args.production else
                                        ": INSECURE, mechanics timings, not product numbers")),
        "training_ratio_consortium_over_one_key": round(
            result.seconds["training"] / single["seconds"]["training"], 3),
        "hospitals": args.hospitals, "train_rows": [len(s.y_train) for s in result.scaled],
        "plan": {"features": result.plan.n_features, "epochs": result.plan.config.epochs,
                 "batch": result.plan.config.batch_size,
                 "steps_per_epoch": len(result.plan.train_batch_sizes)},
        "consortium": {"seconds": {k: round(v, 2) for k, v in result.seconds.items()},
                       "best_epoch": result.state.best_epoch,
                       "key_round_MiB": round(result.relay_bytes / 2**20, 2),
                       "joint_depth": result.params.depth,
                       "refresh_round_trip_s_per_member": [
                           round(float(t), 4) for t in np.mean(result.refresh_round_trips,
                                                               axis=0)]
                       if result.refresh_round_trips else None},
        "one_key": {k: v for k, v in single.items() if k != "weights"},
        "consortium_vs_mirror": mirror_comparison(result, [
            np.concatenate([getattr(p, f) for p in result.scaled])
            for f in ("x_train", "y_train", "x_val", "y_val")]),
        "max_weight_difference": float(np.max(np.abs(result.weights[0] - single["weights"]))),
        "peak_rss_gib_after_consortium": round(peak_consortium, 2),
        "peak_rss_gib_end": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                  2),
    }
    if args.profile is not None:
        report["profile_cumulative_s"] = {"consortium": consortium_profile,
                                          "one_key": one_key_profile}
    scores = report_of(features, result)  # its pooled probe: the union is every hospital's rows
    report["test"] = {"consortium_encrypted": scores["consortium_encrypted"],
                      "pooled_probe": scores["pooled_probe"],
                      "alone_plaintext": [h["alone_plaintext"] for h in scores["hospitals"]],
                      "settings": result.settings_why}
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
