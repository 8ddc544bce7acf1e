"""Batched, cached feature extraction: `Dataset` -> `FeatureSet`.

Extraction is the slowest hospital-side step on a CPU, and it is deterministic given the data
and the weights, so results are cached on disk keyed by dataset md5 + backbone + weights hash.
The frozen backbone runs through ONNX Runtime (exported once, `onnx_encoder`), with PyTorch as
the fallback; both give the same features within 1e-4, so the runtime is recorded in the
feature set's `extra` but is not part of the cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from tqdm import tqdm

from ..data.dataset import SPLITS, Dataset
from .backbones import Backbone, BackboneError, BackboneInfo, Encoder, OnnxInput, load_backbone
from .cache import CACHE_VERSION, DEFAULT_CACHE_DIR, safe_file_name

RUNTIMES = ("onnx", "torch")


@dataclass
class FeatureSet:
    """Per-split float32 features + int64 labels, with the provenance needed to reuse them."""

    dataset_name: str
    dataset_md5: str
    n_classes: int
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    backbone: BackboneInfo
    class_names: list[str] | None = None
    seconds: float = 0.0  # wall time of the original extraction (not of a cache load)
    from_cache: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        """Width of every feature vector."""
        return int(self.splits["train"][0].shape[1])

    def sizes(self) -> dict[str, int]:
        """Number of vectors per split."""
        return {s: int(y.shape[0]) for s, (_, y) in self.splits.items()}

    @property
    def images_per_s(self) -> float:
        """Extraction throughput of the original computation."""
        n = sum(self.sizes().values())
        return n / self.seconds if self.seconds > 0 else float("nan")

    def meta(self) -> dict[str, object]:
        """JSON-serialisable provenance (stored inside the .npz)."""
        return {
            "cache_version": CACHE_VERSION,
            "dataset_name": self.dataset_name,
            "dataset_md5": self.dataset_md5,
            "n_classes": self.n_classes,
            "class_names": self.class_names,
            "backbone": self.backbone.to_dict(),
            "seconds": self.seconds,
            "splits": self.sizes(),
            "feature_dim": self.feature_dim,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an .npz ({split}_features, {split}_labels, meta JSON) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for s, (x, y) in self.splits.items():
            arrays[f"{s}_features"] = x
            arrays[f"{s}_labels"] = y
        arrays["meta"] = np.asarray(json.dumps(self.meta()))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_arrays(cls, splits: dict[str, tuple[np.ndarray, np.ndarray]], n_classes: int,
                    name: str = "features") -> FeatureSet:
        """Features computed elsewhere (the Python API): `split -> (x, y)`, checked."""
        checked = {}
        for split, (x, y) in splits.items():
            x = np.asarray(x, dtype=np.float32)
            y = np.asarray(y).reshape(-1)
            if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
                raise ValueError(f"{split}: expected (n, d) features and n labels, got "
                                 f"{x.shape} and {y.shape}")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{split}: features contain NaN/inf")
            if not np.array_equal(y, np.round(y)) or y.min() < 0 or y.max() >= n_classes:
                raise ValueError(f"{split}: labels must be integers in [0, {n_classes})")
            checked[split] = (x, y.astype(np.int64))
        dims = {x.shape[1] for x, _ in checked.values()}
        if len(dims) != 1:
            raise ValueError(f"splits have different feature widths: {sorted(dims)}")
        info = BackboneInfo(name="given", arch="given features", feature_dim=dims.pop(),
                            weights_source="caller", weights_sha256="-", pretrained=False,
                            input_size=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        return cls(dataset_name=name, dataset_md5="-", n_classes=n_classes, splits=checked,
                   backbone=info)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureSet:
        """Read a file written by `save` (raises ValueError/OSError on a broken file)."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            splits = {
                s: (z[f"{s}_features"].astype(np.float32), z[f"{s}_labels"].astype(np.int64))
                for s in meta["splits"]
            }
        for s, (x, y) in splits.items():
            if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] != meta["splits"][s]:
                raise ValueError(f"{path}: split {s} has inconsistent shapes")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{path}: split {s} contains non-finite features")
        return cls(
            dataset_name=meta["dataset_name"],
            dataset_md5=meta["dataset_md5"],
            n_classes=int(meta["n_classes"]),
            splits=splits,
            backbone=BackboneInfo.from_dict(meta["backbone"]),
            class_names=meta.get("class_names"),
            seconds=float(meta.get("seconds", 0.0)),
            extra=meta.get("extra", {}),
        )


def available_cores() -> int:
    """CPU cores this process may use (respects affinity/cgroup pinning, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def extraction_threads() -> int:
    """Threads for extraction: every available core, or one when other processes already keep
    every core busy (1-minute load average >= cores). Measured on this shared 2-core machine
    under load: ONNX Runtime at 1 thread 30.5 img/s, at 2 threads 19.2 (docs/results.md)."""
    cores = available_cores()
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:  # no load average on this platform
        busy = False
    return 1 if busy and cores > 1 else cores


def cache_key(dataset_md5: str, info: BackboneInfo) -> str:
    """Everything that changes the features: data, backbone, weights, preprocessing."""
    text = (
        f"v{CACHE_VERSION}|{dataset_md5}|{info.name}|{info.arch}|{info.weights_sha256}|"
        f"{info.input_size}|{info.mean}|{info.std}|{info.interpolation}"
    )
    return hashlib.sha256(text.encode()).hexdigest()


def embed(
    encoder: Encoder,
    images: np.ndarray,
    batch_size: int | None = None,
    desc: str = "",
    progress: bool = True,
) -> np.ndarray:
    """Features for uint8 images (N,H,W,C), batch by batch, as float32 (N, D).

    batch_size None: the encoder's measured batch (`preferred_batch`).
    """
    step = batch_size or encoder.preferred_batch
    out = np.empty((images.shape[0], encoder.info.feature_dim), dtype=np.float32)
    bar = tqdm(total=images.shape[0], desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, images.shape[0], step):
        batch = images[start : start + step]
        out[start : start + len(batch)] = encoder.features(batch)
        bar.update(len(batch))
    bar.close()
    return out


def runtime_encoder(
    backbone: Encoder, runtime: str, cache_dir: Path | None, threads: int,
    probe_images: np.ndarray, console: Console,
) -> Encoder:
    """The encoder extraction runs: a torch backbone exported to ONNX Runtime (runtime="onnx",
    export cached under `cache_dir`), or the torch backbone itself when asked for or when the
    export fails (said on the console). An ONNX file's encoder is returned as it is."""
    if runtime not in RUNTIMES:
        raise BackboneError(f"unknown runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
    if runtime == "torch" or not isinstance(backbone, Backbone):
        return backbone
    try:
        from .onnx_encoder import export_backbone

        return export_backbone(backbone, cache_dir, threads, probe_images, console)
    except (ImportError, BackboneError) as exc:
        console.print(f"[yellow]ONNX Runtime not used ({exc}); extracting with PyTorch "
                      "(slower, the same features)")
        return backbone


def _cached_features(cache_path: Path, dataset: Dataset, info: BackboneInfo,
                     console: Console) -> FeatureSet | None:
    """The cached feature set if it exists and matches the request (else None, reported)."""
    if not cache_path.is_file():
        return None
    try:
        fs = FeatureSet.load(cache_path)
        if fs.dataset_md5 != dataset.md5 or fs.backbone != info or fs.sizes() != {
            s: dataset.sizes()[s] for s in fs.splits
        }:
            raise ValueError("provenance does not match the request")
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        console.print(f"[yellow]feature cache {cache_path} unusable ({exc}); recomputing")
        return None
    fs.from_cache = True
    console.print(f"feature cache hit: {cache_path} (skipping extraction)")
    return fs


def extract_features(
    dataset: Dataset,
    backbone: str | Encoder = "auto",
    weights: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,
    num_threads: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    runtime: str = "onnx",
    onnx_input: OnnxInput | None = None,
) -> FeatureSet:
    """Extract features for every split, reusing the on-disk cache when possible.

    backbone: a name for `load_backbone` (auto, DeiT, efficientnet_lite0, timm:ARCH,
    onnx:PATH) or an encoder. runtime: "onnx" (ONNX Runtime, torch when export fails) or
    "torch". batch_size None: the runtime's measured batch; num_threads None:
    `extraction_threads()`. cache_dir=None disables caching
    (features and the ONNX export). A cache file that cannot be read or does not match is
    reported and recomputed.
    """
    console = console or Console(stderr=True)
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    threads = num_threads or extraction_threads()
    torch.set_num_threads(threads)
    bb = backbone if not isinstance(backbone, str) else load_backbone(
        backbone, weights, console, onnx_input=onnx_input, threads=threads)
    info = bb.info
    cache_path: Path | None = None
    if cache_dir is not None:
        key = cache_key(dataset.md5, info)
        cache_path = (Path(cache_dir).expanduser()
                      / f"{dataset.name}-{safe_file_name(info.name)}-{key[:24]}.npz")
        cached = _cached_features(cache_path, dataset, info, console)
        if cached is not None:
            return cached
    onnx_dir = None if cache_dir is None else Path(cache_dir).expanduser()
    encoder = runtime_encoder(bb, runtime, onnx_dir, threads,
                              dataset.splits["train"][0][:2], console)
    start = time.perf_counter()
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in SPLITS:
        images, labels = dataset.splits[s]
        feats = embed(encoder, images, batch_size, desc=f"{dataset.name}/{s}", progress=progress)
        splits[s] = (feats, labels.astype(np.int64))
    seconds = time.perf_counter() - start
    fs = FeatureSet(
        dataset_name=dataset.name,
        dataset_md5=dataset.md5,
        n_classes=dataset.n_classes,
        splits=splits,
        backbone=info,
        class_names=dataset.class_names,
        seconds=seconds,
        extra={"batch_size": batch_size or encoder.preferred_batch, "threads": threads,
               "runtime": encoder.runtime, "dataset_source": dataset.source},
    )
    n = sum(fs.sizes().values())
    console.print(
        f"extracted {n} images in {seconds:.1f} s ({fs.images_per_s:.1f} img/s, "
        f"{encoder.runtime}, {threads} threads)"
    )
    if cache_path is not None:
        fs.save(cache_path)
    return fs

