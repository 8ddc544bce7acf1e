"""Feature layer: frozen encoders (torch, ONNX Runtime), cached extraction, bounded-norm scaling.

Names are imported on first use (PEP 562): the backbones need torch and the scaler needs
scikit-learn, seconds of imports that commands such as `medblindtuner --help` do not need.
"""

from __future__ import annotations

import importlib
from typing import Any

from .cache import DEFAULT_CACHE_DIR

_SOURCES = {
    "BACKBONES": "backbones",
    "RANDOM": "backbones",
    "Backbone": "backbones",
    "BackboneError": "backbones",
    "BackboneInfo": "backbones",
    "Encoder": "backbones",
    "OnnxInput": "backbones",
    "load_backbone": "backbones",
    "FeatureSet": "extract",
    "available_cores": "extract",
    "extract_features": "extract",
    "RUNTIMES": "extract",
    "FeatureScaler": "preprocess",
}

__all__ = ["DEFAULT_CACHE_DIR", *_SOURCES]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value
