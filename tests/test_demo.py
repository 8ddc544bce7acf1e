"""The main job end to end on insecure test parameters (real BreastMNIST subset)."""

from __future__ import annotations

import json

from conftest import SHARED_DATA, SMALL_SUBSET

from medblindtuner.demo import DemoOptions, run_demo
from medblindtuner.hospital.recipe import Overrides
from medblindtuner.training.plan import TrainingPlan


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
    # the default refresh mode over the service: the hospital answers the relayed refreshes,
    # the model's and, with several chunks a step, their gathered logits' (one sigmoid a step)
    assert results["ckks"]["refresh"] == "hospital"
    plan = TrainingPlan.from_dict(json.loads(
        next((tmp_path / "demo").rglob("plan.json")).read_text())["plan"])
    assert plan.compact_sigmoid == (plan.chunks_per_step > 1)
    per_step = runs["encrypted"]["ops"]["per_step"]
    assert per_step["bootstraps"] == per_step["refreshes"] == (2.0 if plan.compact_sigmoid
                                                                else 1.0)
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
