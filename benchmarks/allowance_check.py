"""Derived settings under several time allowances, in plaintext (issues #24/#25): per set and
allowance, the PCA width and epochs the recipe derives, the polynomial mirror (which the
encrypted head equals) minus the tuned probe, and the budget's estimate of the encrypted
training time.

    python benchmarks/allowance_check.py --features <breastmnist>.npz <retinamnist>.npz \
        --derive-binary retinamnist:2,3,4 retinamnist:1,2,3,4 --allowances 2 0.15

`--derive-binary NAME:CLASSES` adds the binary task "CLASSES against the rest" of a set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medblindtuner.experiment import run_plain
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.params import default_refresh, params_for_mode
from medblindtuner.hospital.budget import epoch_seconds
from medblindtuner.hospital.recipe import Overrides, derive_recipe

sys.path.insert(0, str(Path(__file__).parent))
from recipe_check import binary_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", nargs="+", type=Path, required=True)
    parser.add_argument("--derive-binary", nargs="*", default=[],
                        help="NAME:CLASSES, e.g. retinamnist:2,3,4")
    parser.add_argument("--allowances", nargs="+", type=float, default=[2.0, 0.15])
    args = parser.parse_args()
    sets = [FeatureSet.load(path) for path in args.features]
    by_name = {fs.dataset_name: fs for fs in sets}
    for spec in args.derive_binary:
        name, classes = spec.split(":")
        sets.append(binary_task(by_name[name], {int(c) for c in classes.split(",")}))
    mode = default_refresh()
    params = params_for_mode(mode)
    for hours in args.allowances:
        for features in sets:
            data, recipe = derive_recipe(features, params, Overrides(time_allowance_h=hours))
            mirror = run_plain(data, recipe.config, recipe.activation)["mirror"]
            probe = recipe.probe.test
            seconds = epoch_seconds(len(data.x["train"]), len(data.x["val"]),
                                    recipe.plan.layout, recipe.plan.n_classes, mode)
            print(f"allowance {hours:g} h  {features.dataset_name[:32]:32s}  PCA "
                  f"{recipe.pca_dims}  epochs {recipe.config.epochs} (best "
                  f"{mirror['best_epoch']})  mirror - probe ACC "
                  f"{100 * (mirror['test']['acc'] - probe['acc']):+.2f} AUC "
                  f"{100 * (mirror['test']['auc'] - probe['auc']):+.2f}  estimated "
                  f"{seconds * recipe.config.epochs / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
