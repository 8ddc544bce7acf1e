"""`medblindtuner features` CLI smoke tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from typer.testing import CliRunner

from medblindtuner.cli.features_cmd import app as features_app
from medblindtuner.features import FeatureSet

runner = CliRunner()


def _app() -> typer.Typer:
    """A multi-command app like main.py's once all roles have registered their commands (with
    its error handling: a user-actionable error is one `error:` line, exit 2)."""
    from medblindtuner.cli.main import _Commands

    app = typer.Typer(add_completion=False, cls=_Commands)

    @app.callback()
    def _root() -> None:
        """Test root."""

    app.add_typer(features_app)
    return app


def _toy_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = np.array([[0], [1]], dtype=np.uint8)
    p = tmp_path / "toymnist.npz"
    np.savez(p, **arrays)
    return p


def test_features_help() -> None:
    result = runner.invoke(_app(), ["features", "--help"])
    assert result.exit_code == 0, result.output
    for opt in ("--dataset", "--data-dir", "--image-folder", "--backbone", "--weights",
                "--batch-size", "--cache-dir", "--out", "--json"):
        assert opt in result.output


def test_main_app_help() -> None:
    from medblindtuner.cli.main import app

    assert runner.invoke(app, ["--help"]).exit_code == 0
    demo = runner.invoke(app, ["demo", "--help"], terminal_width=200)
    assert demo.exit_code == 0 and "--weights" in demo.output and "onnx:PATH" in demo.output


def test_train_encrypted_offers_a_ray_cluster() -> None:
    from medblindtuner.cli.main import app

    result = runner.invoke(app, ["train-encrypted", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--ray-address" in result.output


def test_cli_starts_without_torch_or_sklearn() -> None:
    """`medblindtuner --help` must not pay for torch/scikit-learn imports (6 s -> 0.8 s)."""
    import subprocess
    import sys

    code = ("import sys, medblindtuner.cli.main; "
            "print(sorted(m for m in ('torch', 'sklearn', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_features_tiny_run_with_json(tmp_path: Path) -> None:
    npz, out, js = _toy_npz(tmp_path), tmp_path / "f.npz", tmp_path / "s.json"
    args = ["features", "--dataset", str(npz), "--backbone", "deit_tiny", "--weights", "random",
            "--batch-size", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
            "--json", str(js), "--no-progress"]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads(js.read_text())
    assert summary["dataset"] == "toymnist"
    assert summary["splits"] == {"train": 2, "val": 2, "test": 2}
    assert summary["feature_dim"] == 192
    assert summary["backbone"]["pretrained"] is False
    assert "RANDOM" in summary["backbone"]["weights_source"]
    assert summary["images_per_s"] > 0 and summary["extraction_seconds"] > 0
    fs = FeatureSet.load(out)
    assert fs.splits["train"][0].shape == (2, 192) and fs.backbone.name == "deit_tiny"

    again = runner.invoke(_app(), args)
    assert again.exit_code == 0 and json.loads(js.read_text())["from_cache"] is True


def test_features_bad_dataset_exits_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((1, 28, 28), np.uint8))
    result = runner.invoke(_app(), ["features", "--dataset", str(bad), "--no-cache"])
    assert result.exit_code == 2
    assert "missing key" in result.output


def test_features_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (20, 20), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    js = tmp_path / "s.json"
    result = runner.invoke(_app(), [
        "features", "--image-folder", str(tmp_path / "imgs"), "--val-fraction", "0.3",
        "--test-fraction", "0.3", "--backbone", "deit_tiny", "--weights", "random",
        "--no-cache", "--json", str(js), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert json.loads(js.read_text())["splits"] == {"train": 2, "val": 2, "test": 2}


def _cnn_onnx(path: Path, metadata: dict[str, str]) -> Path:
    """A tiny CNN encoder of the hospital's own, exported to ONNX: (B,3,32,32) -> (B,8)."""
    import warnings

    import onnx
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), path, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    proto = onnx.load(path)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
    return path


def test_features_onnx_encoder_file(tmp_path: Path) -> None:
    npz, out, js = _toy_npz(tmp_path), tmp_path / "f.npz", tmp_path / "s.json"
    encoder = _cnn_onnx(tmp_path / "mine.onnx", {"mean": "0.5", "std": "0.5"})
    args = ["features", "--dataset", str(npz), "--backbone", f"onnx:{encoder}",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json", str(js),
            "--no-progress"]
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads(js.read_text())
    assert summary["feature_dim"] == 8 and summary["runtime"].startswith("onnxruntime")
    assert summary["backbone"]["input_size"] == 32 and summary["backbone"]["mean"] == [0.5] * 3
    assert FeatureSet.load(out).backbone.name == "onnx:mine.onnx"
    assert runner.invoke(_app(), args).exit_code == 0
    assert json.loads(js.read_text())["from_cache"] is True
    result = runner.invoke(_app(), [*args[:5], "--mean", "0.4,x"])
    assert result.exit_code == 2 and "--mean" in result.output  # a usage error


def test_features_wrong_encoder_file_is_one_error_line(tmp_path: Path) -> None:
    npz = _toy_npz(tmp_path)
    corrupt = tmp_path / "enc.onnx"
    corrupt.write_bytes(b"\x08\x07not a model")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    cases = [
        (["--backbone", f"onnx:{tmp_path / 'missing.onnx'}"], "ONNX encoder file not found"),
        (["--backbone", f"onnx:{corrupt}"], "not a readable ONNX model"),
        (["--backbone", "timm:test_vit", "--weights", str(junk)],
         "not a checkpoint of timm architecture test_vit"),
        (["--backbone", "efficientnet_lite0", "--input-size", "32"], "apply to onnx:PATH"),
    ]
    for extra, message in cases:
        result = runner.invoke(_app(), ["features", "--dataset", str(npz), "--no-cache",
                                        "--no-progress", *extra], terminal_width=80)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], result.output
        assert "Traceback" not in result.output
