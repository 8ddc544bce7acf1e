"""`medblindtuner features`: hospital-side image -> feature extraction (no cryptography).

Writes the feature set the encrypted trainer consumes, plus an optional JSON summary so runs
can be compared/reported by machines.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..data import Dataset, load_image_folder, load_medmnist
from ..features.cache import DEFAULT_CACHE_DIR


def _load_dataset(
    dataset: str,
    data_dir: Path | None,
    image_folder: Path | None,
    download: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    image_size: int,
) -> Dataset:
    if image_folder is not None:
        return load_image_folder(
            image_folder, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
            image_size=image_size,
        )
    return load_medmnist(dataset, data_dir=data_dir, download=download)


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); a bad list is a usage error (exit 2)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers",
                                 param_hint=option) from exc


@dataclass(frozen=True)
class EncoderChoice:
    """The encoder options of `features`, as given."""

    backbone: str
    weights: str | None
    runtime: str
    input_size: int | None
    mean: str | None
    std: str | None
    batch_size: int | None


def _extract(ds: Dataset, choice: EncoderChoice, cache_dir: Path | None, progress: bool,
             console: Console):
    """The dataset's features (cached) with the encoder the user chose."""
    from ..features import OnnxInput, extract_features  # torch: only when extracting

    onnx_input = OnnxInput(input_size=choice.input_size, mean=_floats(choice.mean, "--mean"),
                           std=_floats(choice.std, "--std"))
    return extract_features(
        ds, backbone=choice.backbone, weights=choice.weights, batch_size=choice.batch_size,
        cache_dir=cache_dir, progress=progress, console=console, runtime=choice.runtime,
        onnx_input=onnx_input,
    )


def _summary(ds: Dataset, fs, out: Path | None, wall: float) -> dict:
    """The machine-readable summary of a run (`--json`)."""
    n = sum(fs.sizes().values())
    return {
        "dataset": ds.name,
        "dataset_source": ds.source,
        "dataset_md5": ds.md5,
        "n_classes": ds.n_classes,
        "splits": fs.sizes(),
        "backbone": fs.backbone.to_dict(),
        "feature_dim": fs.feature_dim,
        "from_cache": fs.from_cache,
        "extraction_seconds": round(fs.seconds, 3),
        "images_per_s": round(n / fs.seconds, 3) if fs.seconds > 0 else None,
        "wall_seconds": round(wall, 3),
        "batch_size": fs.extra.get("batch_size"),
        "runtime": fs.extra.get("runtime"),
        "threads": fs.extra.get("threads"),
        "out": str(out) if out is not None else None,
    }


app = typer.Typer()

BACKBONE_HELP = (
    "auto | deit_tiny | deit_small | deit_base | efficientnet_lite0 | timm:ARCH (any timm "
    "architecture; --weights FILE, the hub, or random) | onnx:PATH (your encoder as ONNX: "
    "images (batch, 3, S, S) -> (batch, features))."
)
RuntimeOpt = Annotated[str, typer.Option(
    help="onnx: ONNX Runtime (exported once, cached; torch if export fails) | torch.")]
InputSizeOpt = Annotated[int | None, typer.Option(
    min=1, help="onnx:PATH: input side in pixels (default: from the file).")]
MeanOpt = Annotated[str | None, typer.Option(
    help="onnx:PATH: per-channel mean, e.g. 0.5,0.5,0.5 (default: file metadata, "
         "else ImageNet's).")]
StdOpt = Annotated[str | None, typer.Option(
    help="onnx:PATH: per-channel std (default: file metadata, else ImageNet's).")]


@app.command("features")
def features(
    dataset: Annotated[
        str, typer.Option(help="MedMNIST flag (e.g. breastmnist) or path to an .npz.")
    ] = "breastmnist",
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder holding <flag>.npz (searched first).")
    ] = None,
    image_folder: Annotated[
        Path | None, typer.Option(help="Use ROOT/<class>/*.png|jpg instead of MedMNIST.")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Image folder: validation share per class.")
    ] = 0.1,
    test_fraction: Annotated[
        float, typer.Option(help="Image folder: test share per class.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Image folder: split seed.")] = 0,
    image_size: Annotated[
        int, typer.Option(help="Image folder: images are resized to this size.")
    ] = 28,
    backbone: Annotated[str, typer.Option(help=BACKBONE_HELP)] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(help="Local weight file, or 'random' for an explicitly random network."),
    ] = None,
    runtime: RuntimeOpt = "onnx",
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Images per forward pass (default: measured per runtime).")] = None,
    cache_dir: Annotated[Path, typer.Option(help="Feature cache folder.")] = DEFAULT_CACHE_DIR,
    no_cache: Annotated[bool, typer.Option(help="Neither read nor write the cache.")] = False,
    download: Annotated[
        bool, typer.Option(help="Download missing MedMNIST files from Zenodo (MD5-checked).")
    ] = True,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only the first N images of each split.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the feature set (.npz) here.")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write a machine-readable summary here.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Extract frozen-backbone features for a dataset (cached) and save them."""
    console = Console(stderr=True)
    t0 = time.perf_counter()
    # bad data or a wrong encoder file end as one `error:` line, exit 2 (cli.main)
    ds = _load_dataset(dataset, data_dir, image_folder, download, val_fraction, test_fraction,
                       seed, image_size)
    if limit is not None:
        ds = ds.subset(limit)
    console.print(f"dataset [bold]{ds.name}[/] {ds.sizes()} images {ds.image_shape} "
                  f"classes={ds.n_classes} md5={ds.md5} from {ds.source}")
    choice = EncoderChoice(backbone, weights, runtime, input_size, mean, std, batch_size)
    fs = _extract(ds, choice, None if no_cache else cache_dir, progress, console)
    if out is not None:
        fs.save(out)
        console.print(f"features written to {out}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        summary = _summary(ds, fs, out, time.perf_counter() - t0)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"{sum(fs.sizes().values())} feature vectors of dim {fs.feature_dim}; extraction "
        f"{fs.seconds:.1f} s" + (" (from cache)" if fs.from_cache else "")
    )
