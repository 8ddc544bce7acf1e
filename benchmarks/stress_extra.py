"""The larger stress sets (tests/stress_sets.py `EXTRA_CASES`), in plaintext: with every
setting derived (defaults), the polynomial mirror, which the encrypted head equals, against
the tuned probe, as the fast suite checks its sets (tests/test_recipe_stress.py).

    python benchmarks/stress_extra.py [NAME ...]      # a markdown row per set
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from medblindtuner.experiment import run_plain
from medblindtuner.he.params import default_refresh, params_for_mode
from medblindtuner.hospital.recipe import derive_recipe

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from stress_sets import EXTRA_CASES, make_features  # noqa: E402


def main() -> None:
    names = sys.argv[1:]
    print("| set | probe ACC / AUC | mirror ACC / AUC | mirror − probe | PCA | epochs (best) "
          "| logit bound | s |\n|---|---|---|---|---|---|---|---|")
    with threadpool_limits(1):
        for case in EXTRA_CASES:
            if names and case.name not in names:
                continue
            start = time.perf_counter()
            data, recipe = derive_recipe(make_features(case),
                                         params_for_mode(default_refresh()))
            mirror = run_plain(data, recipe.config, recipe.activation)["mirror"]
            probe, test = recipe.probe.test, mirror["test"]
            print(f"| {case.name} | {probe['acc']:.4f} / {probe['auc']:.4f} | "
                  f"{test['acc']:.4f} / {test['auc']:.4f} | "
                  f"{100 * (test['acc'] - probe['acc']):+.2f} / "
                  f"{100 * (test['auc'] - probe['auc']):+.2f} | {recipe.pca_dims} | "
                  f"{recipe.config.epochs} ({mirror['best_epoch']}) | "
                  f"{recipe.activation.logit_bound:g} | {time.perf_counter() - start:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
