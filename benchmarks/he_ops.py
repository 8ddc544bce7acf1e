"""CKKS engine micro-benchmark on the production parameters (or --insecure-test-params).

    python benchmarks/he_ops.py --out runs/bench/he_ops.json

Measures key generation, bundle sizes, encrypt/decrypt, ct x ct multiply, rotation, sparse and
(optionally) full-slot bootstrapping, and the packed products A @ B^T / A^T @ B (`he.packing`)
for several batch sizes, feature widths and class counts: time, op counts, max error vs numpy,
and peak RSS. Products over many ciphertexts are timed on `--cts` ciphertexts and scaled
linearly (each ciphertext is independent work), which the output states.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import HospitalKeys, bundle_size_bytes
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import INSECURE_TEST, PRODUCTION


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--insecure-test-params", action="store_true")
    parser.add_argument("--features", default="64,193,385,1281")
    parser.add_argument("--batches", default="512,1024")
    parser.add_argument("--classes", default="2,8")
    parser.add_argument("--full-bootstrap", action="store_true", help="also full-slot bootstrap")
    parser.add_argument("--cts", type=int, default=1, help="ciphertexts timed per product")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/he_ops.json"))
    args = parser.parse_args()
    base = INSECURE_TEST if args.insecure_test_params else PRODUCTION
    widths = [int(v) for v in args.features.split(",")]
    layouts = [PackingLayout(base.slots, n) for n in widths]
    slots = {64} | ({base.slots} if args.full_bootstrap else set())
    params = base.with_bootstrap_slots(tuple(sorted(slots)))
    rotations = sorted({r for lay in layouts for r in lay.rotation_indices})
    results: dict = {"params": params.to_dict(), "threads": "OpenMP default"}

    start = time.perf_counter()
    keys = HospitalKeys.generate(params, rotations, allow_insecure=args.insecure_test_params)
    results["keygen_s"] = time.perf_counter() - start
    results["rss_after_keygen_gb"] = rss_gb()
    tmp = Path(tempfile.mkdtemp())
    keys.save_public_bundle(tmp / "bundle")
    keys.save_secret_key(tmp / "sk.bin")
    results["sizes_bytes"] = {
        "public_bundle": bundle_size_bytes(tmp / "bundle"),
        **{p.name: p.stat().st_size for p in (tmp / "bundle").iterdir()},
        "secret_key": (tmp / "sk.bin").stat().st_size,
    }
    print(json.dumps(results, indent=1), flush=True)

    ev = Evaluator(keys.context, params)
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, params.slots)
    level = 11
    results["encrypt_s"], ct = timed(lambda: keys.encrypt(values, level))
    results["decrypt_s"], _ = timed(lambda: keys.decrypt(ct))
    import openfhe as ofhe
    ofhe.SerializeToFile(str(tmp / "ct.bin"), ct, ofhe.BINARY)
    results["sizes_bytes"]["ciphertext_at_data_level"] = (tmp / "ct.bin").stat().st_size
    results["mult_s"], _ = timed(lambda: ev.mul(ct, ct))
    results["rotate_s"], _ = timed(lambda: ev.rotate(ct, 1))
    for boot_slots in sorted(slots):
        periodic = keys.encrypt(np.tile(values[:boot_slots], params.slots // boot_slots), level)
        for _ in range(8):
            periodic = ev.mul_scalar(periodic, 1.0)
        seconds, fresh = timed(lambda p=periodic, s=boot_slots: ev.bootstrap(p, period=s), 2)
        err = float(np.max(np.abs(keys.decrypt(fresh)[:boot_slots] - values[:boot_slots])))
        results[f"bootstrap_{boot_slots}_slots"] = {
            "seconds": seconds, "levels_left_after": ev.levels_left(fresh), "max_error": err}
        print(boot_slots, results[f"bootstrap_{boot_slots}_slots"], flush=True)

    products = []
    for lay in layouts:
        x = rng.uniform(-1, 1, (lay.samples_per_ct, lay.n_features)) / np.sqrt(lay.n_features)
        x_dup = keys.encrypt(lay.encode_x_dup(x), level)
        x_grad = keys.encrypt(lay.encode_x_grad(x), level)
        for n_classes in [int(v) for v in args.classes.split(",")]:
            rows = 1 if n_classes == 2 else n_classes
            w = rng.uniform(-1, 1, (rows, lay.n_features))
            w_cts = [keys.encrypt(lay.encode_weights(r), level) for r in w]
            before = dict(ev.ops.counts)
            start = time.perf_counter()
            z_cts = [ev.rotate_and_sum(ev.mul(x_dup, wc), lay.logit_strides) for wc in w_cts]
            abt = time.perf_counter() - start
            z_err = max(float(np.max(np.abs(lay.decode_per_sample(keys.decrypt(z), len(x))
                                            - x @ r))) for z, r in zip(z_cts, w, strict=True))
            e = rng.uniform(-1, 1, (rows, len(x)))
            e_cts = [keys.encrypt(lay.encode_per_sample(r), level) for r in e]
            start = time.perf_counter()
            g_cts = [ev.rotate_and_sum(ev.mul(ec, x_grad), lay.gradient_strides)
                     for ec in e_cts]
            atb = time.perf_counter() - start
            g_err = max(float(np.max(np.abs(lay.decode_weights(keys.decrypt(g)) - r @ x)))
                        for g, r in zip(g_cts, e, strict=True))
            ops = {k: v - before.get(k, 0) for k, v in ev.ops.counts.items()}
            for batch in [int(v) for v in args.batches.split(",")]:
                n_cts = -(-batch // lay.samples_per_ct)
                products.append({
                    "features_incl_bias": lay.n_features, "classes": n_classes,
                    "batch": batch, "data_ciphertexts": n_cts,
                    "abt_s": abt * n_cts, "atb_s": atb * n_cts,
                    "ops": {k: v * n_cts for k, v in ops.items()},
                    "max_error_abt": z_err, "max_error_atb": g_err,
                    "scaled_from_one_ciphertext": n_cts > 1,
                })
                print(products[-1], flush=True)
    results["products"] = products
    results["peak_rss_gb"] = rss_gb()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in results.items() if k != "products"}, indent=1))


if __name__ == "__main__":
    main()
