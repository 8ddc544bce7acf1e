"""The main job end to end on insecure test parameters (real BreastMNIST subset)."""

from __future__ import annotations

import json

from conftest import SHARED_DATA, SMALL_SUBSET

from medblindtuner.demo import DemoOptions, run_demo
from medblindtuner.hospital.recipe import Overrides


def test_demo_pipeline_writes_report_and_matches_plaintext(
    breast_features_small, feature_cache_dir, tmp_path
):
    options = DemoOptions(
        dataset="breastmnist", data_dir=SHARED_DATA, backbone="efficientnet_lite0",
        given=Overrides(pca_dims=15, epochs=2, patience=2),  # the rest derived, as by default
        workdir=tmp_path / "demo", limit=SMALL_SUBSET, insecure_test_params=True,
        feature_cache=feature_cache_dir,
    )
    results = run_demo(options)
    report = tmp_path / "demo" / "report"
    for name in ("report.md", "report.html", "loss_curves.png", "roc.png", "results.json",
                 "confusion_encrypted.png"):
        assert (report / name).stat().st_size > 500, name
    runs = results["runs"]
    assert {"probe", "published", "plaintext", "mirror", "encrypted"} <= set(runs)
    assert runs["published"]["test"] == {"acc": 0.863, "auc": 0.901}
    assert results["recipe"]["config"]["learning_rate"] > 0
    assert "Probe" in (report / "report.md").read_text()
    assert runs["encrypted"]["max_abs_weight_diff_vs_mirror"] < 2e-3
    assert abs(runs["encrypted"]["test"]["acc"] - runs["mirror"]["test"]["acc"]) <= 1 / 160
    assert runs["encrypted"]["ops"]["per_step"]["bootstraps"] == 1.0
    # the default refresh mode over the service: the hospital answers the relayed refreshes
    assert results["ckks"]["refresh"] == "hospital"
    assert runs["encrypted"]["ops"]["per_step"]["refreshes"] == 1.0
    assert json.loads((report / "results.json").read_text())["dataset"] == "breastmnist"
    inference = runs["encrypted"].get("inference")
    if inference is not None:  # encrypted scoring by the cloud
        assert inference["agreement"] == 1.0 and inference["max_abs_prob_diff"] < 1e-3


def test_demo_cli_reports_bad_input_without_traceback(tmp_path):
    """A missing dataset is the user's mistake: one `error:` line and exit code 2."""
    from typer.testing import CliRunner

    from medblindtuner.cli.main import app

    result = CliRunner().invoke(app, ["demo", "--dataset", str(tmp_path / "missing.npz"),
                                      "--insecure-test-params", "--workdir",
                                      str(tmp_path / "demo")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
