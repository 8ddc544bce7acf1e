"""Public bundle size of the N = 10,000 synthetic plans of benchmarks/scale.py, per head and
refresh mode, without training (keys only; issue #24's 600 MB bound).

    python benchmarks/bundle_size.py --heads binary softmax --refresh hospital
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from medblindtuner.he.keys import HospitalKeys, bundle_size_bytes
from medblindtuner.he.params import REFRESH_MODES, params_for_mode
from medblindtuner.hospital.recipe import Overrides, derive_recipe

sys.path.insert(0, str(Path(__file__).parent))
from scale import HEADS, synthetic_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--refresh", nargs="+", default=["hospital"], choices=REFRESH_MODES)
    parser.add_argument("--n-train", type=int, default=10_000)
    args = parser.parse_args()
    for mode in args.refresh:
        for head in args.heads:
            n_classes, dim = HEADS[head]
            params = params_for_mode(mode)
            _, recipe = derive_recipe(synthetic_features(args.n_train, n_classes, dim),
                                      params, Overrides(pca_dims=0))
            plan = recipe.plan
            keys = HospitalKeys.generate(params.with_bootstrap_slots(plan.bootstrap_slots),
                                         plan.rotation_indices,
                                         shard_rotation_indices=plan.kernel_rotation_indices)
            with tempfile.TemporaryDirectory() as tmp:
                bundle = Path(tmp) / "bundle"
                keys.save_public_bundle(bundle)
                files = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.0f}"
                                  for f in sorted(bundle.iterdir()) if f.suffix == ".bin")
                print(f"{head} {mode}: {len(plan.rotation_indices)} rotation keys, bundle "
                      f"{bundle_size_bytes(bundle) / 1e6:.0f} MB ({files} MB)", flush=True)


if __name__ == "__main__":
    main()
