"""Sparse bootstrap time and output level per slot count and level budget (production ring).

    python benchmarks/probe_bootstrap.py --slots 512,1024 --budget 2,2 [--magnitudes 1,20,50]

Generates keys (minutes, ~11-20 GB of RAM: run nothing else that holds keys), then bootstraps
a ciphertext of values in [-M, M] twice per slot count and magnitude M (default 20) and
prints time, output level, levels left and max error.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import numpy as np

from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import PRODUCTION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="512,1024")
    parser.add_argument("--budget", default="2,2", help="sparse level budget, e.g. 3,2")
    parser.add_argument("--magnitudes", default="20", help="value bounds M, e.g. 1,20,50")
    args = parser.parse_args()
    slot_counts = tuple(int(v) for v in args.slots.split(","))
    budget = tuple(int(v) for v in args.budget.split(","))
    params = dataclasses.replace(PRODUCTION, sparse_level_budget=budget)
    params = params.with_bootstrap_slots(slot_counts)
    start = time.perf_counter()
    keys = HospitalKeys.generate(params, [1])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"budget {budget}: keys {time.perf_counter() - start:.1f} s, RSS {rss:.1f} GB",
          flush=True)
    ev = Evaluator(keys.context, params, keys.public_key)
    magnitudes = [float(v) for v in args.magnitudes.split(",")]
    for slots, bound in ((s, m) for s in slot_counts for m in magnitudes):
        values = np.tile(np.random.default_rng(0).uniform(-bound, bound, slots),
                         params.slots // slots)
        ct = keys.encrypt(values, 13)
        for _ in range(8):  # bring it near the bottom of the chain, as in training
            ct = ev.mul_scalar(ct, 1.0001)
        for _ in range(2):
            start = time.perf_counter()
            out = ev.bootstrap(ct, period=slots)
            seconds = time.perf_counter() - start
            error = float(np.max(np.abs(keys.decrypt(out) - values * 1.0001**8)))
            print(f"{slots} slots, |x| <= {bound:g}: {seconds:.2f} s, output level "
                  f"{out.GetLevel()} "
                  f"(scale degree {out.GetNoiseScaleDeg()}), {ev.levels_left(out)} levels left, "
                  f"max error {error:.1e}", flush=True)


if __name__ == "__main__":
    main()
