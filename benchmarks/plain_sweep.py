"""Plaintext sweep over PCA width, batch size and learning rate: which settings the encrypted
run can afford (exact vs polynomial-mirror accuracy, and whether the mirror stays inside the
approximation intervals on every slot of the encrypted layout).

A step costs the same whatever its batch fills of a data ciphertext (`slots / (2 d)` samples,
d = next_pow2(PCA + 1)), so the width decides how many samples one step can take.

Example:
    python benchmarks/plain_sweep.py --features runs/features/retinamnist.npz \
        --pca 63,31 --batch-sizes 256,512 --lrs 1,2,3,4 --out runs/bench/plain_sweep_retina.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import PRODUCTION
from medblindtuner.hospital.recipe import prepare_features
from medblindtuner.training.approx import ActivationPlan, RangeError
from medblindtuner.training.plain import TrainConfig, evaluate, train_head
from medblindtuner.training.plan import RANGE_MARGIN


def _numbers(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, type=Path)
    parser.add_argument("--pca", default="63,31", help="comma-separated PCA widths")
    parser.add_argument("--batch-sizes", default="256,512")
    parser.add_argument("--lrs", default="1,2,3,4")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    features = FeatureSet.load(args.features)
    rows = []
    for pca in _numbers(args.pca, int):
        data = prepare_features(features, pca)
        layout = PackingLayout(PRODUCTION.slots, data.x["train"].shape[1])
        activation = ActivationPlan.default(data.n_classes)
        split = (data.x["train"], data.y["train"], data.x["val"], data.y["val"])
        for batch, lr in itertools.product(_numbers(args.batch_sizes, int), _numbers(args.lrs)):
            batch = min(batch, layout.samples_per_ct)  # what TrainingPlan.create does
            if any(r["pca"] == pca and r["batch_size"] == batch and r["lr"] == lr for r in rows):
                continue
            config = TrainConfig(learning_rate=lr, epochs=args.epochs, batch_size=batch,
                                 patience=args.patience)
            exact = train_head(*split, data.n_classes, config)
            row = {"pca": pca, "samples_per_ct": layout.samples_per_ct, "batch_size": batch,
                   "lr": lr, "steps_per_epoch": -(-len(data.y["train"]) // batch),
                   "exact": evaluate(exact.weights, data.x["test"], data.y["test"],
                                     data.n_classes),
                   "exact_best_epoch": exact.best_epoch}
            try:
                mirror = train_head(*split, data.n_classes, config, activation=activation,
                                    layout=layout)
            except RangeError as exc:
                row["mirror"] = None
                row["range_error"] = str(exc)
            else:
                row["mirror"] = evaluate(mirror.weights, data.x["test"], data.y["test"],
                                         data.n_classes)
                row["max_abs_logit_slot"] = mirror.max_abs_logit
                bound = RANGE_MARGIN * activation.logit_bound
                row["passes_range_check"] = mirror.max_abs_logit <= bound
            rows.append(row)
            mirror_text = ("leaves the interval" if row["mirror"] is None else
                           f"{row['mirror']['acc']:.4f} / {row['mirror']['auc']:.4f}, max |logit "
                           f"slot| {row['max_abs_logit_slot']:.2f}"
                           + ("" if row["passes_range_check"]
                              else f" (over the {RANGE_MARGIN} margin)"))
            print(f"PCA {pca:3d} batch {batch:4d} ({row['steps_per_epoch']} steps/epoch) "
                  f"lr {lr:g}: "
                  f"exact {row['exact']['acc']:.4f} / {row['exact']['auc']:.4f}; mirror "
                  f"{mirror_text}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        slim = [{k: ({m: v[m] for m in ("acc", "auc")} if isinstance(v, dict) else v)
                 for k, v in row.items()} for row in rows]
        args.out.write_text(json.dumps({"features": str(args.features), "rows": slim}, indent=2))


if __name__ == "__main__":
    main()
