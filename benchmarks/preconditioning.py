"""Preconditioned against plain steps, in plaintext (issue #25): per set, the derived
settings with and without `Overrides(preconditioned=...)`, the exact head's test ACC / AUC
minus the probe's after each epoch (no early stop), then the polynomial mirror (which the
encrypted head equals) with the recipe's own epochs and early stop.

    python benchmarks/preconditioning.py --features <breastmnist>.npz <retinamnist>.npz \
        --stress "10 classes" "7 classes imbalanced" --epochs 12

`--stress NAME` adds a set of tests/stress_sets.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from medblindtuner.experiment import run_plain
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.params import default_refresh, params_for_mode
from medblindtuner.hospital.recipe import Overrides, derive_recipe
from medblindtuner.training.plain import evaluate, train_head


def epoch_gaps(data, config, probe: dict, epochs: int) -> list[tuple[float, float]]:
    """(ACC, AUC) points against the probe of the exact head after 1 .. `epochs` epochs."""
    gaps = []
    for epoch in range(1, epochs + 1):
        run = train_head(data.x["train"], data.y["train"], data.x["val"], data.y["val"],
                         data.n_classes, replace(config, epochs=epoch, patience=epochs + 1))
        test = evaluate(run.final_weights, data.x["test"], data.y["test"], data.n_classes)
        gaps.append((100 * (test["acc"] - probe["acc"]), 100 * (test["auc"] - probe["auc"])))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", nargs="*", type=Path, default=[])
    parser.add_argument("--stress", nargs="*", default=[])
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    sets = [FeatureSet.load(path) for path in args.features]
    if args.stress:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from stress_sets import CASES, make_features
        sets += [make_features(c) for name in args.stress for c in CASES if c.name == name]
    params = params_for_mode(default_refresh())
    for features in sets:
        rows = {}
        for pre in (False, True):
            data, recipe = derive_recipe(features, params, Overrides(preconditioned=pre))
            probe = recipe.probe.test
            mirror = run_plain(data, recipe.config, recipe.activation)["mirror"]
            rows[pre] = (epoch_gaps(data, recipe.config, probe, args.epochs), recipe, mirror)
        print(f"\n## {features.dataset_name}: probe {probe['acc']:.4f} / {probe['auc']:.4f}")
        for pre, (_, recipe, mirror) in rows.items():
            test = mirror["test"]
            print(f"{'preconditioned' if pre else 'plain'}: PCA {recipe.pca_dims}, "
                  f"{recipe.config.epochs} epochs (best {mirror['best_epoch']}), mirror − "
                  f"probe {100 * (test['acc'] - probe['acc']):+.2f} / "
                  f"{100 * (test['auc'] - probe['auc']):+.2f}, logit bound "
                  f"{recipe.activation.logit_bound:g}")
        print("| epoch | plain ACC / AUC | preconditioned ACC / AUC |\n|---|---|---|")
        for epoch, (plain, pre) in enumerate(zip(rows[False][0], rows[True][0], strict=True), 1):
            print(f"| {epoch} | {plain[0]:+.2f} / {plain[1]:+.2f} | {pre[0]:+.2f} / "
                  f"{pre[1]:+.2f} |")


if __name__ == "__main__":
    main()
