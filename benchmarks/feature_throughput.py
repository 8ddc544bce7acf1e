"""Feature-extraction throughput on CPU: the torch path against ONNX Runtime, in one run.

Each backbone runs through PyTorch (the former path: eager, channels-last, batch 64) and
through ONNX Runtime (the export `medblindtuner features` uses) for a grid of batch sizes and
thread counts, on real images, preprocessing (resize to 224, normalisation) included. The
configurations are measured round-robin, `--repeats` rounds, best round kept: on a shared
machine every configuration sees the same background load. CPU time (this process, all threads)
is reported beside the wall time, since it depends less on other processes.

    python benchmarks/feature_throughput.py --images 128 --repeats 3 \\
        --out runs/bench/feature_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from medblindtuner.data import load_medmnist
from medblindtuner.features import available_cores, load_backbone
from medblindtuner.features.extract import embed
from medblindtuner.features.onnx_encoder import export_backbone

TORCH_BATCH = 64  # the former default of `medblindtuner features`


def _thread_setting(text: str) -> tuple[int, bool]:
    """'2' -> (2 threads, no spinning); '2+spin' -> (2, ORT's busy-waiting pool threads)."""
    return int(text.split("+")[0]), text.endswith("+spin")


def _configurations(name: str, weights: str | None, images: np.ndarray, batches: list[int],
                    thread_settings: list[str], console: Console) -> list[dict[str, object]]:
    """One entry per (runtime, batch, threads) with its encoder, warmed up."""
    backbone = load_backbone(name, weights=weights, console=console)
    cores = available_cores()
    configs: list[dict[str, object]] = [
        {"backbone": name, "runtime": "torch", "batch_size": TORCH_BATCH, "threads": cores,
         "n_threads": cores, "encoder": backbone}]
    for setting in thread_settings:
        n_threads, spinning = _thread_setting(setting)
        encoder = export_backbone(backbone, None, n_threads, images[:2], console, spinning)
        configs += [{"backbone": name, "runtime": "onnxruntime", "batch_size": b,
                     "threads": setting, "n_threads": n_threads, "encoder": encoder}
                    for b in batches]
    for config in configs:
        torch.set_num_threads(int(config["n_threads"]))  # type: ignore[call-overload]
        embed(config["encoder"], images[:8], 8, progress=False)  # type: ignore[arg-type]
    return configs


def _measure_round(configs: list[dict[str, object]], images: np.ndarray) -> None:
    """Time every configuration once over all images (wall and process CPU seconds)."""
    for config in configs:
        torch.set_num_threads(int(config["n_threads"]))  # type: ignore[call-overload]
        wall, cpu = time.perf_counter(), time.process_time()
        embed(config["encoder"], images, int(config["batch_size"]), progress=False)  # type: ignore[arg-type]
        config.setdefault("wall", []).append(time.perf_counter() - wall)  # type: ignore[union-attr]
        config.setdefault("cpu", []).append(time.process_time() - cpu)  # type: ignore[union-attr]


def _rows(configs: list[dict[str, object]], n_images: int) -> list[dict[str, object]]:
    """Best round per configuration, and its speed-up over the torch path."""
    rows = []
    for config in configs:
        wall: list[float] = config["wall"]  # type: ignore[assignment]
        cpu: list[float] = config["cpu"]  # type: ignore[assignment]
        best = min(wall)
        rows.append({
            "backbone": config["backbone"], "runtime": config["runtime"],
            "batch_size": config["batch_size"], "threads": config["threads"],
            "images": n_images, "best_seconds": round(best, 3),
            "images_per_s": round(n_images / best, 2),
            "ms_per_image": round(1000 * best / n_images, 1),
            "cpu_ms_per_image": round(1000 * min(cpu) / n_images, 1),
            "all_seconds": [round(x, 3) for x in wall],
        })
    for name in {r["backbone"] for r in rows}:
        base = next(r for r in rows if r["backbone"] == name and r["runtime"] == "torch")
        for r in rows:
            if r["backbone"] == name:
                r["speedup_vs_torch"] = round(r["images_per_s"] / base["images_per_s"], 2)
    return rows


def _table(rows: list[dict[str, object]], dataset: str) -> Table:
    table = Table(title=f"feature extraction on CPU ({dataset}, best round)")
    for col in ("backbone", "runtime", "batch", "threads", "img/s", "ms/img", "CPU ms/img",
                "x torch"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["backbone"]), str(r["runtime"]), str(r["batch_size"]),
                      str(r["threads"]), f"{r['images_per_s']:.1f}", f"{r['ms_per_image']:.1f}",
                      f"{r['cpu_ms_per_image']:.1f}", f"{r['speedup_vs_torch']:.2f}")
    return table


def main() -> None:
    """Parse options, run the measurements, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="breastmnist")
    ap.add_argument("--images", type=int, default=128, help="images per measurement")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32", help="ONNX Runtime batch sizes")
    ap.add_argument("--threads", default=None,
                    help="ONNX Runtime thread settings, e.g. 1,2,2+spin (default: 1, all "
                         "cores, all cores with ORT's spinning pool threads)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the best is kept")
    ap.add_argument("--backbones", default="efficientnet_lite0",
                    help="comma-separated; deit_* run with random weights (same speed)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/feature_throughput.json"))
    args = ap.parse_args()

    console = Console(stderr=True)
    cores = available_cores()
    threads = (args.threads.split(",") if args.threads
               else sorted({"1", str(cores)}) + [f"{cores}+spin"])
    ds = load_medmnist(args.dataset, download=False)
    images = ds.splits["train"][0][: args.images]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    configs: list[dict[str, object]] = []
    for name in args.backbones.split(","):
        weights = "random" if name.startswith("deit") else None
        configs += _configurations(name, weights, images, batches, threads, console)
    load_before = os.getloadavg()
    for round_ in range(args.repeats):
        console.print(f"round {round_ + 1}/{args.repeats}")
        _measure_round(configs, images)
    rows = _rows(configs, len(images))
    Console().print(_table(rows, ds.name))
    result = {
        "torch": torch.__version__, "onnxruntime": ort.__version__, "cores": cores,
        "machine": platform.machine(), "processor": platform.processor(),
        "dataset": ds.name, "dataset_md5": ds.md5,
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "note": "best of round-robin rounds; includes the resize to 224 + normalisation; "
                "the host may be shared with other processes",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
