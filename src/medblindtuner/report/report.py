"""Results report for a MedBlindTuner run: Markdown + self-contained HTML + PNG plots.

The report is built from one plain ``results`` dict so that the trainer, the demo command and the
benchmarks can all produce it without importing each other. Every field except ``runs`` is
optional; anything missing renders as "—" instead of raising, because a report of a partial run
is still more useful than a stack trace.

Input schema (all keys optional unless noted)::

    {
      "dataset": "breastmnist",
      "n_classes": 2,                      # inferred from class_names / scores / labels if absent
      "class_names": ["malignant", "normal/benign"],
      "backbone": {"name": "efficientnet_lite0", "feature_dim": 1280, "weights": "..."},
                                           # a plain string is accepted too
      "command": "medblindtuner demo --dataset breastmnist",
      "ckks": {"ring_dim": 65536, "security": "HEStd_128_classic", "scaling_bits": 50,
               "depth": 24, "slots": 32768, ...},   # any keys, rendered as a table
      "sizes_bytes": {"public_bundle": int, "secret_key": int, "encrypted_dataset": int,
                      "ciphertext": int, ...},
      "peak_rss_bytes": {"hospital": int, "cloud": int, ...},
      "timings_s": {"features": float, "keygen": float, "encrypt": float, "training": float,
                    "total": float, ...},
      "report_dir": "path/to/this/report",  # only used by build_combined_report
      "runs": {                              # required; conventional keys below, others allowed
        "plaintext": run, "mirror": run, "encrypted": run
      }
    }

    run = {
      "label": "Plaintext (exact softmax)",
      "test": {"acc": float, "auc": float,
               "y_true": [int],
               "y_score": [[float per class]] or [float] (binary: score of class 1),
               "y_pred": [int]},           # derived from y_score when absent
      "val": {"acc": float, "auc": float},
      "history": [{"epoch": 1, "train_loss": float, "val_loss": float, "val_acc": float}],
      "epochs": int, "best_epoch": int, "steps": int, "wall_time_s": float,
      "ops": {"bootstraps": int, "rotations": int, "multiplications": int}  # encrypted only
    }

Accuracies and AUCs are fractions in [0, 1]. NumPy arrays/scalars are accepted anywhere a list or
number is expected.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

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


# --------------------------------------------------------------------------------------------
# Test-split arrays
# --------------------------------------------------------------------------------------------


@dataclass
class _TestArrays:
    y_true: np.ndarray
    y_score: np.ndarray | None  # (n,) binary score of class 1, or (n, C)
    y_pred: np.ndarray


def _test_arrays(run: Mapping[str, Any], n_classes: int | None) -> _TestArrays | None:
    """Labels, scores and predictions of a run's test split, or None if unusable."""
    y_true = _get(run, "test", "y_true")
    if y_true is None:
        return None
    y_true = np.asarray(y_true).astype(int).ravel()
    if y_true.size == 0:
        return None
    score = _get(run, "test", "y_score")
    y_score = None
    if score is not None:
        y_score = np.asarray(score, dtype=float)
        if y_score.ndim == 2 and y_score.shape[1] == 1:
            y_score = y_score.ravel()
        if y_score.shape[0] != y_true.size or y_score.ndim > 2:
            y_score = None
    pred = _get(run, "test", "y_pred")
    if pred is not None and np.asarray(pred).size == y_true.size:
        y_pred = np.asarray(pred).astype(int).ravel()
    elif y_score is not None:
        if y_score.ndim == 2:
            y_pred = y_score.argmax(axis=1)
        else:
            # Probabilities threshold at 0.5; scores outside [0, 1] are logits and threshold at 0.
            thr = 0.5 if (y_score.min() >= 0 and y_score.max() <= 1) else 0.0
            y_pred = (y_score >= thr).astype(int)
    else:
        return None
    return _TestArrays(y_true, y_score, y_pred)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _plot_loss_curves(results: Mapping[str, Any], path: Path) -> bool:
    """Train (dashed) and validation (solid) loss per epoch for every run with a history."""
    series = []
    has_acc = False
    for idx, (key, run) in enumerate(_ordered_runs(results)):
        hist = run.get("history") or []
        rows = [h for h in hist if isinstance(h, Mapping)]
        if not rows:
            continue
        epochs = [_num(h.get("epoch")) for h in rows]
        epochs = [e if e is not None else i + 1 for i, e in enumerate(epochs)]
        train = [_num(h.get("train_loss")) for h in rows]
        val = [_num(h.get("val_loss")) for h in rows]
        acc = [_as_fraction(h.get("val_acc")) for h in rows]
        has_acc = has_acc or any(a is not None for a in acc)
        series.append((key, run, idx, epochs, train, val, acc))
    if not series:
        return False

    def _xy(xs: list[float], ys: list[float | None]) -> tuple[list[float], list[float]]:
        pairs = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    with rc_context(_RC):
        ncols = 2 if has_acc else 1
        fig = Figure(figsize=(6.5 * ncols, 4.6), dpi=_DPI, layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        ax = axes[0]
        best_drawn = False
        for key, run, idx, epochs, train, val, acc in series:
            style = _run_style(key, idx)
            label = _run_label(key, run)
            every = max(1, len(epochs) // 15)
            x, y = _xy(epochs, val)
            if x:
                ax.plot(
                    x,
                    y,
                    "-",
                    color=style["color"],
                    marker=style["marker"],
                    markersize=4,
                    markevery=every,
                    lw=1.8,
                    label=f"{label} — validation",
                )
            x, y = _xy(epochs, train)
            if x:
                ax.plot(
                    x, y, "--", color=style["color"], lw=1.4, alpha=0.85, label=f"{label} — train"
                )
            best = _num(run.get("best_epoch"))
            if best is not None and best in epochs:
                bval = val[epochs.index(best)]
                if bval is not None:
                    ax.plot(
                        [best],
                        [bval],
                        "*",
                        color=style["color"],
                        markersize=14,
                        markeredgecolor="black",
                        markeredgewidth=0.6,
                        zorder=5,
                    )
                    best_drawn = True
            if has_acc:
                x, y = _xy(epochs, acc)
                if x:
                    axes[1].plot(
                        x,
                        y,
                        "-",
                        color=style["color"],
                        marker=style["marker"],
                        markersize=4,
                        markevery=every,
                        lw=1.8,
                        label=label,
                    )
        ax.set_xlabel("Epoch")
        ax.set_ylabel(str(results.get("loss_name") or "Loss"))
        ax.set_title("Loss per epoch")
        # Compact legend: one colour entry per run plus line-style keys, instead of 2 x runs.
        handles = [
            Line2D(
                [],
                [],
                color=_run_style(key, idx)["color"],
                marker=_run_style(key, idx)["marker"],
                lw=1.8,
                label=_run_label(key, run),
            )
            for key, run, idx, *_ in series
        ]
        handles += [
            Line2D([], [], color="dimgray", ls="-", lw=1.8, label="validation"),
            Line2D([], [], color="dimgray", ls="--", lw=1.4, label="train"),
        ]
        if best_drawn:
            handles.append(
                Line2D(
                    [],
                    [],
                    ls="",
                    marker="*",
                    markersize=12,
                    color="lightgray",
                    markeredgecolor="black",
                    markeredgewidth=0.6,
                    label="best epoch",
                )
            )
        ax.legend(handles=handles, loc="upper right", frameon=True, framealpha=0.9)
        if has_acc:
            axes[1].set_xlabel("Epoch")
            axes[1].set_ylabel("Validation accuracy")
            axes[1].set_title("Validation accuracy per epoch")
            axes[1].legend(loc="best", frameon=True, framealpha=0.9)
        for a in axes:
            a.xaxis.get_major_locator().set_params(integer=True)
        fig.savefig(path)
    return True


def _plot_confusion(
    arrays: _TestArrays, n_classes: int, names: list[str], title: str, path: Path
) -> None:
    """Counts with row-normalised percentages, so class imbalance stays readable."""
    n = max(n_classes, int(arrays.y_true.max()) + 1, int(arrays.y_pred.max()) + 1)
    names = names + [f"class {i}" for i in range(len(names), n)]
    # MedMNIST names can be long ("colorectal adenocarcinoma epithelium"): wrap, don't shrink.
    names = [textwrap.fill(s, 18) for s in names]
    cm = np.zeros((n, n), dtype=int)
    for t, p in zip(arrays.y_true, arrays.y_pred, strict=False):
        if 0 <= t < n and 0 <= p < n:
            cm[t, p] += 1
    row = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row, out=np.zeros(cm.shape, dtype=float), where=row > 0)

    size = 3.2 + 0.9 * n
    long_names = max(len(line) for s in names for line in s.splitlines()) > 8
    with rc_context({**_RC, "axes.grid": False}):
        fig = Figure(
            figsize=(size + 1.2, size + (0.6 if long_names else 0)), dpi=_DPI, layout="constrained"
        )
        ax = fig.subplots()
        im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cbar.set_label("Fraction of true class")
        fs = 11 if n <= 5 else 9
        for i in range(n):
            for j in range(n):
                colour = "white" if frac[i, j] > 0.55 else "black"
                txt = f"{cm[i, j]}\n({100 * frac[i, j]:.1f}%)" if cm[i, j] else "0"
                ax.text(j, i, txt, ha="center", va="center", color=colour, fontsize=fs)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        if long_names:
            ax.set_xticklabels(names, rotation=30, ha="right", rotation_mode="anchor")
        else:
            ax.set_xticklabels(names)
        ax.set_yticklabels(names)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        for spine in ax.spines.values():
            spine.set_visible(False)
        acc = float(np.mean(arrays.y_true == arrays.y_pred))
        ax.set_title(f"{title}\ntest accuracy {acc:.4f}, n = {arrays.y_true.size}")
        fig.savefig(path)


def _binary_scores(arrays: _TestArrays) -> np.ndarray | None:
    s = arrays.y_score
    if s is None:
        return None
    if s.ndim == 1:
        return s
    return s[:, 1] if s.shape[1] >= 2 else None


def _macro_roc(
    y_true: np.ndarray, y_score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float, list[tuple[int, np.ndarray, np.ndarray, float]]]:
    """One-vs-rest macro average (mean TPR on the union of FPR points), plus per-class curves."""
    from sklearn.metrics import auc, roc_curve

    per_class = []
    for c in range(y_score.shape[1]):
        pos = y_true == c
        if pos.all() or not pos.any():
            continue  # ROC undefined for a class that is absent or the only one present
        fpr, tpr, _ = roc_curve(pos.astype(int), y_score[:, c])
        per_class.append((c, fpr, tpr, float(auc(fpr, tpr))))
    if not per_class:
        return np.array([]), np.array([]), float("nan"), []
    grid = np.unique(np.concatenate([p[1] for p in per_class]))
    mean_tpr = np.mean([np.interp(grid, p[1], p[2]) for p in per_class], axis=0)
    return grid, mean_tpr, float(auc(grid, mean_tpr)), per_class


def _plot_roc(results: Mapping[str, Any], n_classes: int, path: Path) -> bool:
    """Binary: one curve per run. Multi-class: macro-average per run + per-class (encrypted)."""
    from sklearn.metrics import auc, roc_curve

    names = _class_names(results, n_classes)
    runs = []
    for idx, (key, run) in enumerate(_ordered_runs(results)):
        arrays = _test_arrays(run, n_classes)
        if arrays is not None and arrays.y_score is not None:
            runs.append((key, run, idx, arrays))
    if not runs:
        return False
    multiclass = n_classes > 2

    with rc_context(_RC):
        if not multiclass:
            fig = Figure(figsize=(6.4, 5.8), dpi=_DPI, layout="constrained")
            ax = fig.subplots()
            drawn = 0
            for key, run, idx, arrays in runs:
                score = _binary_scores(arrays)
                yt = (arrays.y_true == 1).astype(int)
                if score is None or yt.min() == yt.max():
                    continue
                fpr, tpr, _ = roc_curve(yt, score)
                style = _run_style(key, idx)
                ax.plot(
                    fpr,
                    tpr,
                    color=style["color"],
                    lw=2,
                    label=f"{_run_label(key, run)}: AUC {auc(fpr, tpr):.4f}",
                )
                drawn += 1
            if not drawn:
                return False
            _finish_roc_axes(ax, f"ROC on the test split (positive class: {names[1]})")
            fig.savefig(path)
            return True

        detail_key = "encrypted" if any(r[0] == "encrypted" for r in runs) else runs[-1][0]
        fig = Figure(figsize=(12.6, 5.8), dpi=_DPI, layout="constrained")
        ax_macro, ax_cls = fig.subplots(1, 2)
        drawn = 0
        for key, run, idx, arrays in runs:
            if arrays.y_score.ndim != 2:
                continue
            grid, mean_tpr, macro_auc, per_class = _macro_roc(arrays.y_true, arrays.y_score)
            if not per_class:
                continue
            style = _run_style(key, idx)
            label = _run_label(key, run)
            ax_macro.plot(
                grid,
                mean_tpr,
                color=style["color"],
                lw=2,
                label=f"{label}: macro AUC {macro_auc:.4f}",
            )
            drawn += 1
            if key == detail_key:
                cmap = _class_colors(len(names))
                for c, fpr, tpr, c_auc in per_class:
                    ax_cls.plot(
                        fpr,
                        tpr,
                        color=cmap[c % len(cmap)],
                        lw=1.6,
                        label=f"{names[c] if c < len(names) else c}: AUC {c_auc:.4f}",
                    )
                ax_cls.plot(
                    grid,
                    mean_tpr,
                    color="black",
                    lw=2.2,
                    ls="--",
                    label=f"macro average: AUC {macro_auc:.4f}",
                )
                detail_label = label
        if not drawn:
            return False
        _finish_roc_axes(ax_macro, "Macro-average one-vs-rest ROC, test split")
        _finish_roc_axes(ax_cls, f"Per-class one-vs-rest ROC: {detail_label}")
        fig.savefig(path)
    return True


def _class_colors(n: int) -> list[str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _finish_roc_axes(ax: Any, title: str) -> None:
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance: AUC 0.5")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", frameon=True, framealpha=0.9)


# --------------------------------------------------------------------------------------------
# Document model rendered to both Markdown and HTML
# --------------------------------------------------------------------------------------------


@dataclass
class _Link:
    text: str
    md_href: str
    html_href: str


Cell = str | _Link


@dataclass
class _Block:
    kind: str  # h1 | h2 | h3 | p | table | img | code
    text: str = ""
    headers: Sequence[str] = ()
    rows: Sequence[Sequence[Cell]] = ()
    numeric_from: int = 1  # columns >= this index are right-aligned


def _md_escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_md(blocks: list[_Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "code":
            out.append("```bash\n" + b.text + "\n```")
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.headers[0]})")
        elif b.kind == "table":
            head = "| " + " | ".join(_md_escape_cell(h) for h in b.headers) + " |"
            align = (
                "|"
                + "|".join("---:" if i >= b.numeric_from else ":---" for i in range(len(b.headers)))
                + "|"
            )
            lines = [head, align]
            for row in b.rows:
                cells = []
                for c in row:
                    if isinstance(c, _Link):
                        cells.append(f"[{_md_escape_cell(c.text)}]({c.md_href})")
                    else:
                        cells.append(_md_escape_cell(str(c)))
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #2ca02c; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .35em .75em; }
th { background: #f3f6f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f5f5f5; padding: .8em 1em; overflow-x: auto; border-radius: 4px; }
code { font-family: Menlo, Consolas, monospace; }
"""


def _inline_md_to_html(text: str) -> str:
    """Escape, then support the inline Markdown subset used in paragraphs (**, `, hard break)."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return s.replace("  \n", "<br>\n")


def _render_html(blocks: list[_Block], title: str) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline_md_to_html(b.text)}</p>")
        elif b.kind == "code":
            parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "img":
            src = html.escape(b.headers[0], quote=True)
            alt = html.escape(b.text, quote=True)
            parts.append(
                f'<figure><img src="{src}" alt="{alt}"><figcaption>{html.escape(b.text)}'
                "</figcaption></figure>"
            )
        elif b.kind == "table":
            rows = ["<table>", "<thead><tr>"]
            rows += [f"<th>{html.escape(h)}</th>" for h in b.headers]
            rows.append("</tr></thead><tbody>")
            for row in b.rows:
                rows.append("<tr>")
                for i, c in enumerate(row):
                    cls = ' class="num"' if i >= b.numeric_from else ""
                    if isinstance(c, _Link):
                        href = html.escape(c.html_href, quote=True)
                        inner = f'<a href="{href}">{html.escape(c.text)}</a>'
                    else:
                        inner = html.escape(str(c))
                    rows.append(f"<td{cls}>{inner}</td>")
                rows.append("</tr>")
            rows.append("</tbody></table>")
            parts.append("".join(rows))
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _write_docs(blocks: list[_Block], title: str, out_dir: Path) -> tuple[Path, Path]:
    md_path = out_dir / "report.md"
    html_path = out_dir / "report.html"
    md_path.write_text(_render_md(blocks), encoding="utf-8")
    html_path.write_text(_render_html(blocks, title), encoding="utf-8")
    return md_path, html_path


def _generated_line() -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Generated {now} by medblindtuner.report."


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _gap_points(results: Mapping[str, Any], metric: str, reference: str = "plaintext"
                ) -> float | None:
    """Encrypted minus a reference run's test metric, in percentage points."""
    plain = _as_fraction(_get(results, "runs", reference, "test", metric))
    enc = _as_fraction(_get(results, "runs", "encrypted", "test", metric))
    if plain is None or enc is None:
        return None
    return 100.0 * (enc - plain)


def build_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html, results.json and the PNG plots into ``out_dir``.

    Returns a mapping of artefact name to path: ``markdown``, ``html``, ``results_json`` and,
    when the data allow the plot, ``loss_curves``, ``roc`` and ``confusion_<run>`` per run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = results if isinstance(results, Mapping) else {}
    paths: dict[str, Path] = {}

    json_path = out_dir / "results.json"
    json_path.write_text(
        json.dumps(results, indent=2, default=_json_default, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    paths["results_json"] = json_path

    dataset = str(results.get("dataset") or DASH)
    backbone = _backbone_name(results) or DASH
    n_classes = _n_classes(results)
    runs = _ordered_runs(results)

    # ---- plots
    loss_path = out_dir / "loss_curves.png"
    if _plot_loss_curves(results, loss_path):
        paths["loss_curves"] = loss_path
    roc_path = out_dir / "roc.png"
    if n_classes is not None and _plot_roc(results, n_classes, roc_path):
        paths["roc"] = roc_path
    confusion: list[tuple[str, str, Path]] = []
    for key, run in runs:
        arrays = _test_arrays(run, n_classes)
        if arrays is None:
            continue
        n = n_classes or int(max(arrays.y_true.max(), arrays.y_pred.max())) + 1
        p = out_dir / f"confusion_{_safe_name(key)}.png"
        _plot_confusion(arrays, n, _class_names(results, n), _run_label(key, run), p)
        paths[f"confusion_{_safe_name(key)}"] = p
        confusion.append((key, _run_label(key, run), p))

    # ---- document
    title = f"MedBlindTuner report — {dataset} · {backbone}"
    blocks: list[_Block] = [_Block("h1", title), _Block("p", _generated_line())]

    bb = results.get("backbone") if isinstance(results.get("backbone"), Mapping) else {}
    names = results.get("class_names")
    class_txt = f"{n_classes}" if n_classes is not None else DASH
    if names:
        class_txt += " (" + ", ".join(str(n) for n in names) + ")"
    blocks.append(
        _Block(
            "p",
            "  \n".join(
                [
                    f"**Dataset:** {dataset}",
                    f"**Classes:** {class_txt}",
                    f"**Backbone:** {backbone}" + _backbone_details(bb),
                ]
            ),
        )
    )

    blocks.append(_Block("h2", "Results"))
    rows = []
    for key, run in runs:
        rows.append(
            [
                _run_label(key, run),
                _fmt_metric(_get(run, "test", "acc")),
                _fmt_metric(_get(run, "test", "auc")),
                _fmt_metric(_get(run, "val", "acc")),
                _fmt_metric(_get(run, "val", "auc")),
                _fmt_int(run.get("epochs")),
                _fmt_int(run.get("best_epoch")),
                _fmt_seconds(run.get("wall_time_s")),
                _fmt_int(_get(run, "ops", "bootstraps")),
                _fmt_int(run.get("steps")),
            ]
        )
    if rows:
        blocks.append(
            _Block(
                "table",
                headers=[
                    "Run",
                    "Test ACC",
                    "Test AUC",
                    "Val ACC",
                    "Val AUC",
                    "Epochs run",
                    "Best epoch",
                    "Wall time",
                    "Bootstraps",
                    "Steps",
                ],
                rows=rows,
            )
        )
    else:
        blocks.append(_Block("p", "No runs recorded."))
    gap_acc, gap_auc = _gap_points(results, "acc"), _gap_points(results, "auc")
    if gap_acc is not None or gap_auc is not None:
        blocks.append(
            _Block(
                "p",
                (
                    "Encrypted minus plaintext (exact) on the test split: "
                    f"ACC {_fmt_points(gap_acc)} points, AUC {_fmt_points(gap_auc)} points."
                ),
            )
        )
    probe_acc, probe_auc = (_gap_points(results, m, "probe") for m in ("acc", "auc"))
    if probe_acc is not None or probe_auc is not None:
        blocks.append(
            _Block(
                "p",
                (
                    "Encrypted minus the tuned probe (the bar: what scikit-learn gives in the "
                    f"clear on the same features): ACC {_fmt_points(probe_acc)} points, "
                    f"AUC {_fmt_points(probe_auc)} points."
                ),
            )
        )
    choices = _get(results, "recipe", "choices")
    if isinstance(choices, list) and choices:
        blocks.append(_Block("h3", "Training settings and why"))
        blocks.append(
            _Block(
                "table",
                headers=["Setting", "Value", "Source", "Reason"],
                rows=[[str(c.get("name")), _fmt_value(c.get("value")), str(c.get("source")),
                       str(c.get("why"))] for c in choices if isinstance(c, Mapping)],
                numeric_from=4,
            )
        )
    ops = _get(results, "runs", "encrypted", "ops")
    if isinstance(ops, Mapping) and ops:
        per_step = ops.get("per_step") if isinstance(ops.get("per_step"), Mapping) else {}
        blocks.append(_Block("h3", "Homomorphic operations (encrypted run)"))
        blocks.append(
            _Block(
                "table",
                headers=["Operation", "Total", "Per step"],
                rows=[
                    [
                        str(k).replace("_", " ").capitalize(),
                        _fmt_int(v),
                        _fmt_rate(per_step.get(k)),
                    ]
                    for k, v in ops.items()
                    if not isinstance(v, Mapping)
                ],
            )
        )

    blocks.append(_Block("h2", "Sizes and memory"))
    sizes = results.get("sizes_bytes") if isinstance(results.get("sizes_bytes"), Mapping) else {}
    size_rows = [[label, _fmt_bytes(sizes.get(k))] for k, label in _SIZE_LABELS.items()]
    size_rows += [
        [str(k).replace("_", " ").capitalize(), _fmt_bytes(v)]
        for k, v in sizes.items()
        if k not in _SIZE_LABELS
    ]
    rss = results.get("peak_rss_bytes")
    rss = rss if isinstance(rss, Mapping) else {}
    for k in ("hospital", "cloud"):
        size_rows.append([f"Peak memory (RSS), {k}", _fmt_bytes(rss.get(k))])
    size_rows += [
        [f"Peak memory (RSS), {k}", _fmt_bytes(v)]
        for k, v in rss.items()
        if k not in ("hospital", "cloud")
    ]
    blocks.append(_Block("table", headers=["Item", "Size"], rows=size_rows))

    timings = results.get("timings_s")
    if isinstance(timings, Mapping) and timings:
        blocks.append(_Block("h3", "Timings"))
        t_rows = [
            [label, _fmt_seconds(timings.get(k))]
            for k, label in _TIMING_LABELS.items()
            if k in timings
        ]
        t_rows += [
            [str(k).replace("_", " ").capitalize(), _fmt_seconds(v)]
            for k, v in timings.items()
            if k not in _TIMING_LABELS
        ]
        blocks.append(_Block("table", headers=["Stage", "Wall time"], rows=t_rows))

    blocks.append(_Block("h2", "CKKS parameters"))
    ckks = results.get("ckks")
    if isinstance(ckks, Mapping) and ckks:
        blocks.append(
            _Block(
                "table",
                headers=["Parameter", "Value"],
                rows=[[str(k), _fmt_value(v)] for k, v in ckks.items()],
                numeric_from=2,  # mixed strings and numbers read better left-aligned
            )
        )
    else:
        blocks.append(_Block("p", DASH))

    blocks.append(_Block("h2", "Plots"))
    if "loss_curves" in paths:
        blocks.append(
            _Block(
                "img",
                "Loss per epoch (validation solid, train dashed)",
                headers=["loss_curves.png"],
            )
        )
    else:
        blocks.append(_Block("p", f"Loss curves: {DASH} (no training history recorded)."))
    if "roc" in paths:
        blocks.append(_Block("img", "ROC curves on the test split", headers=["roc.png"]))
    else:
        blocks.append(_Block("p", f"ROC curves: {DASH} (no test scores recorded)."))
    if confusion:
        blocks.append(_Block("h3", "Confusion matrices (test split)"))
        for _key, label, p in confusion:
            blocks.append(_Block("img", f"Confusion matrix — {label}", headers=[p.name]))

    blocks.append(_Block("h2", "How to reproduce"))
    command = results.get("command")
    if command:
        blocks.append(_Block("code", str(command)))
    else:
        blocks.append(_Block("p", f"Command: {DASH}"))
    blocks.append(_Block("p", "The full input of this report is in `results.json`."))

    md_path, html_path = _write_docs(blocks, title, out_dir)
    paths["markdown"] = md_path
    paths["html"] = html_path
    return paths


def _rel_link(report_dir: Any, out_dir: Path, text: str) -> _Link | str:
    if not report_dir:
        return text
    target = Path(report_dir)
    try:
        rel = os.path.relpath(target.resolve(), out_dir.resolve())
    except ValueError:  # different drive on Windows
        rel = str(target.resolve())
    rel = Path(rel).as_posix()
    return _Link(text, f"{rel}/report.md", f"{rel}/report.html")


def build_combined_report(list_of_results: Sequence[dict], out_dir: Path) -> dict[str, Path]:
    """One table across datasets/backbones so the encrypted-vs-plaintext gap is seen at once.

    Returns ``{"markdown": ..., "html": ...}``. Rows link to per-run reports when a result has
    a ``report_dir`` key.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for res in list_of_results or []:
        if not isinstance(res, Mapping):
            continue
        dataset = str(res.get("dataset") or DASH)
        total = _get(res, "timings_s", "total")
        if total is None:
            total = _get(res, "runs", "encrypted", "wall_time_s")
        rows.append(
            [
                _rel_link(res.get("report_dir"), out_dir, dataset),
                _backbone_name(res) or DASH,
                _fmt_metric(_get(res, "runs", "plaintext", "test", "acc")),
                _fmt_metric(_get(res, "runs", "plaintext", "test", "auc")),
                _fmt_metric(_get(res, "runs", "encrypted", "test", "acc")),
                _fmt_metric(_get(res, "runs", "encrypted", "test", "auc")),
                _fmt_points(_gap_points(res, "acc")),
                _fmt_points(_gap_points(res, "auc")),
                _fmt_seconds(total),
                _fmt_int(_get(res, "runs", "encrypted", "ops", "bootstraps")),
            ]
        )
    title = "MedBlindTuner — combined results"
    blocks = [_Block("h1", title), _Block("p", _generated_line())]
    if rows:
        blocks.append(
            _Block(
                "table",
                headers=[
                    "Dataset",
                    "Backbone",
                    "Plain ACC",
                    "Plain AUC",
                    "Enc. ACC",
                    "Enc. AUC",
                    "ACC gap (pts)",
                    "AUC gap (pts)",
                    "Wall time",
                    "Bootstraps",
                ],
                rows=rows,
                numeric_from=2,
            )
        )
        blocks.append(
            _Block(
                "p",
                (
                    "Gap = encrypted minus plaintext (exact softmax) test metric, in percentage "
                    "points. Wall time is the end-to-end total when recorded, otherwise the "
                    "encrypted training time. Dataset names link to the per-run reports where "
                    "available."
                ),
            )
        )
    else:
        blocks.append(_Block("p", "No results."))
    md_path, html_path = _write_docs(blocks, title, out_dir)
    return {"markdown": md_path, "html": html_path}
