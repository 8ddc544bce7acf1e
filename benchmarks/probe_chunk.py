"""Op-level cost of one binary chunk of an encrypted step, per refresh mode and variant.

    flock /work/prod.lock python benchmarks/probe_chunk.py --variants bootstrap hospital

Builds only what a chunk needs (context, relinearisation and the logit rotation keys; no
bootstrapping keys), encrypts one chunk of synthetic samples at the data level of the mode and
a model at the level the refreshed model has, and times `StepKernel.binary_terms` on it with
the evaluator's per-kind seconds (`--repeats` times; the best is printed). Issue #24's chunk
profile: docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import openfhe as ofhe

from medblindtuner.cloud.kernel import StepKernel
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.params import PRODUCTION, build_context, data_level, params_for_mode
from medblindtuner.training.artifacts import EncryptedChunk


def variant_params(name: str):
    """bootstrap | hospital | hospital-2^16 (same depth, twice the ring)."""
    if name == "bootstrap":
        return PRODUCTION
    params = params_for_mode("hospital")
    if name == "hospital-2^16":
        return dataclasses.replace(params, ring_dim=1 << 16, name=params.name + "-2^16")
    return params


def refresh_through_bytes(context, params, keys, ct):
    """A real interactive refresh, every message through bytes as over the wire."""
    from medblindtuner.he.refresh import (
        CloudRefresher,
        RefreshAnswer,
        RefreshRequest,
        masked_share,
    )

    def holder(data: bytes) -> bytes:
        request = RefreshRequest.from_bytes(data)
        return masked_share(context, keys.secretKey, keys.publicKey, request,
                            range(0, params.depth + 1)).to_bytes()

    _ = RefreshAnswer
    return CloudRefresher(context, params, keys.publicKey, holder, "probe").refresh(ct, 0)


def run(name: str, repeats: int, features: int, refreshed: bool, adopt: bool) -> dict:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from scale import synthetic_features

    from medblindtuner.hospital.recipe import Overrides, derive_recipe
    from medblindtuner.training.plan import TrainingPlan

    params = variant_params(name)
    data, recipe = derive_recipe(synthetic_features(2000, 2, features), params,
                                 Overrides(pca_dims=0))
    plan = TrainingPlan.create(params, data.x["train"], data.x["val"], 2, recipe.config,
                               recipe.activation)
    context = build_context(params)
    keys = context.KeyGen()
    start = time.perf_counter()
    context.EvalMultKeyGen(keys.secretKey)
    context.EvalRotateKeyGen(keys.secretKey, plan.kernel_rotation_indices)
    keygen = time.perf_counter() - start
    layout = plan.layout
    level = data_level(params)
    rng = np.random.default_rng(0)
    n = layout.samples_per_ct
    x = rng.normal(0, 0.1, (n, plan.n_features))

    def enc(values, at=level):
        plain = context.MakeCKKSPackedPlaintext(values, 1, at, None, params.slots)
        return context.Encrypt(keys.publicKey, plain)

    chunk = EncryptedChunk(n, enc(layout.encode_x_dup(x)), enc(layout.encode_x_grad(x)),
                           [enc(layout.encode_per_sample(rng.integers(0, 2, n)))])
    w = layout.encode_weights(rng.normal(0, 0.1, plan.n_features))
    model = fresh = [enc(w), enc(w)]
    ev = Evaluator(context, params, keys.publicKey)
    if refreshed and params.refreshed_by_hospital:
        model = [refresh_through_bytes(context, params, keys, ev.mul_scalar(ct, 1.0))
                 for ct in model]
        if adopt:
            model = [ev.adopt(ct) for ct in model]
        error = np.abs(np.array(context.Decrypt(keys.secretKey, model[0]).GetRealPackedValue())
                       - w).max()
        print(f"refreshed model error {error:.2e}", flush=True)
    kernel = StepKernel(ev, plan, [chunk])
    best = None
    for rep in range(repeats):
        for label, weights in (("fresh", fresh), ("refreshed", model)):
            if label == "fresh" and model is fresh:
                continue
            ev.ops.seconds.clear()
            ev.ops.counts.clear()
            start = time.perf_counter()
            lookahead = kernel.unit_lookahead(weights, [1.9, -0.9])
            terms = kernel.binary_terms(lookahead, [(0, 0)], 0.01)
            total = time.perf_counter() - start
            row = {"model": label, "total_s": round(total, 3), **ev.ops.snapshot()}
            print(json.dumps({"rep": rep, **row}), flush=True)
            if label != "fresh" and (best is None or total < best["total_s"]):
                best = row
    return {"variant": name, "refreshed_model": refreshed, "adopted": adopt,
            "ring": params.ring_dim, "depth": params.depth,
            "samples": n, "data_level": level, "terms_level": terms.GetLevel(),
            "kernel_keygen_s": round(keygen, 1),
            "ms_per_sample": round(1000 * best["total_s"] / n, 2), **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["bootstrap", "hospital"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--features", type=int, default=63)
    parser.add_argument("--refreshed", action="store_true",
                        help="hospital mode: the model comes out of a real refresh (bytes)")
    parser.add_argument("--adopt", action="store_true", help="adopt the refreshed model")
    args = parser.parse_args()
    for name in args.variants:
        row = run(name, args.repeats, args.features, args.refreshed, args.adopt)
        print(json.dumps(row), flush=True)
        ofhe.ClearEvalMultKeys()
        ofhe.CryptoContext.ClearEvalAutomorphismKeys()
        ofhe.ReleaseAllContexts()


if __name__ == "__main__":
    main()
