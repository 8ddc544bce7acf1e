"""`medblindtuner demo`: the main job, the whole system end to end on real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    TIME_ALLOWANCE_HOURS,
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

# PCA width of the consortium demo: what the BreastMNIST consortium runs used (docs/security.md)
def consortium_demo(dataset: str, data_dir: Path | None, backbone: str, weights: str | None,
                    limit: int | None, hospitals: int, pca: int | None, epochs: int | None,
                    weight_decay: float | None, workdir: Path, report_dir: Path | None,
                    insecure: bool) -> None:
    """`demo --hospitals N`: the consortium job end to end on the dataset's features, its
    report (who took part, that no single party could decrypt, the scores) in
    REPORT_DIR/consortium.json."""
    from medblindtuner.he.params import HOSPITAL

    from .consortium_cmd import load_features, run_and_print

    features = load_features(None, dataset, data_dir, backbone, limit, weights=weights)
    out = Path(report_dir or workdir / "report") / "consortium.json"
    run_and_print(features, hospitals, HOSPITAL, insecure, workdir / "consortium",
                  pca, epochs, weight_decay, out)


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
    time_allowance: TimeAllowanceOpt = TIME_ALLOWANCE_HOURS,
    workdir: Annotated[Path, typer.Option(help="Keys, ciphertexts, service data.")] = Path(
        "runs/demo"),
    report_dir: Annotated[Path | None, typer.Option(
        help="Report folder (default WORKDIR/report).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Use only the first N images per split (quick look).")] = None,
    insecure_test_params: Annotated[bool, typer.Option(
        help="Tiny INSECURE ring: shows the mechanics in minutes, no security.")] = False,
    refresh: RefreshOpt = None,
    hospitals: Annotated[int, typer.Option(
        min=1, max=16, help="2 or more: a consortium of that many hospitals (the training "
        "split divided among them, joint key, joint refresh; all roles in this process; "
        "settings agreed by secure aggregation unless given).")] = 1,
) -> None:
    """Run the whole system: features, keys, encryption, cloud service, encrypted
    training, decryption, evaluation, encrypted inference and a report."""
    from ..demo import DemoOptions, run_demo

    if hospitals > 1:
        if refresh == "bootstrap":
            raise typer.BadParameter("a consortium refreshes jointly (every hospital's share); "
                                     "--refresh bootstrap is for one hospital",
                                     param_hint="--refresh")
        consortium_demo(dataset, data_dir, backbone, weights, limit, hospitals, pca, epochs,
                        weight_decay, workdir, report_dir, insecure_test_params)
        return

    given = overrides(pca, lr, momentum, weight_decay, epochs, batch_size, patience,
                      time_allowance=time_allowance)
    # bad data or refused settings end as one `error:` line, exit 2 (cli.main)
    run_demo(DemoOptions(dataset=dataset, data_dir=data_dir, backbone=backbone, weights=weights,
                         given=given, workdir=workdir, report_dir=report_dir, limit=limit,
                         insecure_test_params=insecure_test_params,
                         refresh=refresh_params(refresh, insecure_test_params).refresh))
