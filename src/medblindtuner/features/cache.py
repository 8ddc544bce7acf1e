"""Where extracted features are cached (kept free of heavy imports: the CLI reads it at start)."""

from __future__ import annotations

import re
from pathlib import Path

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "medblindtuner" / "features"


def safe_file_name(name: str) -> str:
    """A backbone name as a cache file-name part (`onnx:enc.onnx` -> `onnx_enc.onnx`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
