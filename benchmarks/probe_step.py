"""Where one production training step spends its time, per operation kind.

    python benchmarks/probe_step.py --features runs/features/retinamnist.npz --steps 2

Builds the plan with the default settings for the dataset, generates production keys, writes
the public bundle and the encrypted dataset, and runs `--steps` steps on the cloud's side
(`Cloud`: bundle and dataset read from disk, as a service worker reads them), printing the
evaluator's per-kind seconds for each. (The in-memory / loaded / adopted A/B behind
`Evaluator.adopt` was `--compare-loaded` of this script as of commit f34a8c2.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medblindtuner.cloud.cloud import Cloud
from medblindtuner.cloud.trainer import EncryptedTrainer
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import PRODUCTION
from medblindtuner.hospital.crypto import write_encrypted_dataset
from medblindtuner.hospital.recipe import derive_recipe


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
    args = parser.parse_args()
    data, recipe = derive_recipe(FeatureSet.load(args.features), PRODUCTION)  # product defaults
    plan = recipe.plan
    params = PRODUCTION.with_bootstrap_slots(plan.bootstrap_slots)
    start = time.perf_counter()
    keys = HospitalKeys.generate(params, plan.rotation_indices,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    print(f"keys {time.perf_counter() - start:.1f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="probe_step_"))
    write_encrypted_dataset(work / "data", keys, plan, data.x["train"], data.y["train"],
                            data.x["val"], data.y["val"])
    keys.save_public_bundle(work / "bundle")
    del keys  # the cloud's side below holds the public bundle only
    cloud = Cloud(work / "bundle")
    dataset = cloud.load_dataset(work / "data")
    trainer = cloud.trainer(dataset, work / "checkpoints")
    trainer.initialise_or_resume()
    for step in range(args.steps):
        print("cloud", json.dumps(timed_step(trainer, step % len(dataset.train))), flush=True)


if __name__ == "__main__":
    main()
