"""Where extracted features are cached (kept free of heavy imports: the CLI reads it at start)."""

from __future__ import annotations

from pathlib import Path

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "medblindtuner" / "features"
