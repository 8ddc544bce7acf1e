"""`medblindtuner demo`: the main job, the whole system end to end on real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    BatchOpt,
    EpochsOpt,
    LrOpt,
    MomentumOpt,
    PatienceOpt,
    PcaOpt,
    RefreshOpt,
    TimeAllowanceOpt,
    WeightDecayOpt,
    overrides,
    refresh_params,
)

app = typer.Typer()

@app.command("demo")
def demo(
    dataset: Annotated[str, typer.Option(help="MedMNIST flag or .npz path.")] = "breastmnist",
    data_dir: Annotated[Path | None, typer.Option(help="Folder with <flag>.npz.")] = None,
    backbone: Annotated[str, typer.Option(
        help="auto (DeiT when weights are reachable, else EfficientNet-Lite0), "
             "deit_tiny|deit_small|deit_base, efficientnet_lite0, timm:ARCH (any timm "
             "architecture), onnx:PATH (your encoder as an ONNX file).")] = "auto",
    weights: Annotated[str | None, typer.Option(
        help="Local weight file of the backbone (timm:ARCH, DeiT, EfficientNet).")] = None,
    pca: PcaOpt = None,
    lr: LrOpt = None,
    momentum: MomentumOpt = None,
    weight_decay: WeightDecayOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    patience: PatienceOpt = 4,
    time_allowance: TimeAllowanceOpt = 2.0,
    workdir: Annotated[Path, typer.Option(help="Keys, ciphertexts, service data.")] = Path(
        "runs/demo"),
    report_dir: Annotated[Path | None, typer.Option(
        help="Report folder (default WORKDIR/report).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Use only the first N images per split (quick look).")] = None,
    insecure_test_params: Annotated[bool, typer.Option(
        help="Tiny INSECURE ring: shows the mechanics in minutes, no security.")] = False,
    refresh: RefreshOpt = None,
) -> None:
    """Run the whole system: features, keys, encryption, cloud service, encrypted
    training, decryption, evaluation, encrypted inference and a report."""
    from ..demo import DemoOptions, run_demo

    given = overrides(pca, lr, momentum, weight_decay, epochs, batch_size, patience,
                      time_allowance=time_allowance)
    # bad data or refused settings end as one `error:` line, exit 2 (cli.main)
    run_demo(DemoOptions(dataset=dataset, data_dir=data_dir, backbone=backbone, weights=weights,
                         given=given, workdir=workdir, report_dir=report_dir, limit=limit,
                         insecure_test_params=insecure_test_params,
                         refresh=refresh_params(refresh, insecure_test_params).refresh))
