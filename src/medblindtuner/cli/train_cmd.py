"""`medblindtuner train-plain` and `train-encrypted`: experiments on one machine.

`train-plain` trains the exact head and its polynomial mirror (numpy). `train-encrypted` plays
both roles in one process (hospital keys + cloud trainer) to measure encrypted training; the
two-process deployment is `serve` + `hospital`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .options import (
    TIME_ALLOWANCE_HOURS,
    BatchOpt,
    EpochsOpt,
    LrOpt,
    MomentumOpt,
    PatienceOpt,
    PcaOpt,
    RefreshOpt,
    SeedOpt,
    TimeAllowanceOpt,
    WeightDecayOpt,
    overrides,
    refresh_params,
)

console = Console()

FeaturesOpt = Annotated[Path | None, typer.Option(
    help="Feature file written by `medblindtuner features --out` (.npz).")]
DatasetOpt = Annotated[str, typer.Option(
    help="MedMNIST flag or .npz, used when --features is not given (features are cached).")]
BackboneOpt = Annotated[str, typer.Option(help="Backbone for --dataset extraction.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write machine-readable results.")]


def load_features(features: Path | None, dataset: str, backbone: str):
    """Features from a file, or extracted (cached) from a MedMNIST dataset."""
    from ..features import FeatureSet, extract_features

    if features is not None:
        if not features.exists():
            raise typer.BadParameter(f"{features} does not exist", param_hint="--features")
        return FeatureSet.load(features)
    from ..data import load_medmnist

    return extract_features(load_medmnist(dataset), backbone=backbone)


def _print_runs(runs: dict) -> None:
    table = Table(title="Test results")
    for column in ("run", "ACC", "AUC", "epochs", "best", "steps", "wall s"):
        table.add_column(column)
    def cell(run: dict, key: str, fmt: str = "{}") -> str:
        return fmt.format(run[key]) if run.get(key) is not None else "-"

    for run in runs.values():
        table.add_row(run["label"], f"{run['test']['acc']:.4f}", f"{run['test']['auc']:.4f}",
                      cell(run, "epochs"), cell(run, "best_epoch"), cell(run, "steps"),
                      cell(run, "wall_time_s", "{:.1f}"))
    console.print(table)


def _write_json(path: Path | None, results: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))
    console.print(f"results written to {path}")


app = typer.Typer()

@app.command("train-plain")
def train_plain(
    features: FeaturesOpt = None,
    dataset: DatasetOpt = "breastmnist",
    backbone: BackboneOpt = "efficientnet_lite0",
    pca: PcaOpt = None,
    lr: LrOpt = None,
    momentum: MomentumOpt = None,
    weight_decay: WeightDecayOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    patience: PatienceOpt = 4,
    time_allowance: TimeAllowanceOpt = TIME_ALLOWANCE_HOURS,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
) -> None:
    """Train the plaintext head (exact and polynomial mirror) next to the tuned probe."""
    from ..experiment import reference_runs, run_plain
    from ..hospital.recipe import derive_recipe
    from ..training.approx import RangeError

    given = overrides(pca, lr, momentum, weight_decay, epochs, batch_size, patience, seed,
                      time_allowance=time_allowance)
    feature_set = load_features(features, dataset, backbone)
    console.print("training settings (derived from train/validation unless given):")
    try:
        data, recipe = derive_recipe(feature_set, given=given, log=console.print)
        runs = run_plain(data, recipe.config, recipe.activation)
    except RangeError as exc:
        console.print(f"[red]the polynomial mirror left its interval:[/] {exc}\n"
                      "These settings cannot be trained encrypted; lower --lr/--epochs.")
        raise typer.Exit(2) from exc
    runs = {**reference_runs(data, recipe), **runs}
    _print_runs(runs)
    _write_json(json_path, {"dataset": data.name, "n_classes": data.n_classes,
                            "backbone": data.backbone, "config": recipe.config.to_dict(),
                            "recipe": recipe.to_dict(), "scaler": data.scaler,
                            "runs": runs})

@app.command("train-encrypted")
def train_encrypted(
    features: FeaturesOpt = None,
    dataset: DatasetOpt = "breastmnist",
    backbone: BackboneOpt = "efficientnet_lite0",
    pca: PcaOpt = None,
    lr: LrOpt = None,
    momentum: MomentumOpt = None,
    weight_decay: WeightDecayOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    patience: PatienceOpt = 4,
    time_allowance: TimeAllowanceOpt = TIME_ALLOWANCE_HOURS,
    seed: SeedOpt = 0,
    fixed_epochs: Annotated[bool, typer.Option(
        help="No interaction: train all epochs, keep the last.")] = False,
    workdir: Annotated[Path, typer.Option(help="Keys, ciphertexts, checkpoints.")] = Path(
        "runs/train-encrypted"),
    insecure_test_params: Annotated[bool, typer.Option(
        help="Tiny INSECURE ring for tests/quick looks; never for real data.")] = False,
    ray_address: Annotated[str, typer.Option(
        help="Where the steps' chunks are computed: 'local' (this process), or a Ray cluster "
             "('auto', 'host:port', 'ray://host:port'; one actor per node).")] = "local",
    refresh: RefreshOpt = None,
    json_path: JsonOpt = None,
) -> None:
    """Encrypted training (both roles, one process) next to the plaintext trainers."""
    from ..experiment import run_encrypted
    from ..hospital.hospital import Hospital
    from ..training.approx import RangeError

    if insecure_test_params:
        console.print("[bold red]WARNING: insecure test parameters (ring 4096): "
                      "no security at all.[/]")
    given = overrides(pca, lr, momentum, weight_decay, epochs, batch_size, patience, seed,
                      time_allowance=time_allowance)
    feature_set = load_features(features, dataset, backbone)
    params = refresh_params(refresh, insecure_test_params)
    console.print(f"refresh mode: {params.refresh} ({params.name}, ring {params.ring_dim})")
    hospital = Hospital(workdir, insecure_test_params=insecure_test_params,
                        refresh=params.refresh,
                        log=console.print)
    console.print("training settings (derived from train/validation unless given):")
    try:
        hospital.prepare(feature_set, given)
        results = run_encrypted(hospital, interactive=not fixed_epochs, log=console.print,
                                ray_address=ray_address)
    except RangeError as exc:
        console.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(2) from exc
    _print_runs(results["runs"])
    enc = results["runs"]["encrypted"]
    console.print(f"bootstraps/step {enc['ops']['per_step'].get('bootstraps', 0):.2f}, "
                  f"s/step {enc['seconds_per_step']:.1f}, max |w_enc - w_mirror| "
                  f"{enc['max_abs_weight_diff_vs_mirror']:.2e}")
    _write_json(json_path, results)
