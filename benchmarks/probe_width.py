"""The tuned probe at each PCA width: what the encrypted head could reach at that width.

    python benchmarks/probe_width.py --features runs/features/breastmnist.npz

For the full-width probe's C (chosen on validation), prints the probe refitted on PCA-k
features (k = the recipe's candidates): validation log-loss, its paired difference to the best
width with the standard error (what the recipe's tie rule compares) and test ACC/AUC (reported
here only, never used for a choice).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medblindtuner.features.extract import FeatureSet
from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.hospital.reference import fit_logistic, fit_probe, sample_log_losses, scores
from medblindtuner.hospital.widths import PCA_CANDIDATES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    args = parser.parse_args()
    features = FeatureSet.load(args.features)
    n_classes = features.n_classes
    probe = fit_probe(features.splits, n_classes)
    print(f"full width ({features.feature_dim}): C = {probe.c:g}, val log-loss "
          f"{probe.val_log_loss:.4f}, test ACC {probe.test['acc']:.4f} AUC "
          f"{probe.test['auc']:.4f}")
    (x_train, y_train), (x_val, y_val) = features.splits["train"], features.splits["val"]
    x_test, y_test = features.splits["test"]
    y_val = np.asarray(y_val).reshape(-1).astype(int)
    rows = {}
    for k in PCA_CANDIDATES:
        if k >= min(x_train.shape[1], len(x_train)):
            continue
        scaler = FeatureScaler(standardize=True, n_components=k).fit(x_train)
        model = fit_logistic(scaler.project(x_train), np.asarray(y_train), probe.c, n_classes)
        losses = sample_log_losses(model, scaler.project(x_val), y_val)
        test = scores(model.predict_proba(scaler.project(x_test)), y_test, n_classes)
        rows[k] = (losses, test)
    best = min(rows, key=lambda k: rows[k][0].mean())
    for k, (losses, test) in rows.items():
        diff = losses - rows[best][0]
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        print(f"PCA {k:4d}: val log-loss {losses.mean():.4f} (best + {diff.mean():.4f}, "
              f"paired SE {se:.4f}{', tied' if diff.mean() <= se else ''}), test ACC "
              f"{test['acc']:.4f} AUC {test['auc']:.4f}")

if __name__ == "__main__":
    main()
