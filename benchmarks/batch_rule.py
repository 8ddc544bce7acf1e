"""Which smallest batch the recipe should ask for: objective gap and cost, train data only.

    python benchmarks/batch_rule.py --features runs/features/breastmnist.npz --min-batch 1 256 512

For each `MIN_BATCH` candidate it derives the product's settings (everything else as the
product does), trains the exact head (plaintext, same batches, schedule, decay), and reports
how far its training objective (mean log-loss + wd/2 |W|^2, the objective the step minimises)
ends above the objective's optimum (L-BFGS), with the steps and ciphertexts it costs. No test
split is read: this is how the rule is chosen without looking at the test set.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import PRODUCTION
from medblindtuner.hospital import budget
from medblindtuner.hospital.recipe import Overrides, derive_recipe
from medblindtuner.training.plain import make_batches, one_hot, train_head


def objective(weights: np.ndarray, x: np.ndarray, y: np.ndarray, n_classes: int,
              wd: float) -> float:
    """Mean log-loss of the head (sigmoid for one row, softmax otherwise) + wd/2 |W|^2."""
    logits = x @ weights.T
    if n_classes == 2:
        z = logits[:, 0]
        loss = np.mean(np.logaddexp(0, z) - y * z)
    else:
        loss = -np.mean(np.sum(one_hot(y, n_classes) * log_softmax(logits, axis=1), axis=1))
    return float(loss + 0.5 * wd * np.sum(weights**2))


def optimum(x: np.ndarray, y: np.ndarray, n_classes: int, wd: float) -> float:
    rows = 1 if n_classes == 2 else n_classes
    shape = (rows, x.shape[1])
    result = minimize(lambda w: objective(w.reshape(shape), x, y, n_classes, wd),
                      np.zeros(rows * x.shape[1]), method="L-BFGS-B",
                      options={"maxiter": 5000, "maxfun": 10**6})
    return float(result.fun)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True)
    parser.add_argument("--min-batch", nargs="+", type=int, default=[1, 128, 256, 512])
    args = parser.parse_args()
    features = FeatureSet.load(args.features)
    rows = []
    for candidate in args.min_batch:
        budget.MIN_BATCH = candidate  # read by budget.derived_batch_size
        data, chosen = derive_recipe(features, PRODUCTION, Overrides())
        config = chosen.config
        x, y = data.x["train"], data.y["train"]
        head = train_head(x, y, data.x["val"], data.y["val"], data.n_classes, config)
        best = optimum(x, y, data.n_classes, config.weight_decay)
        final = objective(head.weights, x, y, data.n_classes, config.weight_decay)
        per_ct = PackingLayout(PRODUCTION.slots, x.shape[1]).samples_per_ct
        sizes = [len(b) for b in make_batches(len(x), config.batch_size, config.seed)]
        # encrypted cost ~ steps x (driver part) + chunk passes x (per-chunk part)
        rows.append({"min_batch": candidate, "batch_size": config.batch_size,
                     "epochs": config.epochs, "steps": config.epochs * len(sizes),
                     "chunk_passes": config.epochs * sum(-(-n // per_ct) for n in sizes),
                     "objective": round(final, 5), "optimum": round(best, 5),
                     "gap": round(final - best, 5)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
