"""Memory and time of OpenFHE's sparse bootstrapping per slot count, production parameters.

    python benchmarks/bootstrap_memory.py --slots 512 2048 --out runs/bench/bootstrap_memory.json

Builds the production context, then for each slot count runs `EvalBootstrapSetup` (the public
precomputation every cloud process redoes) and `EvalBootstrapKeyGen`, recording the resident
set after each, then times two bootstraps per slot count and their largest error. This is what
a softmax plan pays per distinct bootstrap slot count (`TrainingPlan.bootstrap_slots`).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from medblindtuner.he.params import PRODUCTION, build_context, level_budget_for


def rss_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return round(int(line.split()[1]) / 2**20, 2)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    params = PRODUCTION
    context = build_context(params)
    out: dict = {"slots": args.slots, "rss_gib": {"context": rss_gib()}, "seconds": {}}
    for slots in args.slots:
        start = time.perf_counter()
        context.EvalBootstrapSetup(list(level_budget_for(params, slots)), [0, 0], slots)
        out["seconds"][f"setup_{slots}"] = round(time.perf_counter() - start, 1)
        out["rss_gib"][f"after_setup_{slots}"] = rss_gib()
    pair = context.KeyGen()
    context.EvalMultKeyGen(pair.secretKey)
    out["rss_gib"]["after_key_pair_and_mult_key"] = rss_gib()
    for slots in args.slots:
        start = time.perf_counter()
        context.EvalBootstrapKeyGen(pair.secretKey, slots)
        out["seconds"][f"keygen_{slots}"] = round(time.perf_counter() - start, 1)
        out["rss_gib"][f"after_keygen_{slots}"] = rss_gib()
    rng = np.random.default_rng(0)
    for slots in args.slots:
        values = np.tile(rng.uniform(-1, 1, slots), params.slots // slots)
        ct = context.Encrypt(pair.publicKey,
                             context.MakeCKKSPackedPlaintext(values.tolist(), 1, params.depth - 1))
        times = []
        for _ in range(2):
            work = ct.Clone()
            work.SetSlots(slots)
            start = time.perf_counter()
            fresh = context.EvalBootstrap(work)
            times.append(round(time.perf_counter() - start, 1))
            fresh.SetSlots(params.slots)
        plain = context.Decrypt(pair.secretKey, fresh)
        plain.SetLength(params.slots)
        error = float(np.max(np.abs(np.array(plain.GetRealPackedValue()) - values)))
        out["seconds"][f"bootstrap_{slots}"] = times
        out[f"max_error_{slots}"] = float(f"{error:.2e}")
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
