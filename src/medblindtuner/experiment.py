"""Experiment pipelines shared by the CLI and the benchmarks.

`run_plain`: exact and mirror trainers with identical settings.
`run_encrypted`: keys, encryption, encrypted training with early stopping, decryption and
evaluation next to both plaintext trainers (single process, both roles: for experiments).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medblindtuner.cloud.cloud import Cloud
from medblindtuner.cloud.cluster import LOCAL
from medblindtuner.he.keys import bundle_size_bytes
from medblindtuner.he.params import CkksParams
from medblindtuner.he.refresh import CloudRefresher
from medblindtuner.hospital.crypto import HospitalJudge
from medblindtuner.hospital.hospital import Hospital
from medblindtuner.hospital.recipe import PreparedData, Recipe
from medblindtuner.hospital.reference import published_run
from medblindtuner.training.approx import ActivationPlan
from medblindtuner.training.plain import (
    VALIDATION_LOSS_NAME,
    TrainConfig,
    evaluate,
    train_head,
)
from medblindtuner.training.plan import TrainingPlan


def _run_summary(label: str, result, data: PreparedData) -> dict:
    return {
        "label": label,
        "test": evaluate(result.weights, data.x["test"], data.y["test"], data.n_classes),
        "val": {k: v for k, v in evaluate(result.weights, data.x["val"], data.y["val"],
                                          data.n_classes).items() if k in ("acc", "auc")},
        "history": result.history,
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "wall_time_s": result.wall_time_s,
        "weights": result.weights.tolist(),
    }


def encrypted_run_summary(weights: np.ndarray, data: PreparedData, *, history: list[dict],
                          epochs: int, best_epoch: int, steps: int, wall_time_s: float,
                          ops: dict, mirror_weights: np.ndarray) -> dict:
    """Report entry of an encrypted run from the hospital's decrypted weights."""
    steps_nonzero = max(steps, 1)
    return {
        "label": "Encrypted (CKKS, cloud)",
        "test": evaluate(weights, data.x["test"], data.y["test"], data.n_classes),
        "val": {k: v for k, v in evaluate(weights, data.x["val"], data.y["val"],
                                          data.n_classes).items() if k in ("acc", "auc")},
        "history": history,
        "epochs": epochs,
        "best_epoch": best_epoch,
        "steps": steps,
        "wall_time_s": wall_time_s,
        "seconds_per_step": wall_time_s / steps_nonzero,
        "ops": {**ops, "per_step": {k: v / steps_nonzero for k, v in ops.items()
                                    if isinstance(v, int | float)}},
        "max_abs_weight_diff_vs_mirror": float(np.max(np.abs(weights - mirror_weights))),
        "weights": np.asarray(weights).tolist(),
    }


def run_plain(data: PreparedData, config: TrainConfig, activation: ActivationPlan | None = None,
              layout=None) -> dict:
    """Exact head and polynomial mirror, same batches, same schedule."""
    activation = activation or ActivationPlan.default(data.n_classes)
    args = (data.x["train"], data.y["train"], data.x["val"], data.y["val"], data.n_classes, config)
    exact = train_head(*args)
    mirror = train_head(*args, activation=activation, layout=layout)
    return {
        "plaintext": _run_summary("Plaintext (exact head)", exact, data),
        "mirror": {**_run_summary("Plaintext mirror (same polynomials)", mirror, data),
                   "max_abs_logit_slot": mirror.max_abs_logit},
    }


def reference_runs(data: PreparedData, recipe: Recipe) -> dict:
    """The bar the encrypted run is judged against: the tuned probe and, for a MedMNIST flag,
    the published ResNet-18 (28) row (`runs` entries of the report schema)."""
    runs = {"probe": recipe.probe.to_run()}
    if (published := published_run(data.name)) is not None:
        runs["published"] = published
    return runs


def artifact_sizes(bundle: Path, secret_key: Path, dataset: Path) -> dict[str, int]:
    """Sizes the report shows: what is uploaded, what stays home, one data ciphertext."""
    return {
        "public_bundle": bundle_size_bytes(bundle),
        "secret_key": Path(secret_key).stat().st_size,
        "encrypted_dataset": bundle_size_bytes(dataset),
        "ciphertext": (Path(dataset) / "train_0000_x_dup.bin").stat().st_size,
    }


def experiment_header(data: PreparedData, plan: TrainingPlan, params: CkksParams,
                      recipe: Recipe | None = None) -> dict:
    """The parts of a results dict that describe the run (report schema)."""
    return {
        **({"recipe": recipe.to_dict()} if recipe is not None else {}),
        "dataset": data.name,
        "n_classes": data.n_classes,
        "backbone": data.backbone,
        "scaler": data.scaler,
        "loss_name": VALIDATION_LOSS_NAME,
        "config": plan.config.to_dict(),
        "activation": plan.activation.to_dict(),
        "ckks": {**params.to_dict(), "slots": params.slots, "secure": params.is_secure},
    }


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def in_process_refresher(hospital: Hospital, context, public_key, journal: Path,
                         judge: HospitalJudge | None = None) -> CloudRefresher | None:
    """Refresh mode "hospital" with both roles in one process (train-encrypted, experiments,
    the API's local cloud): the cloud's refresher asks this hospital's ledger through the same
    request and answer bytes as over the service. None in bootstrap mode."""
    if not hospital.params.refreshed_by_hospital:
        return None
    holder = hospital.refresher(judge)
    return CloudRefresher(context, hospital.params, public_key, holder, holder.job, journal)


def run_encrypted(
    hospital: Hospital,
    interactive: bool = True,
    log: Callable[[str], None] = print,
    ray_address: str = LOCAL,
) -> dict:
    """Both roles in one process, after `hospital.prepare(...)`: keys, encryption, the cloud's
    training (here, with only the public bundle's context; the chunks' kernels on the Ray
    cluster at `ray_address` unless `local`), decryption, evaluation next to the plaintext
    trainers; returns a results dict in the report's schema."""
    data, recipe, plan = hospital.data, hospital.recipe, hospital.plan
    if data is None or recipe is None or plan is None:
        raise ValueError("run_encrypted needs a prepared hospital (Hospital.prepare)")
    workdir = hospital.folder.root
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    config = plan.config
    log(f"plan: {len(plan.train_batch_sizes)} batches of <= {config.batch_size} samples, "
        f"{plan.layout.n_features} features (block {plan.layout.block}), {plan.rows} weight "
        f"row(s), refreshed by {hospital.params.refresh}")
    if (hint := plan.batch_hint()) is not None:
        log(f"note: {hint}")
    plain = run_plain(data, config, plan.activation, plan.layout)

    start = time.perf_counter()
    hospital.generate_keys()
    params = hospital.params
    timings["keygen"] = time.perf_counter() - start
    log(f"keys generated and saved in {timings['keygen']:.1f} s ({params.name}, ring "
        f"{params.ring_dim})")

    start = time.perf_counter()
    with tqdm(total=plan.n_chunks, desc="encrypt chunks", unit="chunk") as bar:
        hospital.encrypt_dataset(progress=bar.update)
    timings["encrypt"] = time.perf_counter() - start
    # the cloud's role: the public bundle only, as a service worker would load it
    cloud = Cloud(hospital.folder.public_bundle, allow_insecure=hospital.insecure_test_params)
    judge = hospital.judge() if interactive else None
    cloud.evaluator.refresher = in_process_refresher(
        hospital, cloud.crypto.context, cloud.crypto.public_key, workdir / "refresh_journal",
        judge)
    total_steps = config.epochs * len(plan.train_batch_sizes)
    with tqdm(total=total_steps, desc="encrypted training", unit="step") as bar:
        def on_step(info: dict) -> None:
            bar.update(1)
            bar.set_postfix(epoch=info["epoch"], s_per_step=f"{info['step_seconds']:.1f}",
                            bootstraps=info["bootstraps"])
        run = cloud.run_training(hospital.folder.encrypted_dataset, workdir / "checkpoints",
                                 hospital.folder.result, decide=judge, on_step=on_step,
                                 ray_address=ray_address, log=log)
    state = run.state
    timings["training"] = run.train_seconds
    weights = hospital.decrypt_result()
    timings["total"] = time.perf_counter() - t0

    history = [{"epoch": r["epoch"], **({"val_loss": judge.losses.get(r["epoch"])}
                                        if judge is not None else {})} for r in state.history]
    encrypted = encrypted_run_summary(
        weights, data, history=history, epochs=state.epoch, best_epoch=state.best_epoch,
        steps=state.steps, wall_time_s=timings["training"], ops=cloud.evaluator.ops.snapshot(),
        mirror_weights=np.asarray(plain["mirror"]["weights"]))
    return {
        **experiment_header(data, plan, params, recipe),
        "sizes_bytes": artifact_sizes(hospital.folder.public_bundle, hospital.folder.secret_key,
                                      hospital.folder.encrypted_dataset),
        "peak_rss_bytes": {"process": peak_rss_bytes()},
        "timings_s": timings,
        "runs": {**reference_runs(data, recipe), **plain, "encrypted": encrypted},
    }
