"""The derived settings against the bars, in plaintext, per dataset: the polynomial mirror
(which the encrypted head equals, tests/test_encrypted_training.py) minus the tuned probe and
minus the published MedMNIST v2 ResNet-18 (28) baseline, with every setting derived.

    python benchmarks/recipe_check.py --features runs/features/breastmnist.npz \
        runs/features/retinamnist.npz --derive-binary retinamnist:1,2,3,4 \
        --refresh hospital bootstrap --out runs/bench/recipe_check.json

`--derive-binary NAME:CLASSES` adds the binary task "CLASSES against the rest" of a
multi-class set (a set the settings were never tuned on).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medblindtuner.experiment import run_plain
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.params import BOOTSTRAP, REFRESH_MODES, params_for_mode
from medblindtuner.hospital.recipe import derive_recipe
from medblindtuner.hospital.reference import published_run


def binary_task(features: FeatureSet, positive: set[int]) -> FeatureSet:
    splits = {s: (x, np.isin(np.asarray(y).reshape(-1), list(positive)).astype(np.int64))
              for s, (x, y) in features.splits.items()}
    name = f"{features.dataset_name} {sorted(positive)} vs rest"
    return FeatureSet(dataset_name=name, dataset_md5=features.dataset_md5, n_classes=2,
                      splits=splits, backbone=features.backbone)


def check(features: FeatureSet, refresh: str = BOOTSTRAP) -> dict:
    """The derived settings for the production parameters of refresh mode `refresh` (its
    ring sets the packing, hence the batches and the affordable widths)."""
    start = time.perf_counter()
    data, recipe = derive_recipe(features, params_for_mode(refresh))
    mirror = run_plain(data, recipe.config, recipe.activation)["mirror"]
    probe = recipe.probe.test
    row = {"dataset": features.dataset_name, "refresh": refresh, "pca_dims": recipe.pca_dims,
           "epochs": recipe.config.epochs, "best_epoch": mirror["best_epoch"],
           "logit_bound": recipe.activation.logit_bound,
           "weight_decay_why": next(c.why for c in recipe.choices if c.name == "weight_decay"),
           "mirror": {m: mirror["test"][m] for m in ("acc", "auc")},
           "probe": {m: probe[m] for m in ("acc", "auc")},
           "seconds": time.perf_counter() - start}
    published = published_run(features.dataset_name)
    if published is not None:
        row["published"] = published["test"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", nargs="+", type=Path, required=True)
    parser.add_argument("--derive-binary", nargs="*", default=[],
                        help="NAME:c1,c2 (dataset name and the positive classes)")
    parser.add_argument("--refresh", nargs="+", choices=REFRESH_MODES, default=[BOOTSTRAP],
                        help="refresh modes whose parameters to derive the settings for")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sets = {fs.dataset_name: fs for fs in map(FeatureSet.load, args.features)}
    tasks = list(sets.values())
    for spec in args.derive_binary:
        name, classes = spec.split(":")
        tasks.append(binary_task(sets[name], {int(c) for c in classes.split(",")}))
    rows = []
    for features, refresh in ((f, r) for f in tasks for r in args.refresh):
        row = check(features, refresh)
        rows.append(row)
        gaps = "; ".join(
            f"- {bar}: ACC {100 * (row['mirror']['acc'] - row[bar]['acc']):+.2f} AUC "
            f"{100 * (row['mirror']['auc'] - row[bar]['auc']):+.2f}"
            for bar in ("probe", "published") if bar in row)
        print(f"{row['dataset']} ({refresh}): mirror {row['mirror']['acc']:.4f} / "
              f"{row['mirror']['auc']:.4f}"
              f" (probe {row['probe']['acc']:.4f} / {row['probe']['auc']:.4f}) {gaps}; PCA "
              f"{row['pca_dims']}, {row['epochs']} epochs (best {row['best_epoch']}), R "
              f"{row['logit_bound']:g}, {row['seconds']:.0f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
