"""Where one production training step spends its time, per operation kind.

    python benchmarks/probe_step.py --features runs/features/retinamnist.npz --steps 2
    python benchmarks/probe_step.py --features runs/features/breastmnist.npz --compare-loaded

Builds the plan with the default settings for the dataset, generates production keys, and runs
`--steps` steps, printing the evaluator's per-kind seconds for each. `--compare-loaded` also
saves the encrypted dataset, reloads it and times steps with both copies (in-memory, loaded
without `Evaluator.adopt`, loaded and adopted), the A/B behind `Evaluator.adopt`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medblindtuner.cloud.trainer import EncryptedTrainer
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import PRODUCTION
from medblindtuner.hospital.crypto import encrypt_dataset
from medblindtuner.hospital.recipe import derive_recipe
from medblindtuner.training.artifacts import EncryptedDataset
from medblindtuner.training.plan import TrainingPlan


def timed_step(trainer: EncryptedTrainer, batch_index: int) -> dict:
    before = trainer.ev.ops.snapshot()
    start = time.perf_counter()
    trainer.step(batch_index)
    after = trainer.ev.ops.snapshot()
    seconds = {k: round(after[k] - before.get(k, 0), 2) for k in after if k.startswith("seconds_")}
    return {"step_s": round(time.perf_counter() - start, 2), **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--compare-loaded", action="store_true")
    args = parser.parse_args()
    data, recipe = derive_recipe(FeatureSet.load(args.features), PRODUCTION)  # product defaults
    plan = TrainingPlan.create(PRODUCTION, data.x["train"], data.x["val"], data.n_classes,
                               recipe.config, recipe.activation)
    params = PRODUCTION.with_bootstrap_slots(plan.bootstrap_slots)
    start = time.perf_counter()
    keys = HospitalKeys.generate(params, plan.rotation_indices,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    print(f"keys {time.perf_counter() - start:.1f} s", flush=True)
    in_memory = encrypt_dataset(keys, plan, data.x["train"], data.y["train"], data.x["val"],
                                data.y["val"])
    work = Path(tempfile.mkdtemp(prefix="probe_step_"))
    variants = {"in memory": (in_memory, keys.public_key)}
    if args.compare_loaded:
        in_memory.save(work / "data", params)
        loaded = EncryptedDataset.load(work / "data", params)
        variants["loaded, not adopted"] = (loaded, None)
        variants["loaded, adopted"] = (loaded, keys.public_key)
    for name, (dataset, public_key) in variants.items():
        trainer = EncryptedTrainer(Evaluator(keys.context, params, public_key), dataset,
                                   work / name.replace(" ", "_").replace(",", ""))
        trainer.initialise_or_resume()
        for step in range(args.steps):
            print(name, json.dumps(timed_step(trainer, step % len(dataset.train))), flush=True)


if __name__ == "__main__":
    main()
