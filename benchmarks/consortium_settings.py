"""The consortium's settings (no HE): how close the union trained with them comes to the
pooled probe, on real and held-out-like sets.

    python benchmarks/consortium_settings.py --features breast.npz retina.npz \
        --stress "10 classes" "7 classes imbalanced" --hospitals 3

Per set: training and validation rows split among the hospitals with skewed class mixes
(`consortium.job.split_among`); the settings agreed by the real rounds
(`consortium.agreement.agree_settings`: secure aggregation, stand-in validation, intervals);
the exact head trained on the union with them (the plaintext twin of the encrypted run, which
equals its mirror) and with the previous fixed settings (PCA 31, weight decay 1e-3, plain
steps); test ACC / AUC against the scikit-learn probe on the union (`fit_probe`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from medblindtuner.consortium.agreement import agree_settings
from medblindtuner.consortium.job import evaluate, split_among
from medblindtuner.consortium.sealing import Roster, SealedMailbox, new_sealing_key
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.params import params_for_mode
from medblindtuner.hospital.reference import fit_probe
from medblindtuner.training.plain import train_head


def one_set(features: FeatureSet, hospitals: int) -> dict:
    n_classes, params = features.n_classes, params_for_mode("hospital")
    shards = split_among(features, hospitals)
    union = {s: tuple(np.concatenate([getattr(h, f"{a}_{s}") for h in shards])
                      for a in ("x", "y")) for s in ("train", "val")}
    x_test, y_test = features.splits["test"]
    probe = fit_probe({**union, "test": (x_test, y_test)}, n_classes)
    out = {"probe": {k: round(probe.test[k], 4) for k in ("acc", "auc")}}
    for name, pca, wd in (("agreed", None, None), ("fixed PCA 31, wd 1e-3", 31, 1e-3)):
        keys = [new_sealing_key() for _ in shards]
        roster = Roster(f"bench-{name}", tuple(bytes(k.public_key) for k in keys))
        agreed = agree_settings(shards, roster, keys, n_classes, params, pca, wd, None,
                                SealedMailbox())
        config = agreed.plan.config
        if pca is not None:  # the previous settings: one step size, no preconditioner
            config = replace(config, preconditioned=False)
        scaled = [agreed.scaler.augment(union[s][0]) for s in ("train", "val")]
        head = train_head(scaled[0], union["train"][1], scaled[1], union["val"][1],
                          n_classes, config)
        scores = evaluate(head.weights, agreed.scaler.augment(x_test), y_test, n_classes)
        out[name] = {"acc_minus_probe": round(scores["acc"] - probe.test["acc"], 4),
                     "auc_minus_probe": round(scores["auc"] - probe.test["auc"], 4),
                     "epochs_run": head.epochs_run, "best_epoch": head.best_epoch,
                     **{k: v for k, v in agreed.why.items() if k != "val_loss"}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=Path, nargs="*", default=[])
    parser.add_argument("--stress", nargs="*", default=[],
                        help="names of tests/stress_sets.py cases")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sets = {p.stem: FeatureSet.load(p) for p in args.features}
    if args.stress:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from stress_sets import CASES, EXTRA_CASES, make_features
        by_name = {c.name: c for c in CASES + EXTRA_CASES}
        sets.update({name: make_features(by_name[name]) for name in args.stress})
    report = {}
    for name, features in sets.items():
        report[name] = one_set(features, args.hospitals)
        print(name, json.dumps(report[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
