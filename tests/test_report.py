"""Report builder: files exist, PNGs are real images, tables carry the numbers, gaps show "—"."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from medblindtuner.report import build_combined_report, build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(
    rng: np.random.Generator,
    n_classes: int,
    label: str,
    skill: float,
    epochs: int,
    encrypted: bool = False,
    binary_1d: bool = False,
) -> dict:
    n = 120
    y_true = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y_true] += skill
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_pred = prob.argmax(axis=1)
    y_score = prob[:, 1] if (binary_1d and n_classes == 2) else prob
    history = [
        {
            "epoch": e,
            "train_loss": 1.2 * np.exp(-e / 6) + 0.2 + 0.01 * rng.normal(),
            "val_loss": 1.25 * np.exp(-e / 7) + 0.25 + 0.02 * rng.normal(),
            "val_acc": 0.5 + 0.4 * (1 - np.exp(-e / 5)),
        }
        for e in range(1, epochs + 1)
    ]
    run = {
        "label": label,
        "test": {
            "acc": float(np.mean(y_pred == y_true)),
            "auc": 0.8123 + 0.01 * skill,
            "y_true": y_true.tolist(),
            "y_score": y_score.tolist(),
            "y_pred": y_pred.tolist(),
        },
        "val": {"acc": 0.8, "auc": 0.85},
        "history": history,
        "epochs": epochs,
        "best_epoch": epochs - 2,
        "steps": epochs * 7,
        "wall_time_s": 5400.0 if encrypted else 1.73,
    }
    if encrypted:
        run["ops"] = {"bootstraps": 4321, "rotations": 98765, "multiplications": 123456}
    return run


def make_results(n_classes: int = 2, *, full: bool = True, binary_1d: bool = False) -> dict:
    """Synthetic results; ``full=False`` drops every optional field to exercise the "—" path."""
    rng = np.random.default_rng(n_classes)
    runs = {
        "plaintext": _synthetic_run(rng, n_classes, "Plaintext (exact softmax)", 2.5, 12),
        "mirror": _synthetic_run(rng, n_classes, "Plaintext mirror", 2.3, 12, binary_1d=binary_1d),
        "encrypted": _synthetic_run(
            rng, n_classes, "Encrypted (CKKS)", 2.2, 12, encrypted=True, binary_1d=binary_1d
        ),
    }
    res: dict = {"dataset": "breastmnist" if n_classes == 2 else "pathmnist5", "runs": runs}
    if not full:
        del runs["mirror"]["best_epoch"], runs["mirror"]["steps"], runs["mirror"]["history"]
        del runs["encrypted"]["ops"]
        return res
    res.update(
        {
            "n_classes": n_classes,
            "class_names": (
                ["malignant", "normal/benign"]
                if n_classes == 2
                else [f"tissue type {i}" for i in range(n_classes)]
            ),
            "backbone": {"name": "efficientnet_lite0", "feature_dim": 1280, "weights": "imagenet"},
            "command": "medblindtuner demo --dataset breastmnist",
            "ckks": {
                "ring_dim": 65536,
                "security": "HEStd_128_classic",
                "scaling_bits": 50,
                "depth": 24,
                "slots": 32768,
            },
            "sizes_bytes": {
                "public_bundle": 3 * 1024**3,
                "secret_key": 5 * 1024**2,
                "encrypted_dataset": 700 * 1024**2,
                "ciphertext": 8 * 1024**2,
            },
            "peak_rss_bytes": {"hospital": 2 * 1024**3, "cloud": 40 * 1024**3},
            "timings_s": {
                "features": 12.5,
                "keygen": 80.0,
                "encrypt": 30.0,
                "training": 5400.0,
                "total": 5600.0,
            },
        }
    )
    return res


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 1024, path
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 100 and height > 100


def _check_common(paths: dict[str, Path], out: Path) -> tuple[str, str]:
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0, p
        assert p.parent == out
    pngs = [p for p in paths.values() if p.suffix == ".png"]
    for p in pngs:
        _check_png(p)
    md = paths["markdown"].read_text(encoding="utf-8")
    html = paths["html"].read_text(encoding="utf-8")
    for p in pngs:
        assert f'<img src="{p.name}"' in html
        assert f"]({p.name})" in md
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "<style>" in html
    return md, html


@pytest.mark.parametrize("n_classes", [2, 5])
def test_full_report(tmp_path: Path, n_classes: int) -> None:
    res = make_results(n_classes)
    paths = build_report(res, tmp_path)
    expected = {
        "markdown",
        "html",
        "results_json",
        "loss_curves",
        "roc",
        "confusion_plaintext",
        "confusion_mirror",
        "confusion_encrypted",
    }
    assert expected <= set(paths)
    md, html = _check_common(paths, tmp_path)

    assert json.loads(paths["results_json"].read_text()) == json.loads(json.dumps(res))
    assert res["dataset"] in md and "efficientnet_lite0" in md.splitlines()[0]
    for run in res["runs"].values():
        row = next(line for line in md.splitlines() if line.startswith(f"| {run['label']} |"))
        assert f"{run['test']['acc']:.4f}" in row
        assert f"{run['test']['auc']:.4f}" in row
        assert f"| {run['epochs']} | {run['best_epoch']} |" in row
        assert f"| {run['steps']} |" in row
    enc_row = next(line for line in md.splitlines() if line.startswith("| Encrypted (CKKS) |"))
    assert "| 1 h 30 min | 4,321 |" in enc_row
    plain_row = next(line for line in md.splitlines() if line.startswith("| Plaintext (exact"))
    assert "| 1.73 s | — |" in plain_row  # no bootstraps for plaintext
    assert "3.00 GiB" in md and "5.00 MiB" in md and "700.00 MiB" in md and "40.00 GiB" in md
    assert "| ring_dim | 65,536 |" in md and "HEStd_128_classic" in md
    assert "medblindtuner demo --dataset breastmnist" in md
    assert "<table>" in html and "<br>" in html
    assert res["class_names"][-1] in md
    assert "efficientnet_lite0 (1,280-d features, weights imagenet)" in md


def test_missing_optional_fields(tmp_path: Path) -> None:
    # Also covers binary scores given as a flat list (score of class 1) instead of (n, 2).
    res = make_results(2, full=False, binary_1d=True)
    del res["runs"]["encrypted"]["test"]["y_pred"]  # derived from the scores instead
    paths = build_report(res, tmp_path)
    assert {"roc", "loss_curves", "confusion_mirror", "confusion_encrypted"} <= set(paths)
    md, html = _check_common(paths, tmp_path)
    mirror_row = next(line for line in md.splitlines() if line.startswith("| Plaintext mirror |"))
    # best epoch, bootstraps and steps are missing for the mirror run
    assert mirror_row.endswith("| 12 | — | 1.73 s | — | — |")
    assert "MedBlindTuner report — breastmnist · —" in md
    assert "**Backbone:** —\n" in md + "\n"
    assert "| Secret key (stays at the hospital) | — |" in md
    assert "Command: —" in md and "—" in html


def test_bare_minimum_does_not_crash(tmp_path: Path) -> None:
    paths = build_report({"runs": {"encrypted": {}}}, tmp_path)
    assert set(paths) == {"markdown", "html", "results_json"}
    md, _ = _check_common(paths, tmp_path)
    assert "| Encrypted (CKKS) | — | — | — | — | — | — | — | — | — |" in md


def test_combined_report(tmp_path: Path) -> None:
    r2, r5 = make_results(2), make_results(5)
    per_run = tmp_path / "runs" / "breastmnist"
    per_run.mkdir(parents=True)  # only the link target matters here
    r2["report_dir"] = str(per_run)
    r5["timings_s"].pop("total")
    paths = build_combined_report([r2, r5, make_results(2, full=False)], tmp_path / "all")
    md = paths["markdown"].read_text()
    html = paths["html"].read_text()
    assert "[breastmnist](../runs/breastmnist/report.md)" in md
    assert 'href="../runs/breastmnist/report.html"' in html
    row = next(line for line in md.splitlines() if line.startswith("| [breastmnist]"))
    p, e = r2["runs"]["plaintext"]["test"], r2["runs"]["encrypted"]["test"]
    assert f"{p['acc']:.4f} | {p['auc']:.4f} | {e['acc']:.4f} | {e['auc']:.4f}" in row
    assert f"{100 * (e['acc'] - p['acc']):+.2f}" in row
    assert "1 h 33 min" in row and "4,321" in row
    row5 = next(line for line in md.splitlines() if line.startswith("| pathmnist5"))
    assert "1 h 30 min" in row5  # falls back to the encrypted run's wall time
    bare = [line for line in md.splitlines() if line.startswith("| breastmnist | — |")]
    assert bare and bare[0].endswith("| — |")


def test_report_states_encrypted_minus_probe_and_published(tmp_path: Path) -> None:
    runs = {"encrypted": {"test": {"acc": 0.84, "auc": 0.90}},
            "probe": {"test": {"acc": 0.8397, "auc": 0.9037}},
            "published": {"label": "MedMNIST v2 ResNet-18 (28), published",
                          "test": {"acc": 0.863, "auc": 0.901}}}
    md = build_report({"dataset": "breastmnist", "runs": runs}, tmp_path)["markdown"].read_text()
    assert "Encrypted minus the tuned probe" in md
    published = next(line for line in md.splitlines()
                     if line.startswith("Encrypted minus the published MedMNIST v2"))
    assert "ACC −2.30 points" in published or "ACC -2.30 points" in published, published
    assert "AUC −0.10 points" in published or "AUC -0.10 points" in published, published
