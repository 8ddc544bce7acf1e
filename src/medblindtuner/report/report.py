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

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .document import (
    _Block,
    _generated_line,
    _Link,
    _write_docs,
)
from .plots import (
    _plot_confusion,
    _plot_loss_curves,
    _plot_roc,
    _test_arrays,
)
from .values import (
    _SIZE_LABELS,
    _TIMING_LABELS,
    DASH,
    _as_fraction,
    _backbone_details,
    _backbone_name,
    _class_names,
    _fmt_bytes,
    _fmt_int,
    _fmt_metric,
    _fmt_points,
    _fmt_rate,
    _fmt_seconds,
    _fmt_value,
    _get,
    _json_default,
    _n_classes,
    _ordered_runs,
    _run_label,
    _safe_name,
)

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
    confusion = _write_plots(results, runs, n_classes, out_dir, paths)

    title = f"MedBlindTuner report — {dataset} · {backbone}"
    blocks: list[_Block] = [_Block("h1", title), _Block("p", _generated_line())]
    blocks += _header_blocks(results, dataset, backbone, n_classes)
    blocks += _results_blocks(results, runs)
    blocks += _settings_and_ops_blocks(results)
    blocks += _sizes_blocks(results)
    blocks += _ckks_blocks(results)
    blocks += _plot_blocks(paths, confusion)
    blocks += _reproduce_blocks(results)

    md_path, html_path = _write_docs(blocks, title, out_dir)
    paths["markdown"] = md_path
    paths["html"] = html_path
    return paths


def _write_plots(results: Mapping[str, Any], runs, n_classes: int | None, out_dir: Path,
                 paths: dict[str, Path]) -> list[tuple[str, str, Path]]:
    """Loss curves, ROC and one confusion matrix per run (those the data allow), recorded in
    ``paths``; returns the confusion matrices as (run key, label, path)."""
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

    return confusion


def _header_blocks(results: Mapping[str, Any], dataset: str, backbone: str,
                   n_classes: int | None) -> list[_Block]:
    """Dataset, classes and backbone."""
    blocks: list[_Block] = []
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

    return blocks


def _results_blocks(results: Mapping[str, Any], runs) -> list[_Block]:
    """The runs table and the encrypted run's gaps to the plaintext head and the probe."""
    blocks: list[_Block] = []
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
    return blocks


def _settings_and_ops_blocks(results: Mapping[str, Any]) -> list[_Block]:
    """The derived training settings (with reasons) and the encrypted run's HE operations."""
    blocks: list[_Block] = []
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

    return blocks


def _sizes_blocks(results: Mapping[str, Any]) -> list[_Block]:
    """Artifact sizes, peak memory per role, timings."""
    blocks: list[_Block] = []
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

    return blocks


def _ckks_blocks(results: Mapping[str, Any]) -> list[_Block]:
    """The CKKS parameters table."""
    blocks: list[_Block] = []
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

    return blocks


def _plot_blocks(paths: Mapping[str, Path], confusion: list[tuple[str, str, Path]]) -> list[_Block]:
    """The plots written by `_write_plots` (or a dash where one could not be drawn)."""
    blocks: list[_Block] = []
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

    return blocks


def _reproduce_blocks(results: Mapping[str, Any]) -> list[_Block]:
    """The command that produced the results."""
    blocks: list[_Block] = []
    blocks.append(_Block("h2", "How to reproduce"))
    command = results.get("command")
    if command:
        blocks.append(_Block("code", str(command)))
    else:
        blocks.append(_Block("p", f"Command: {DASH}"))
    blocks.append(_Block("p", "The full input of this report is in `results.json`."))

    return blocks


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
