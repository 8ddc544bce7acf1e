"""Report constants and tolerant accessors/formatters: a missing field renders as a dash."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DASH = "—"

#: Canonical order and styling of the runs compared: the bar (published, probe), then the
#: three trainers of the paper; unknown runs follow.
RUN_ORDER = ("published", "probe", "plaintext", "mirror", "encrypted")
_RUN_STYLE = {
    "probe": {"color": "#7f7f7f", "marker": "D"},
    "plaintext": {"color": "#1f77b4", "marker": "o"},
    "mirror": {"color": "#ff7f0e", "marker": "s"},
    "encrypted": {"color": "#2ca02c", "marker": "^"},
}
_EXTRA_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
_DEFAULT_LABELS = {
    "published": "MedMNIST v2 ResNet-18 (28), published",
    "probe": "Probe (scikit-learn, full features)",
    "plaintext": "Plaintext (exact)",
    "mirror": "Plaintext mirror",
    "encrypted": "Encrypted (CKKS)",
}

_SIZE_LABELS = {
    "public_bundle": "Public bundle (crypto context + evaluation keys)",
    "secret_key": "Secret key (stays at the hospital)",
    "encrypted_dataset": "Encrypted dataset",
    "ciphertext": "One ciphertext",
}
_TIMING_LABELS = {
    "features": "Feature extraction",
    "keygen": "Key generation",
    "encrypt": "Encryption",
    "training": "Encrypted training",
    "total": "Total",
}

_RC = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 9.5,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_DPI = 120



# --------------------------------------------------------------------------------------------
# Small tolerant accessors and formatters
# --------------------------------------------------------------------------------------------


def _get(obj: Any, *keys: str, default: Any = None) -> Any:
    """Nested ``dict.get`` that tolerates missing levels and non-dict values."""
    for key in keys:
        if not isinstance(obj, Mapping) or key not in obj or obj[key] is None:
            return default
        obj = obj[key]
    return obj


def _num(value: Any) -> float | None:
    """Return a finite float, or None for missing / non-numeric / NaN values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _fmt_metric(value: Any) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:.4f}"


def _fmt_rate(value: Any) -> str:
    """Per-step averages: one decimal, or a dash when missing."""
    return f"{value:.1f}" if isinstance(value, int | float) else DASH


def _fmt_int(value: Any) -> str:
    v = _num(value)
    return DASH if v is None else f"{int(round(v)):,}"


def _fmt_seconds(value: Any) -> str:
    """Human wall time: seconds below a minute, then m/s, then h/min."""
    v = _num(value)
    if v is None:
        return DASH
    if v < 60:
        return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"
    if v < 3600:
        m, s = divmod(int(round(v)), 60)
        return f"{m} min {s:02d} s"
    h, rem = divmod(int(round(v)), 3600)
    return f"{h} h {rem // 60:02d} min"


def _fmt_bytes(value: Any) -> str:
    """Binary units (KiB, MiB, ...) because key and ciphertext sizes are powers-of-two heavy."""
    v = _num(value)
    if v is None:
        return DASH
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(v) >= 1024 and i < len(units) - 1:
        v /= 1024
        i += 1
    return f"{int(v)} B" if i == 0 else f"{v:.2f} {units[i]}"


def _fmt_points(value: float | None) -> str:
    return DASH if value is None else f"{value:+.2f}"


def _fmt_value(value: Any) -> str:
    """Generic cell for free-form tables (CKKS parameters)."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) or DASH
    return str(value)


def _as_fraction(value: Any) -> float | None:
    """Accept accuracies given in percent by mistake (values > 1) so gaps stay in points."""
    v = _num(value)
    if v is None:
        return None
    return v / 100.0 if v > 1.0 else v


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "run"


def _ordered_runs(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    runs = _get(results, "runs", default={})
    if not isinstance(runs, Mapping):
        return []
    keys = [k for k in RUN_ORDER if k in runs] + [k for k in runs if k not in RUN_ORDER]
    return [(k, runs[k]) for k in keys if isinstance(runs[k], Mapping)]


def _run_label(key: str, run: Mapping[str, Any]) -> str:
    return str(run.get("label") or _DEFAULT_LABELS.get(key, key.replace("_", " ").title()))


def _run_style(key: str, index: int) -> dict[str, str]:
    if key in _RUN_STYLE:
        return _RUN_STYLE[key]
    markers = "Dvpx*h"
    return {
        "color": _EXTRA_COLORS[index % len(_EXTRA_COLORS)],
        "marker": markers[index % len(markers)],
    }


def _backbone_name(results: Mapping[str, Any]) -> str | None:
    backbone = results.get("backbone")
    if isinstance(backbone, Mapping):
        return backbone.get("name")
    return str(backbone) if backbone else None


def _backbone_details(backbone: Mapping[str, Any]) -> str:
    """ " (1,280-d features, weights imagenet)" with only the parts that are known."""
    parts = []
    if _num(backbone.get("feature_dim")) is not None:
        parts.append(f"{_fmt_int(backbone['feature_dim'])}-d features")
    if backbone.get("weights"):
        parts.append(f"weights {backbone['weights']}")
    return f" ({', '.join(parts)})" if parts else ""


def _n_classes(results: Mapping[str, Any]) -> int | None:
    n = _num(results.get("n_classes"))
    if n is not None:
        return int(n)
    names = results.get("class_names")
    if names:
        return len(names)
    for _, run in _ordered_runs(results):
        score = _get(run, "test", "y_score")
        if score is not None:
            arr = np.asarray(score, dtype=float)
            if arr.ndim == 2:
                return max(2, arr.shape[1])
            if arr.ndim == 1:
                return 2
    return None


def _class_names(results: Mapping[str, Any], n: int) -> list[str]:
    names = list(results.get("class_names") or [])
    return [str(names[i]) if i < len(names) else f"class {i}" for i in range(n)]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
