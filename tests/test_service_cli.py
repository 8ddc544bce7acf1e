"""`medblindtuner hospital ...` against a real service: keygen -> evaluate, insecure params."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_service import ServiceProcess
from typer.testing import CliRunner

from medblindtuner.cli.main import app
from medblindtuner.features.backbones import BackboneInfo
from medblindtuner.features.extract import FeatureSet
from medblindtuner.he.keys import looks_like_secret_key
from medblindtuner.hospital.hospital import Hospital


def toy_features(path) -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(2, 10)) * 2.0

    def split(n: int):
        y = rng.integers(0, 2, n)
        return (centers[y] + rng.normal(size=(n, 10))).astype(np.float32), y.astype(np.int64)

    backbone = BackboneInfo(name="toy", arch="none", feature_dim=10, weights_source="none",
                            weights_sha256="", pretrained=False, input_size=1,
                            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    FeatureSet("toy", "0" * 32, 2, {"train": split(120), "val": split(40), "test": split(60)},
               backbone).save(path)


@pytest.mark.parametrize("refresh", ["hospital", "bootstrap"])
def test_hospital_cli_round_trip(tmp_path, refresh):
    """Both refresh modes: "hospital" (the default) has `fetch` answer the relayed refresh
    requests beside the decisions; "bootstrap" keeps the cloud bootstrapping alone."""
    toy_features(tmp_path / "features.npz")
    work = tmp_path / "hospital"
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["hospital", *args, "--workdir", str(work)])
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.stdout

    run("keygen", "--features", str(tmp_path / "features.npz"), "--pca", "6",
        "--epochs", "2", "--batch-size", "128", "--patience", "5", "--lr", "1.0",
        "--insecure-test-params", *(["--refresh", refresh] if refresh == "bootstrap" else []))
    assert (work / "public_bundle" / "manifest.json").exists()
    assert looks_like_secret_key(work / "local" / "secret_key.bin")
    run("encrypt")
    server = ServiceProcess(tmp_path / "cloud").start()
    try:
        run("submit", "--url", server.url)
        job = json.loads((work / "job.json").read_text())
        assert (work / "job.json").stat().st_mode & 0o077 == 0
        status = json.loads(run("status", "--json"))
        assert status["job_id"] == job["job_id"]
        run("fetch", "--poll", "0.3")
        report = json.loads(run("evaluate", "--json"))
    finally:
        server.stop()
        server.kill_workers()
    assert status["params"]["name"].endswith("refresh") == (refresh == "hospital")
    refreshes = json.loads((work / "local" / "refreshes" / "ledger.json").read_text())[
        "digests"] if refresh == "hospital" else {}
    plan = Hospital.open(work).plan
    steps = plan.config.epochs * len(plan.train_batch_sizes) * plan.refreshes_per_step
    assert len(refreshes) == (steps if refresh == "hospital" else 0)  # one per step, binary
    assert report["split"] == "test"
    assert report["max_abs_weight_diff_vs_mirror"] < 1e-3
    assert abs(report["encrypted"]["acc"] - report["mirror"]["acc"]) < 1e-9
    # Nothing secret or plaintext reached the cloud's data dir.
    cloud = [p for p in (tmp_path / "cloud").rglob("*.bin") if p.is_file()]
    assert cloud and not [p for p in cloud if looks_like_secret_key(p)]
