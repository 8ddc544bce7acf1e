"""Frozen encoders run by ONNX Runtime.

Two sources: a torch backbone of ours, exported once (`export_backbone`; cached in the feature
cache's `onnx/` folder with a SHA-256 sidecar, and checked against the torch features on real
images before use), and an encoder the hospital brings as an ONNX file (`load_onnx_file`; input
size and normalisation read from the file or given). Both see the same preprocessed pixels as
the torch path (`backbones.prepare_images`). Batch and thread settings: docs/results.md,
"Feature extraction throughput".
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console

from medblindtuner.formats import sha256_file

from .backbones import Backbone, BackboneError, BackboneInfo, OnnxInput, prepare_images
from .cache import safe_file_name

ONNX_OPSET = 17
EXPORT_FORMAT = 1  # bump when the exported graph changes (part of the cache key)
# Images per ONNX Runtime call: batches of 8 measured fastest on 2 cores (docs/results.md).
ONNX_BATCH = 8
# An export is used only if its features equal the torch features within this (absolute).
EXPORT_TOLERANCE = 1e-4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def session_options(threads: int, spinning: bool = False) -> ort.SessionOptions:
    """One intra-op pool of `threads`, no inter-op parallelism, every graph optimisation.

    spinning: ORT's default busy-waiting of idle pool threads; off by default, since on a
    shared machine the spinning threads take the cores the work needs (docs/results.md).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Failures become one BackboneError line; ORT's own log would print them a second time.
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    return options


@dataclass(frozen=True)
class GraphSpec:
    """How an ONNX encoder takes its images and gives its features."""

    channels: int  # 1 or 3
    channels_last: bool  # (B,S,S,C) instead of (B,C,S,S)
    size: int | None  # None: symbolic in the file
    fixed_batch: int | None  # None: any batch size
    output: str | None = None  # the (batch, features) output; None: the first


class OnnxEncoder:
    """An ONNX image encoder behind the `Encoder` contract (uint8 images -> float32 features)."""

    runtime = f"onnxruntime {ort.__version__}"

    def __init__(self, session: ort.InferenceSession, info: BackboneInfo, spec: GraphSpec,
                 model_sha256: str) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.info = info
        self.spec = spec
        self.model_sha256 = model_sha256
        self.preferred_batch = spec.fixed_batch or ONNX_BATCH
        shape = (1, spec.channels, 1, 1)
        self._mean = torch.tensor(info.mean[: spec.channels]).view(shape)
        self._std = torch.tensor(info.std[: spec.channels]).view(shape)

    def with_info(self, info: BackboneInfo) -> OnnxEncoder:
        """The same session described by another `BackboneInfo`."""
        return OnnxEncoder(self._session, info, self.spec, self.model_sha256)

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            outputs = None if self.spec.output is None else [self.spec.output]
            return np.asarray(self._session.run(outputs, {self._input: x})[0], dtype=np.float32)
        except Exception as exc:  # ORT raises its own exception types
            reason = " ".join(str(exc).split())[:300]
            raise BackboneError(f"{self.info.name}: ONNX Runtime failed ({reason})") from exc

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (B,H,W[,C]) -> float32 (B, D) features."""
        x = prepare_images(images, self.info.input_size, self._mean, self._std,
                           self.spec.channels)
        if self.spec.channels_last:
            x = x.permute(0, 2, 3, 1)
        arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        step = self.spec.fixed_batch
        if step is None or len(arr) == step:
            return self._run(arr)
        parts = []
        for start in range(0, len(arr), step):  # a model exported for one batch size only
            chunk = arr[start : start + step]
            pad = np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)
            parts.append(self._run(np.concatenate([chunk, pad]))[: len(chunk)])
        return np.concatenate(parts)


# --- our torch backbones, exported once ------------------------------------------------------


def export_key(info: BackboneInfo) -> str:
    """Everything that changes the exported graph: backbone, weights, input, exporter."""
    text = (f"v{EXPORT_FORMAT}|{info.name}|{info.arch}|{info.weights_sha256}|{info.input_size}|"
            f"{info.mean}|{info.std}|opset{ONNX_OPSET}|torch{torch.__version__}")
    return hashlib.sha256(text.encode()).hexdigest()


def _export_bytes(backbone: Backbone) -> bytes:
    """The backbone (normalised (B,3,S,S) -> (B,D)) as ONNX bytes, batch axis dynamic, with
    its input size and normalisation as metadata (so the file also works as onnx:PATH)."""
    import onnx

    dummy = backbone.prepare(np.zeros((2, 8, 8, 3), np.uint8))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter warns about its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            backbone, (dummy,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    info = backbone.info
    for key, value in (("input_size", str(info.input_size)), ("mean", json.dumps(info.mean)),
                       ("std", json.dumps(info.std)), ("backbone", info.name),
                       ("weights_sha256", info.weights_sha256)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def _cached_export(path: Path, console: Console) -> bool:
    """Whether `path` holds an export whose SHA-256 equals its sidecar's (else it is redone)."""
    sidecar = path.with_name(path.name + ".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        recorded = json.loads(sidecar.read_text())["sha256"]
    except (ValueError, KeyError, OSError, TypeError) as exc:
        console.print(f"[yellow]ONNX export sidecar {sidecar} unreadable ({exc}); exporting again")
        return False
    if sha256_file(path) != recorded:
        console.print(f"[yellow]ONNX export {path} does not match its checksum; exporting again")
        return False
    return True


def _write_export(path: Path, model: bytes, info: BackboneInfo, deviation: float) -> None:
    """The export and its sidecar (SHA-256, provenance), each written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".json")
    record = {"sha256": hashlib.sha256(model).hexdigest(), "backbone": info.to_dict(),
              "opset": ONNX_OPSET, "torch": torch.__version__,
              "max_abs_deviation_from_torch": deviation}
    for target, data in ((path, model), (sidecar, (json.dumps(record, indent=2) + "\n").encode())):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def _deviation(encoder: OnnxEncoder, backbone: Backbone, probe_images: np.ndarray) -> float:
    """Largest |ONNX - torch| feature difference on the probe images."""
    return float(np.abs(encoder.features(probe_images) - backbone.features(probe_images)).max())


def export_backbone(backbone: Backbone, cache_dir: Path | None, threads: int,
                    probe_images: np.ndarray, console: Console,
                    spinning: bool = False) -> OnnxEncoder:
    """The backbone as an ONNX Runtime encoder, exported once per backbone and weights.

    cache_dir: the feature cache folder (the export goes to its `onnx/` folder; None: export
    in memory each time). A fresh export is checked on `probe_images` against the torch
    features (EXPORT_TOLERANCE). Raises BackboneError when export or the check fails.
    """
    info = backbone.info
    spec = GraphSpec(channels=3, channels_last=False, size=info.input_size, fixed_batch=None)
    path = None
    if cache_dir is not None:
        name = f"{safe_file_name(info.name)}-{export_key(info)[:24]}.onnx"
        path = Path(cache_dir) / "onnx" / name
        if _cached_export(path, console):
            session = ort.InferenceSession(str(path), session_options(threads, spinning),
                                           providers=["CPUExecutionProvider"])
            return OnnxEncoder(session, info, spec, sha256_file(path))
    try:
        model = _export_bytes(backbone)
        session = ort.InferenceSession(model, session_options(threads, spinning),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # exporter and runtime raise many types
        reason = " ".join(str(exc).split())[:300]
        raise BackboneError(f"ONNX export of {info.name} failed ({reason})") from exc
    encoder = OnnxEncoder(session, info, spec, hashlib.sha256(model).hexdigest())
    deviation = _deviation(encoder, backbone, probe_images[:2])
    if not deviation <= EXPORT_TOLERANCE:
        raise BackboneError(f"ONNX export of {info.name} differs from torch by {deviation:.2e} "
                            f"(> {EXPORT_TOLERANCE:g})")
    if path is not None:
        _write_export(path, model, info, deviation)
        console.print(f"exported {info.name} to ONNX: {path} (max |ONNX - torch| "
                      f"{deviation:.1e} on {min(2, len(probe_images))} images)")
    return encoder


# --- an encoder the hospital brings ----------------------------------------------------------


def _input_spec(session: ort.InferenceSession, path: Path) -> GraphSpec:
    """Layout, channels, size and batch of the encoder's one image input (else BackboneError)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BackboneError(f"{path}: an image encoder takes one input, this model takes "
                            f"{len(inputs)} ({', '.join(i.name for i in inputs)})")
    first = inputs[0]
    shape = list(first.shape)
    if first.type != "tensor(float)":
        raise BackboneError(f"{path}: input '{first.name}' is {first.type}; expected float32")
    if len(shape) != 4:
        raise BackboneError(f"{path}: input '{first.name}' has rank {len(shape)} {shape}; "
                            "expected images (batch, channels, size, size)")
    if shape[1] in (1, 3):
        channels, last, spatial = shape[1], False, shape[2:]
    elif shape[3] in (1, 3):
        channels, last, spatial = shape[3], True, shape[1:3]
    else:
        raise BackboneError(f"{path}: input shape {shape} has no 1- or 3-channel axis; expected "
                            "(batch, 3, size, size) or (batch, size, size, 3)")
    sizes = {d for d in spatial if isinstance(d, int)}
    if len(sizes) > 1 or (len(sizes) == 1 and not all(isinstance(d, int) for d in spatial)):
        raise BackboneError(f"{path}: input shape {shape} is not square; expected equal sides")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return GraphSpec(channels, last, sizes.pop() if sizes else None, batch)


def _metadata_floats(meta: dict[str, str], key: str, path: Path) -> tuple[float, ...] | None:
    """A float list from the file's metadata: JSON list or comma-separated (None: absent)."""
    if key not in meta:
        return None
    text = meta[key].strip()
    try:
        values = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        return tuple(float(v) for v in values)
    except (ValueError, TypeError) as exc:
        raise BackboneError(
            f"{path}: metadata '{key}' = {text!r} is not a list of numbers") from exc


def _per_channel(values: tuple[float, ...], what: str, channels: int, path: Path,
                 ) -> tuple[float, float, float]:
    """Normalisation values as three per-channel values (one value: every channel)."""
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or (channels == 1 and len(set(values)) != 1):
        raise BackboneError(f"{path}: {what} needs 1 or 3 values for a {channels}-channel "
                            f"input, got {list(values)}")
    return values  # type: ignore[return-value]


def _input_info(path: Path, spec: GraphSpec, meta: dict[str, str], given: OnnxInput,
                console: Console) -> tuple[int, tuple[float, float, float], tuple[float, ...]]:
    """Input size, mean and std: given values first, then the file (shape, metadata)."""
    size = given.input_size or spec.size
    if size is None and "input_size" in meta:
        try:
            size = int(meta["input_size"])
        except ValueError as exc:
            raise BackboneError(f"{path}: metadata input_size = {meta['input_size']!r}") from exc
    if size is None:
        raise BackboneError(f"{path}: the input size is symbolic and not in the metadata; "
                            "give it with --input-size")
    if spec.size is not None and size != spec.size:
        raise BackboneError(f"{path}: the model takes {spec.size}x{spec.size} images, "
                            f"--input-size {size} given")
    mean = given.mean or _metadata_floats(meta, "mean", path)
    std = given.std or _metadata_floats(meta, "std", path)
    if mean is None or std is None:
        console.print(f"[yellow]notice:[/] {path.name} states no normalisation (metadata "
                      "'mean'/'std'); assuming ImageNet's, give --mean/--std if it differs")
        mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    if any(s <= 0 for s in std):
        raise BackboneError(f"{path}: std must be positive, got {list(std)}")
    return (size, _per_channel(mean, "mean", spec.channels, path),
            _per_channel(std, "std", spec.channels, path))


def _features_output(session: ort.InferenceSession, path: Path) -> str:
    """The output of rank 2, (batch, features): the first output, else the only one of rank 2
    (e.g. `pooler_output` beside `last_hidden_state`); else BackboneError."""
    outputs = session.get_outputs()
    ranked = [o for o in outputs if len(o.shape) == 2]
    if len(outputs[0].shape) == 2 or len(ranked) == 1:
        return (outputs[0] if len(outputs[0].shape) == 2 else ranked[0]).name
    first = outputs[0]
    raise BackboneError(f"{path}: output '{first.name}' has shape {list(first.shape)}; "
                        "expected (batch, features): export the pooled embedding")


def _check_output(encoder: OnnxEncoder, path: Path) -> int:
    """Feature width, from a trial run of the features output (else BackboneError)."""
    trial = np.full((2, encoder.info.input_size, encoder.info.input_size, 3), 128, np.uint8)
    feats = encoder.features(trial)
    if feats.ndim != 2 or feats.shape[0] != 2 or feats.shape[1] < 1:
        raise BackboneError(f"{path}: a batch of 2 images gave output {list(feats.shape)}; "
                            "expected (2, features)")
    if not np.all(np.isfinite(feats)):
        raise BackboneError(f"{path}: the encoder gave non-finite features on a gray image")
    return int(feats.shape[1])


def load_onnx_file(path: Path, given: OnnxInput, threads: int, console: Console) -> OnnxEncoder:
    """A hospital's ONNX image encoder, checked: one float image input of rank 4 (1 or 3
    channels, square), output (batch, features), finite features on a trial batch.

    Input size and normalisation: `given` first, then the file (input shape; metadata keys
    input_size, mean, std), ImageNet's mean/std with a notice when neither says. The weights
    hash is the file's SHA-256, so the feature cache is keyed by the file's content.
    """
    if not path.is_file():
        raise BackboneError(f"{path}: ONNX encoder file not found")
    try:
        session = ort.InferenceSession(str(path), session_options(threads),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        reason = " ".join(str(exc).split())[:300]
        raise BackboneError(f"{path}: not a readable ONNX model ({reason})") from exc
    spec = dataclasses.replace(_input_spec(session, path),
                               output=_features_output(session, path))
    meta = dict(session.get_modelmeta().custom_metadata_map)
    size, mean, std = _input_info(path, spec, meta, given, console)
    sha = sha256_file(path)
    graph = session.get_modelmeta().graph_name or "onnx"
    info = BackboneInfo(name=f"onnx:{path.name}", arch=f"onnx graph {graph}", feature_dim=0,
                        weights_source=f"file:{path.resolve()}", weights_sha256=sha,
                        pretrained=True, input_size=size, mean=mean, std=std)  # type: ignore[arg-type]
    encoder = OnnxEncoder(session, info, spec, sha)
    width = _check_output(encoder, path)
    return encoder.with_info(dataclasses.replace(info, feature_dim=width))
