"""`python -m medblindtuner.consortium`: a consortium run in one process (refresh mode
"hospital", the default, runs at 128 bits; "bootstrap" does not fit the production ring,
docs/security.md). The same as `medblindtuner consortium run`.

    python -m medblindtuner.consortium --features breast.npz --hospitals 3
    python -m medblindtuner.consortium --synthetic --insecure-test-params

Prints the job's report (`consortium.job.report_of`) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.params import HOSPITAL, REFRESH_MODES

from .job import run_job, skewed_split, synthetic_features

__all__ = ["main", "skewed_split", "synthetic_features"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medblindtuner.consortium")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, help="a FeatureSet .npz (train/val/test)")
    source.add_argument("--synthetic", action="store_true", help="Gaussian blobs, 16 dims")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--pca", type=int, default=None,
                        help="PCA width (default: chosen; 0: every feature)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="L2 weight decay (default: chosen in validation rounds)")
    parser.add_argument("--refresh", choices=REFRESH_MODES, default=HOSPITAL,
                        help="hospital: joint refresh by all members (fits 128-bit); "
                             "bootstrap: joint bootstrapping keys (insecure ring only)")
    parser.add_argument("--insecure-test-params", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        features = (synthetic_features() if args.synthetic else FeatureSet.load(args.features))
        _result, report = run_job(features, args.hospitals, args.refresh,
                                  args.insecure_test_params, args.workdir, args.pca,
                                  args.epochs, args.weight_decay, log=print)
    except (MedBlindTunerError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
