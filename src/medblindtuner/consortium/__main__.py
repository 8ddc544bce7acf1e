"""`python -m medblindtuner.consortium`: a consortium run in one process (refresh mode
"hospital", the default, runs at 128 bits; "bootstrap" does not fit the production ring,
docs/security.md).

    python -m medblindtuner.consortium --features breast.npz --hospitals 3 --pca 31 \\
        --insecure-test-params
    python -m medblindtuner.consortium --synthetic --insecure-test-params

The training and validation splits are divided among the hospitals with skewed class mixes
(`skewed_split`); the test split stays with the evaluator. Prints the consortium model's test
ACC/AUC next to each hospital trained alone on its own rows and the union trained in the
clear, both with the consortium's settings (plaintext, exact head).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.params import HOSPITAL, REFRESH_MODES, params_for_mode
from medblindtuner.training.plain import evaluate as _evaluate
from medblindtuner.training.plain import train_head

from .run import HospitalShard, run_consortium


def skewed_split(x: np.ndarray, y: np.ndarray, n_hospitals: int, seed: int = 0,
                 skew: float = 0.7) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of each class go mostly (`skew` of them, the rest spread evenly) to one hospital,
    class k to hospital k mod n: each hospital's class mix differs from the union's."""
    rng = np.random.default_rng(seed)
    owner = np.empty(len(y), dtype=int)
    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        favoured = int(k) % n_hospitals
        weights = np.full(n_hospitals, (1 - skew) / max(n_hospitals - 1, 1))
        weights[favoured] = skew if n_hospitals > 1 else 1.0
        owner[rows] = rng.choice(n_hospitals, size=len(rows), p=weights / weights.sum())
    return [(x[owner == h], y[owner == h]) for h in range(n_hospitals)]


def synthetic_features(seed: int = 0, dim: int = 16) -> FeatureSet:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, dim))

    def split(n: int):
        y = rng.integers(0, 2, n)
        return (centers[y] * 1.5 + rng.normal(size=(n, dim))).astype(np.float32), y

    return FeatureSet.from_arrays({"train": split(400), "val": split(120),
                                   "test": split(200)}, 2, name="synthetic")


def evaluate(weights: np.ndarray, x: np.ndarray, y: np.ndarray, n_classes: int) -> dict:
    scores = _evaluate(weights, x, y, n_classes)
    return {"acc": round(scores["acc"], 4), "auc": round(scores["auc"], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medblindtuner.consortium")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, help="a FeatureSet .npz (train/val/test)")
    source.add_argument("--synthetic", action="store_true", help="Gaussian blobs, 16 dims")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--pca", type=int, default=None, help="PCA width (pooled covariance)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--refresh", choices=REFRESH_MODES, default=HOSPITAL,
                        help="hospital: joint refresh by all members (fits 128-bit); "
                             "bootstrap: joint bootstrapping keys (insecure ring only)")
    parser.add_argument("--insecure-test-params", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        features = (synthetic_features() if args.synthetic else FeatureSet.load(args.features))
        n_classes = features.n_classes
        train = skewed_split(*features.splits["train"], args.hospitals, seed=1)
        val = skewed_split(*features.splits["val"], args.hospitals, seed=2)
        shards = [HospitalShard(xt, yt, xv, yv) for (xt, yt), (xv, yv) in zip(train, val,
                                                                            strict=True)]
        params = params_for_mode(args.refresh, insecure=args.insecure_test_params)
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medblindtuner-consortium-"))
        result = run_consortium(shards, n_classes, params, workdir, pca_dims=args.pca,
                                weight_decay=args.weight_decay, epochs=args.epochs,
                                allow_insecure=args.insecure_test_params, log=print)
    except (MedBlindTunerError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    x_test, y_test = features.splits["test"]
    x_test = result.scaler.augment(x_test)
    config = result.plan.config
    report = {"hospitals": [{"train_rows": len(s.y_train),
                             "class_counts": np.bincount(s.y_train, minlength=n_classes).tolist()}
                            for s in result.scaled],
              "consortium_encrypted": evaluate(result.weights[0], x_test, y_test, n_classes)}
    for i, s in enumerate(result.scaled):
        alone = train_head(s.x_train, s.y_train, s.x_val, s.y_val, n_classes, config)
        report["hospitals"][i]["alone_plaintext"] = evaluate(alone.weights, x_test, y_test,
                                                             n_classes)
    union = [np.concatenate([getattr(s, f) for s in result.scaled])
             for f in ("x_train", "y_train", "x_val", "y_val")]
    pooled = train_head(*union, n_classes, config)
    report["pooled_plaintext_same_settings"] = evaluate(pooled.weights, x_test, y_test,
                                                        n_classes)
    report["seconds"] = {k: round(v, 2) for k, v in result.seconds.items()}
    trips = np.asarray(result.refresh_round_trips)
    if trips.size:
        report["joint_refreshes"] = len(trips)
        report["refresh_round_trip_s_per_member"] = [round(float(t), 4)
                                                     for t in trips.mean(axis=0)]
    report["relay_MiB_key_rounds"] = round(result.relay_bytes / 2**20, 2)
    report["params"] = result.params.name
    print(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
