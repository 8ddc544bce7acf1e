"""`medblindtuner experiment`: the paper-style table over datasets and backbones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .options import EpochsOpt, LrOpt, PcaOpt, overrides

console = Console()


app = typer.Typer()

@app.command("experiment")
def experiment(
    datasets: Annotated[str, typer.Option(help="Comma-separated MedMNIST flags.")] = (
        "breastmnist,retinamnist"),
    backbones: Annotated[str, typer.Option(help="Comma-separated backbones.")] = (
        "efficientnet_lite0"),
    pca: PcaOpt = None,
    lr: LrOpt = None,
    epochs: EpochsOpt = None,
    limit: Annotated[int | None, typer.Option(help="Images per split (quick runs).")] = None,
    out: Annotated[Path, typer.Option(help="Combined report folder.")] = Path(
        "runs/experiment"),
    insecure_test_params: Annotated[bool, typer.Option(
        help="Tiny INSECURE ring (mechanics only).")] = False,
) -> None:
    """Encrypted vs plaintext training for every dataset x backbone; one combined report."""
    from ..data import load_medmnist
    from ..experiment import run_encrypted
    from ..features import extract_features
    from ..hospital.hospital import Hospital
    from ..report import build_combined_report, build_report

    flags = [d.strip() for d in datasets.split(",") if d.strip()]
    given = overrides(pca, lr, None, None, epochs, None)
    combined = []
    for flag in flags:
        for backbone in [b.strip() for b in backbones.split(",") if b.strip()]:
            console.rule(f"{flag} / {backbone}")
            dataset = load_medmnist(flag)
            if limit:
                dataset = dataset.subset(limit)
            features = extract_features(dataset, backbone=backbone)
            run_dir = out / f"{flag}-{backbone}"
            hospital = Hospital(run_dir / "work", insecure_test_params=insecure_test_params,
                                log=console.print)
            hospital.prepare(features, given)
            results = run_encrypted(hospital, log=console.print)
            results["command"] = " ".join(part for part in (
                f"medblindtuner experiment --datasets {flag} --backbones {backbone}",
                given.command_line(),
                "--insecure-test-params" if insecure_test_params else "",
                f"--limit {limit}" if limit else "") if part)
            results = json.loads(json.dumps(results, default=float))
            build_report(results, run_dir / "report")
            results["report_dir"] = str((run_dir / "report").resolve())
            combined.append(results)
    paths = build_combined_report(combined, out)
    console.print(f"combined report: {paths}")
