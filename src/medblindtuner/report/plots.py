"""Report plots: loss curves, ROC curves, confusion matrices (matplotlib, PNG)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .values import (
    _DPI,
    _RC,
    _as_fraction,
    _class_names,
    _get,
    _num,
    _ordered_runs,
    _run_label,
    _run_style,
)

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
    series = _loss_series(results)
    if not series:
        return False
    has_acc = any(a is not None for *_, acc in series for a in acc)
    with rc_context(_RC):
        ncols = 2 if has_acc else 1
        fig = Figure(figsize=(6.5 * ncols, 4.6), dpi=_DPI, layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        ax = axes[0]
        best_drawn = False
        for key, run, idx, epochs, train, val, acc in series:
            drawn = _draw_run_losses(ax, axes[1] if has_acc else None, key, run, idx, epochs,
                                     train, val, acc)
            best_drawn = best_drawn or drawn
        ax.set_xlabel("Epoch")
        ax.set_ylabel(str(results.get("loss_name") or "Loss"))
        ax.set_title("Loss per epoch")
        _loss_legend(ax, series, best_drawn)
        if has_acc:
            axes[1].set_xlabel("Epoch")
            axes[1].set_ylabel("Validation accuracy")
            axes[1].set_title("Validation accuracy per epoch")
            axes[1].legend(loc="best", frameon=True, framealpha=0.9)
        for a in axes:
            a.xaxis.get_major_locator().set_params(integer=True)
        fig.savefig(path)
    return True


def _loss_series(results: Mapping[str, Any]) -> list[tuple]:
    """(key, run, index, epochs, train losses, val losses, val accuracies) per run with a
    history."""
    series = []
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
        series.append((key, run, idx, epochs, train, val, acc))
    return series


def _xy(xs: list[float], ys: list[float | None]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _draw_run_losses(ax: Any, acc_ax: Any, key: str, run: Mapping[str, Any], idx: int,
                     epochs: list, train: list, val: list, acc: list) -> bool:
    """One run's validation and train losses (and accuracies on `acc_ax`); True when its best
    epoch was marked."""
    has_acc = acc_ax is not None
    axes = [ax, acc_ax]
    best_drawn = False
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
    return best_drawn


def _loss_legend(ax: Any, series: list[tuple], best_drawn: bool) -> None:
    """Compact legend: one colour entry per run plus line-style keys, instead of 2 x runs."""
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
    names = _class_names(results, n_classes)
    runs = []
    for idx, (key, run) in enumerate(_ordered_runs(results)):
        arrays = _test_arrays(run, n_classes)
        if arrays is not None and arrays.y_score is not None:
            runs.append((key, run, idx, arrays))
    if not runs:
        return False
    if n_classes > 2:
        return _plot_multiclass_roc(runs, names, path)
    return _plot_binary_roc(runs, names, path)


def _plot_binary_roc(runs: list[tuple], names: list[str], path: Path) -> bool:
    """One ROC curve per run (positive class: the second)."""
    from sklearn.metrics import auc, roc_curve

    with rc_context(_RC):
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


def _plot_multiclass_roc(runs: list[tuple], names: list[str], path: Path) -> bool:
    """Macro-average one-vs-rest ROC per run, and per-class curves of the encrypted run."""
    with rc_context(_RC):
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
