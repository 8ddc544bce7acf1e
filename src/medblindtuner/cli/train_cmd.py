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

from ..training.plain import DEFAULT_PCA_DIMS, TrainConfig

console = Console()
_D = TrainConfig()

FeaturesOpt = Annotated[Path | None, typer.Option(
    help="Feature file written by `medblindtuner features --out` (.npz).")]
DatasetOpt = Annotated[str, typer.Option(
    help="MedMNIST flag or .npz, used when --features is not given (features are cached).")]
BackboneOpt = Annotated[str, typer.Option(help="Backbone for --dataset extraction.")]
PcaOpt = Annotated[int, typer.Option(help="PCA dimensions (hospital side, fitted on train).")]
LrOpt = Annotated[float | None, typer.Option(
    help="Learning rate (default: 8 for a binary head, 2 for softmax).")]
MomentumOpt = Annotated[float, typer.Option(help="Nesterov momentum.")]
EpochsOpt = Annotated[int, typer.Option(help="Maximum epochs.")]
BatchOpt = Annotated[int, typer.Option(help="Mini-batch size (capped by one ciphertext).")]
PatienceOpt = Annotated[int, typer.Option(help="Early-stopping patience in epochs.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the batch schedule.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write machine-readable results.")]


def load_prepared(features: Path | None, dataset: str, backbone: str, pca: int):
    """Features from a file, or extracted (cached) from a MedMNIST dataset; then scaled."""
    from ..features import FeatureSet, extract_features
    from ..training.pipeline import prepare_features

    if features is not None:
        if not features.exists():
            raise typer.BadParameter(f"{features} does not exist", param_hint="--features")
        feature_set = FeatureSet.load(features)
    else:
        from ..data import load_medmnist

        feature_set = extract_features(load_medmnist(dataset), backbone=backbone)
    return prepare_features(feature_set, pca if pca > 0 else None)


def _print_runs(runs: dict) -> None:
    table = Table(title="Test results")
    for column in ("run", "ACC", "AUC", "epochs", "best", "steps", "wall s"):
        table.add_column(column)
    for run in runs.values():
        table.add_row(run["label"], f"{run['test']['acc']:.4f}", f"{run['test']['auc']:.4f}",
                      str(run["epochs"]), str(run["best_epoch"]), str(run["steps"]),
                      f"{run['wall_time_s']:.1f}")
    console.print(table)


def _write_json(path: Path | None, results: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))
    console.print(f"results written to {path}")


def register(app: typer.Typer) -> None:
    """Add `train-plain` and `train-encrypted`."""

    @app.command("train-plain")
    def train_plain(
        features: FeaturesOpt = None,
        dataset: DatasetOpt = "breastmnist",
        backbone: BackboneOpt = "efficientnet_lite0",
        pca: PcaOpt = DEFAULT_PCA_DIMS,
        lr: LrOpt = None,
        momentum: MomentumOpt = _D.momentum,
        epochs: EpochsOpt = _D.epochs,
        batch_size: BatchOpt = _D.batch_size,
        patience: PatienceOpt = _D.patience,
        seed: SeedOpt = _D.seed,
        json_path: JsonOpt = None,
    ) -> None:
        """Train the plaintext head (exact and polynomial mirror) and report ACC/AUC."""
        from ..training.approx import RangeError
        from ..training.pipeline import run_plain

        data = load_prepared(features, dataset, backbone, pca)
        config = TrainConfig(lr, momentum, epochs, batch_size, patience, seed).for_classes(
            data.n_classes)
        try:
            runs = run_plain(data, config)
        except RangeError as exc:
            console.print(f"[red]the polynomial mirror left its interval:[/] {exc}\n"
                          "These settings cannot be trained encrypted; lower --lr/--epochs.")
            raise typer.Exit(2) from exc
        _print_runs(runs)
        _write_json(json_path, {"dataset": data.name, "n_classes": data.n_classes,
                                "backbone": data.backbone, "config": config.to_dict(),
                                "scaler": data.scaler, "runs": runs})

    @app.command("train-encrypted")
    def train_encrypted(
        features: FeaturesOpt = None,
        dataset: DatasetOpt = "breastmnist",
        backbone: BackboneOpt = "efficientnet_lite0",
        pca: PcaOpt = DEFAULT_PCA_DIMS,
        lr: LrOpt = None,
        momentum: MomentumOpt = _D.momentum,
        epochs: EpochsOpt = _D.epochs,
        batch_size: BatchOpt = _D.batch_size,
        patience: PatienceOpt = _D.patience,
        seed: SeedOpt = _D.seed,
        fixed_epochs: Annotated[bool, typer.Option(
            help="No interaction: train all epochs, keep the last.")] = False,
        workdir: Annotated[Path, typer.Option(help="Keys, ciphertexts, checkpoints.")] = Path(
            "runs/train-encrypted"),
        insecure_test_params: Annotated[bool, typer.Option(
            help="Tiny INSECURE ring for tests/quick looks; never for real data.")] = False,
        json_path: JsonOpt = None,
    ) -> None:
        """Encrypted training (both roles, one process) next to the plaintext trainers."""
        from ..he.params import INSECURE_TEST, PRODUCTION
        from ..training.approx import RangeError
        from ..training.pipeline import run_encrypted

        if insecure_test_params:
            console.print("[bold red]WARNING: insecure test parameters (ring 4096): "
                          "no security at all.[/]")
        data = load_prepared(features, dataset, backbone, pca)
        config = TrainConfig(lr, momentum, epochs, batch_size, patience, seed).for_classes(
            data.n_classes)
        params = INSECURE_TEST if insecure_test_params else PRODUCTION
        try:
            results = run_encrypted(data, config, params, workdir,
                                    allow_insecure=insecure_test_params,
                                    interactive=not fixed_epochs, log=console.print)
        except RangeError as exc:
            console.print(f"[red]refused:[/] {exc}")
            raise typer.Exit(2) from exc
        _print_runs(results["runs"])
        enc = results["runs"]["encrypted"]
        console.print(f"bootstraps/step {enc['ops']['per_step'].get('bootstraps', 0):.2f}, "
                      f"s/step {enc['seconds_per_step']:.1f}, max |w_enc - w_mirror| "
                      f"{enc['max_abs_weight_diff_vs_mirror']:.2e}")
        _write_json(json_path, results)
