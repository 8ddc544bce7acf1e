"""Op-level cost of a binary step's chunk work, per refresh mode and variant (issue #24).

    flock /work/prod.lock python benchmarks/probe_chunk.py chunk --variants bootstrap hospital
    flock /work/prod.lock python benchmarks/probe_chunk.py step --repeats 2

`chunk`: one chunk of synthetic samples at the mode's data level, a model at level 0 (a
refreshed one: `--refreshed`, through a real interactive refresh as bytes), timed through
`StepKernel.binary_terms` with the evaluator's per-kind seconds: what one chunk costs.
`step`: refresh mode "hospital", the chunks of one step at N = 10,000 (6 of 128 samples at
PCA 63), timed three ways in turns in one process (so load drifts alike): a sigmoid per chunk
(`binary_terms`), one sigmoid a step (`EncryptedTrainer._compact_terms`) without the level
drops, and with them (as trained). Only what these need is generated (relinearisation and
rotation keys, no bootstrapping key). Results: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.cloud.cloud import Cloud
from medblindtuner.cloud.kernel import StepKernel
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.params import PRODUCTION, build_context, data_level, params_for_mode
from medblindtuner.training.artifacts import EncryptedChunk

sys.path.insert(0, str(Path(__file__).parent))
from scale import synthetic_features  # noqa: E402

INSECURE = False  # --insecure-test-params: the tiny test ring, to try the script quickly


def setup(mode: str, n_train: int, features: int = 63):
    """Plan, context with its keys (relinearisation, every rotation of the plan)."""
    from medblindtuner.hospital.recipe import Overrides, derive_recipe
    from medblindtuner.training.plan import TrainingPlan

    params = params_for_mode(mode, INSECURE) if INSECURE or mode != "bootstrap" else PRODUCTION
    data, recipe = derive_recipe(synthetic_features(n_train, 2, features), params,
                                 Overrides(pca_dims=0))
    plan = TrainingPlan.create(params, data.x["train"], data.x["val"], 2, recipe.config,
                               recipe.activation)
    context = build_context(params)
    keys = context.KeyGen()
    context.EvalMultKeyGen(keys.secretKey)
    context.EvalRotateKeyGen(keys.secretKey, plan.rotation_indices)
    return params, plan, context, keys


def encrypted_chunks(params, plan, context, keys, count: int, seed: int = 0):
    layout, level = plan.layout, data_level(params)
    rng = np.random.default_rng(seed)

    def enc(values):
        plain = context.MakeCKKSPackedPlaintext(values, 1, level, None, params.slots)
        return context.Encrypt(keys.publicKey, plain)

    chunks = []
    for _ in range(count):
        n = layout.samples_per_ct
        x = rng.normal(0, 0.1, (n, plan.n_features))
        chunks.append(EncryptedChunk(n, enc(layout.encode_x_dup(x)), enc(layout.encode_x_grad(x)),
                                     [enc(layout.encode_per_sample(rng.integers(0, 2, n)))]))
    w = layout.encode_weights(rng.normal(0, 0.1, plan.n_features))
    return chunks, [enc(w), enc(w)]


def in_process_refresher(context, params, keys):
    """A real interactive refresh, every message through bytes as over the wire."""
    from medblindtuner.he.refresh import CloudRefresher, RefreshRequest, masked_share

    def holder(data: bytes) -> bytes:
        return masked_share(context, keys.secretKey, keys.publicKey,
                            RefreshRequest.from_bytes(data), range(0, params.depth + 1)
                            ).to_bytes()

    return CloudRefresher(context, params, keys.publicKey, holder, "probe")


def timed(ev: Evaluator, work) -> dict:
    ev.ops.seconds.clear()
    ev.ops.counts.clear()
    start = time.perf_counter()
    work()
    return {"total_s": round(time.perf_counter() - start, 3), **ev.ops.snapshot()}


def chunk_probe(mode: str, repeats: int, refreshed: bool) -> dict:
    params, plan, context, keys = setup(mode, 2000)
    (chunk,), model = encrypted_chunks(params, plan, context, keys, 1)
    ev = Cloud.sharing_context(context, params, keys.publicKey).evaluator
    if refreshed and params.refreshed_by_hospital:
        refresher = in_process_refresher(context, params, keys)
        model = [refresher.refresh(ev.mul_scalar(ct, 1.0), 0) for ct in model]
    kernel = StepKernel(ev, plan, [chunk])
    rows = [timed(ev, lambda: kernel.binary_terms(kernel.unit_lookahead(model, [1.9, -0.9]),
                                                  [(0, 0)], 0.01)) for _ in range(repeats)]
    best = min(rows, key=lambda r: r["total_s"])
    return {"probe": "chunk", "mode": mode, "refreshed_model": refreshed,
            "ring": params.ring_dim, "depth": params.depth, "samples": chunk.n_samples,
            "ms_per_sample": round(1000 * best["total_s"] / chunk.n_samples, 2), **best}


def step_probe(repeats: int) -> list[dict]:
    from medblindtuner.training.artifacts import EncryptedDataset

    params, plan, context, keys = setup("hospital", 10000)
    count = plan.chunks_per_step
    chunks, model = encrypted_chunks(params, plan, context, keys, count)
    cloud = Cloud.sharing_context(context, params, keys.publicKey, evaluator_options={
        "refresher": in_process_refresher(context, params, keys)})
    ev = cloud.evaluator
    dataset = EncryptedDataset(plan, chunks, [], adopt=ev.adopt)
    trainer = cloud.trainer(dataset, Path(tempfile.mkdtemp(prefix="probe_step_")))
    trainer.model = model
    placed, scale = list(enumerate(range(count))), 0.01
    kernel = trainer.kernel
    drop_to = ev.drop_to
    variants = {
        "sigmoid per chunk": lambda: kernel.binary_terms(
            kernel.unit_lookahead(model, [1.9, -0.9]), placed, scale),
        "one sigmoid, no level drops": lambda: trainer._compact_terms(placed, scale),
        "one sigmoid, level drops": lambda: trainer._compact_terms(placed, scale),
    }
    rows: dict[str, dict] = {}
    for _ in range(repeats):
        for name, work in variants.items():
            ev.drop_to = (lambda ct, level: ct) if "no level" in name else drop_to
            row = timed(ev, work)
            if name not in rows or row["total_s"] < rows[name]["total_s"]:
                rows[name] = row
    return [{"probe": "step", "variant": name, "chunks": count,
             "samples": count * plan.layout.samples_per_ct,
             "ms_per_sample": round(1000 * row["total_s"] / (count * plan.layout.samples_per_ct),
                                    2), **row} for name, row in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["chunk", "step"])
    parser.add_argument("--variants", nargs="+", default=["bootstrap", "hospital"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--refreshed", action="store_true",
                        help="chunk: the model comes out of a real refresh (bytes)")
    parser.add_argument("--insecure-test-params", action="store_true")
    args = parser.parse_args()
    global INSECURE
    INSECURE = args.insecure_test_params
    if args.probe == "step":
        for row in step_probe(args.repeats):
            print(json.dumps(row), flush=True)
        return
    for mode in args.variants:
        print(json.dumps(chunk_probe(mode, args.repeats, args.refreshed)), flush=True)
        ofhe.ClearEvalMultKeys()
        ofhe.CryptoContext.ClearEvalAutomorphismKeys()
        ofhe.ReleaseAllContexts()


if __name__ == "__main__":
    main()
