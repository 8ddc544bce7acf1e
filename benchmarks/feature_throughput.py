"""Feature-extraction throughput (images/s) on CPU for the hospital-side backbones.

Measures EfficientNet-Lite0 (real offline ImageNet weights) and DeiT-tiny (RANDOM weights, since
DeiT weights cannot be downloaded here; throughput does not depend on weight values) on real
BreastMNIST images, for a few batch sizes, including preprocessing (28->224 resize, normalise).

    python benchmarks/feature_throughput.py --images 128 --batch-sizes 8,32,64 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medblindtuner.data import load_medmnist
from medblindtuner.features import available_cores, load_backbone
from medblindtuner.features.extract import embed


def measure(
    name: str, weights: str | None, images: np.ndarray, batch_sizes: list[int], repeats: int,
    console: Console,
) -> list[dict[str, object]]:
    """Best-of-`repeats` images/s per batch size (best-of filters noise from other processes)."""
    backbone = load_backbone(name, weights=weights, console=console)
    embed(backbone, images[: min(8, len(images))], batch_size=8, progress=False)  # warm-up
    rows: list[dict[str, object]] = []
    for bs in batch_sizes:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            embed(backbone, images, batch_size=bs, progress=False)
            times.append(time.perf_counter() - t)
        best = min(times)
        rows.append({
            "backbone": name,
            "weights": backbone.info.weights_source,
            "pretrained": backbone.info.pretrained,
            "feature_dim": backbone.info.feature_dim,
            "batch_size": bs,
            "images": int(len(images)),
            "best_seconds": round(best, 3),
            "images_per_s": round(len(images) / best, 2),
            "ms_per_image": round(1000 * best / len(images), 1),
            "all_seconds": [round(x, 3) for x in times],
        })
        console.print(f"{name} bs={bs}: {len(images) / best:.1f} img/s")
    return rows


def main() -> None:
    """Parse options, run the measurements, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="breastmnist")
    ap.add_argument("--images", type=int, default=128, help="images per measurement")
    ap.add_argument("--batch-sizes", default="8,32,64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="default: all available cores")
    ap.add_argument("--backbones", default="efficientnet_lite0,deit_tiny")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/feature_throughput.json"))
    args = ap.parse_args()

    console = Console(stderr=True)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    ds = load_medmnist(args.dataset, download=False)
    images = ds.splits["train"][0][: args.images]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[dict[str, object]] = []
    for name in args.backbones.split(","):
        weights = "random" if name.startswith("deit") else None
        rows += measure(name, weights, images, batch_sizes, args.repeats, console)

    table = Table(title=f"feature extraction on CPU ({threads} threads, {args.dataset})")
    for col in ("backbone", "weights", "dim", "batch", "img/s", "ms/img"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["backbone"]), "pretrained" if r["pretrained"] else "RANDOM (speed only)",
            str(r["feature_dim"]), str(r["batch_size"]), f"{r['images_per_s']:.1f}",
            f"{r['ms_per_image']:.1f}",
        )
    Console().print(table)
    result = {
        "torch": torch.__version__,
        "threads": threads,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "dataset": ds.name,
        "dataset_md5": ds.md5,
        "note": "best of repeats; includes 28->224 resize + normalisation; the host may be "
        "shared with other processes",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
