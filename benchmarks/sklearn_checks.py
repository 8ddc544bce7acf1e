"""scikit-learn's estimator checks on `EncryptedHeadClassifier` (insecure test ring, 1 epoch).

    python benchmarks/sklearn_checks.py --out runs/bench/sklearn_checks.json --check-seconds 60

Runs every check `check_estimator` runs (`estimator_checks_generator`), one by one, each under
a time limit (a fit is keys + encryption + encrypted training, so checks that fit many times
run long); prints and writes each outcome with the first line of its error. docs/sklearn.md
discusses them.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import warnings
from pathlib import Path

from sklearn.utils.estimator_checks import estimator_checks_generator

from medblindtuner import EncryptedHeadClassifier


class CheckTimeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise CheckTimeout


def run_check(estimator, check, seconds: int) -> dict:
    name = getattr(check, "func", check).__name__
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(estimator)
        status, error = "passed", ""
    except CheckTimeout:
        status, error = "timeout", f"over {seconds} s"
    except Exception as exc:  # noqa: BLE001 - every outcome is recorded
        status = "skipped" if type(exc).__name__ == "SkipTest" else "failed"
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[0][:240] if lines else ''}"
    finally:
        signal.alarm(0)
    return {"check": name, "status": status, "error": error,
            "seconds": round(time.perf_counter() - started, 1)}


def warm_up() -> None:
    """Import what a fit imports (torch, through the feature set) before any time limit: a
    limit that fires inside an import leaves the module half-initialised for every later
    check."""
    import medblindtuner.cloud.cloud  # noqa: F401
    import medblindtuner.features.extract  # noqa: F401
    import medblindtuner.hospital.hospital  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/sklearn_checks.json"))
    parser.add_argument("--check-seconds", type=int, default=60)
    args = parser.parse_args()
    records = []
    warm_up()
    checks = estimator_checks_generator(
        EncryptedHeadClassifier(epochs=1, insecure_test_params=True), legacy=True)
    for estimator, check in checks:
        records.append(run_check(estimator, check, args.check_seconds))
        print(json.dumps(records[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=2))
    print({s: sum(r["status"] == s for r in records)
           for s in ("passed", "failed", "skipped", "timeout")})


if __name__ == "__main__":
    main()
