"""`medblindtuner demo`: the main job, the whole system end to end on real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..training.plain import DEFAULT_PCA_DIMS, TrainConfig

_DEFAULTS = TrainConfig()


def register(app: typer.Typer) -> None:
    """Add the `demo` command."""

    @app.command("demo")
    def demo(
        dataset: Annotated[str, typer.Option(help="MedMNIST flag or .npz path.")] = "breastmnist",
        data_dir: Annotated[Path | None, typer.Option(help="Folder with <flag>.npz.")] = None,
        backbone: Annotated[str, typer.Option(
            help="auto (DeiT when weights are reachable, else EfficientNet-Lite0), "
                 "deit_tiny|deit_small|deit_base, efficientnet_lite0.")] = "auto",
        pca: Annotated[int, typer.Option(help="PCA dimensions (hospital side).")] = (
            DEFAULT_PCA_DIMS),
        lr: Annotated[float | None, typer.Option(
            help="Learning rate (default: 8 for a binary head, 2 for softmax).")] = None,
        epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = _DEFAULTS.epochs,
        batch_size: Annotated[int, typer.Option(help="Batch size.")] = _DEFAULTS.batch_size,
        patience: Annotated[int, typer.Option(help="Early stopping.")] = _DEFAULTS.patience,
        workdir: Annotated[Path, typer.Option(help="Keys, ciphertexts, service data.")] = Path(
            "runs/demo"),
        report_dir: Annotated[Path | None, typer.Option(
            help="Report folder (default WORKDIR/report).")] = None,
        limit: Annotated[int | None, typer.Option(
            help="Use only the first N images per split (quick look).")] = None,
        insecure_test_params: Annotated[bool, typer.Option(
            help="Tiny INSECURE ring: shows the mechanics in minutes, no security.")] = False,
    ) -> None:
        """Run the whole system: features, keys, encryption, cloud service, encrypted
        training, decryption, evaluation, encrypted inference and a report."""
        from rich.console import Console

        from ..data import DatasetError
        from ..demo import DemoOptions, run_demo
        from ..features import BackboneError
        from ..he.params import ParameterError
        from ..training.approx import RangeError

        config = TrainConfig(learning_rate=lr, momentum=_DEFAULTS.momentum, epochs=epochs,
                             batch_size=batch_size, patience=patience, seed=_DEFAULTS.seed)
        try:
            run_demo(DemoOptions(dataset=dataset, data_dir=data_dir, backbone=backbone,
                                 pca_dims=pca, config=config, workdir=workdir,
                                 report_dir=report_dir, limit=limit,
                                 insecure_test_params=insecure_test_params))
        except (DatasetError, BackboneError, ParameterError, RangeError) as exc:
            # the user's settings or data, not a bug: one clear line, no traceback
            Console(stderr=True).print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(code=2) from exc
