"""Encrypted vs plaintext training on real MedMNIST features (production 128-bit parameters).

Example (BreastMNIST, EfficientNet-Lite0 features made by `medblindtuner features`; every
setting not given is derived from the data as the product does):
    python benchmarks/encrypted_training.py --features runs/features/breastmnist.npz \
        --out runs/bench/breast.json

Prints accuracy/AUC of exact plaintext, plaintext mirror and encrypted training, wall time per
step, bootstraps/rotations/multiplications per step, bundle sizes and peak RSS, and writes the
full results JSON (the report's schema) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medblindtuner.experiment import run_encrypted
from medblindtuner.features.extract import FeatureSet
from medblindtuner.hospital.hospital import Hospital
from medblindtuner.hospital.recipe import Overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, type=Path)
    # settings left out are derived from the data, as the product does (hospital.recipe)
    parser.add_argument("--pca", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/work"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/results.json"))
    parser.add_argument("--insecure-test-params", action="store_true")
    args = parser.parse_args()

    given = Overrides(pca_dims=args.pca, learning_rate=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, epochs=args.epochs,
                      batch_size=args.batch_size, patience=args.patience, seed=args.seed)
    hospital = Hospital(args.workdir, insecure_test_params=args.insecure_test_params, log=print)
    hospital.prepare(FeatureSet.load(args.features), given)
    results = run_encrypted(hospital)
    results["command"] = "python benchmarks/encrypted_training.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(results, default=float))
    args.out.write_text(json.dumps(slim, indent=2))
    runs = results["runs"]
    print(f"\n== {results['dataset']} ({results['ckks']['name']}) ==")
    for name in ("published", "probe"):
        if name in runs:
            print(f"{name:10s} ACC {runs[name]['test']['acc']:.4f} "
                  f"AUC {runs[name]['test']['auc']:.4f}")
    for name in ("plaintext", "mirror", "encrypted"):
        run = runs[name]
        print(f"{name:10s} ACC {run['test']['acc']:.4f} AUC {run['test']['auc']:.4f} "
              f"epochs {run['epochs']} best {run['best_epoch']} steps {run['steps']} "
              f"wall {run['wall_time_s']:.1f}s")
    enc = runs["encrypted"]
    print(f"seconds/step {enc['seconds_per_step']:.1f}; per step: "
          + ", ".join(f"{k} {v:.1f}" for k, v in enc["ops"]["per_step"].items()))
    print(f"max |w_enc - w_mirror| {enc['max_abs_weight_diff_vs_mirror']:.2e}")
    print("timings", {k: round(v, 1) for k, v in results["timings_s"].items()})
    print("sizes", results["sizes_bytes"], "peak RSS", results["peak_rss_bytes"])


if __name__ == "__main__":
    main()
