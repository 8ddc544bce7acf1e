"""`medblindtuner experiment`: the paper-style table over datasets and backbones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..training.plain import DEFAULT_PCA_DIMS, TrainConfig

console = Console()


def register(app: typer.Typer) -> None:
    """Add the `experiment` command."""

    @app.command("experiment")
    def experiment(
        datasets: Annotated[str, typer.Option(help="Comma-separated MedMNIST flags.")] = (
            "breastmnist,retinamnist"),
        backbones: Annotated[str, typer.Option(help="Comma-separated backbones.")] = (
            "efficientnet_lite0"),
        pca: Annotated[int, typer.Option(help="PCA dimensions.")] = DEFAULT_PCA_DIMS,
        lr: Annotated[str, typer.Option(
            help="Learning rate, one value or one per dataset (comma-separated).")] = "8,2",
        epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = TrainConfig.epochs,
        limit: Annotated[int | None, typer.Option(help="Images per split (quick runs).")] = None,
        out: Annotated[Path, typer.Option(help="Combined report folder.")] = Path(
            "runs/experiment"),
        insecure_test_params: Annotated[bool, typer.Option(
            help="Tiny INSECURE ring (mechanics only).")] = False,
    ) -> None:
        """Encrypted vs plaintext training for every dataset x backbone; one combined report."""
        from ..data import load_medmnist
        from ..features import extract_features
        from ..he.params import INSECURE_TEST, PRODUCTION
        from ..report import build_combined_report, build_report
        from ..training.pipeline import prepare_features, run_encrypted

        flags = [d.strip() for d in datasets.split(",") if d.strip()]
        rates = [float(v) for v in lr.split(",")]
        if len(rates) not in (1, len(flags)):
            raise typer.BadParameter("give one learning rate or one per dataset", param_hint="--lr")
        params = INSECURE_TEST if insecure_test_params else PRODUCTION
        combined = []
        for i, flag in enumerate(flags):
            for backbone in [b.strip() for b in backbones.split(",") if b.strip()]:
                console.rule(f"{flag} / {backbone}")
                dataset = load_medmnist(flag)
                if limit:
                    dataset = dataset.subset(limit)
                data = prepare_features(extract_features(dataset, backbone=backbone), pca)
                config = TrainConfig(learning_rate=rates[i if len(rates) > 1 else 0],
                                     epochs=epochs)
                run_dir = out / f"{flag}-{backbone}"
                results = run_encrypted(data, config, params, run_dir / "work",
                                        allow_insecure=insecure_test_params, log=console.print)
                results["command"] = (f"medblindtuner experiment --datasets {flag} --backbones "
                                      f"{backbone} --pca {pca} --lr {config.learning_rate} "
                                      f"--epochs {epochs}"
                                      + (" --insecure-test-params" if insecure_test_params
                                         else ""))
                results = json.loads(json.dumps(results, default=float))
                build_report(results, run_dir / "report")
                results["report_dir"] = str((run_dir / "report").resolve())
                combined.append(results)
        paths = build_combined_report(combined, out)
        console.print(f"combined report: {paths}")
