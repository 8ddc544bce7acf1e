"""`medblindtuner consortium run` and `medblindtuner demo --hospitals N` (insecure test ring).

The report names every hospital that took part, says no single party could decrypt, and
each hospital's own key share alone does not decode the model; bad input is one `error:`
line (or a usage error), exit code 2, no traceback.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medblindtuner.cli import consortium_cmd
from medblindtuner.cli.main import app
from medblindtuner.consortium.job import synthetic_features


def _check_report(report: dict, n: int) -> None:
    assert [p["hospital"] for p in report["parties"]] == list(range(n))
    assert report["refresh"] == "hospital" and report["joint_refreshes"] > 0
    assert len(report["refresh_round_trip_s_per_member"]) == n
    for party in report["parties"]:
        assert party["model_shared"] and party["validation_losses_shared"] >= 1
        assert party["refresh_shares"] == report["joint_refreshes"]
        alone = party["own_share_alone_on_the_model"]
        assert "garbage" in alone or "cannot be decoded" in alone, alone
    assert len(report["hospitals"]) == n
    mirror = report["mirror"]  # the test module's tolerances (tests/test_consortium.py)
    assert mirror["max_abs_weight_diff"] < 2e-3 and mirror["max_abs_val_loss_diff"] < 1e-3
    assert mirror["best_epoch_equal"]


def test_consortium_run_on_synthetic_features(tmp_path):
    features = tmp_path / "blobs.npz"
    synthetic_features().save(features)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, [
        "consortium", "run", "--features", str(features), "--hospitals", "3", "--epochs", "2",
        "--insecure-test-params", "--workdir", str(tmp_path / "job"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no single party could decrypt" in result.output
    assert "INSECURE" in result.output
    report = json.loads(out.read_text())
    _check_report(report, 3)
    assert report["consortium_encrypted"]["acc"] > 0.8
    # the members' ledgers are on disk, one per hospital
    assert all((tmp_path / "job" / f"member-{i}" / "refreshes" / "ledger.json").exists()
               for i in range(3))


@pytest.mark.parametrize("args", [
    ["consortium", "run", "--synthetic", "--hospitals", "1", "--insecure-test-params"],
    ["consortium", "run", "--synthetic", "--features", "x.npz", "--insecure-test-params"],
    ["consortium", "run", "--synthetic", "--refresh", "sometimes", "--insecure-test-params"],
])
def test_consortium_run_refuses_bad_options(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_consortium_run_missing_features_is_one_error_line(tmp_path):
    result = CliRunner().invoke(app, ["consortium", "run", "--features",
                                      str(tmp_path / "missing.npz"), "--insecure-test-params"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_demo_with_three_hospitals_reports_the_parties(breast_features_small, tmp_path,
                                                       monkeypatch):
    """`demo --hospitals 3` on real BreastMNIST features (the session's small subset; the
    extraction itself is the features command's, tested there)."""
    asked = {}

    def features(*args, **kwargs):
        asked["args"] = args
        return breast_features_small

    monkeypatch.setattr(consortium_cmd, "load_features", features)
    result = CliRunner().invoke(app, [
        "demo", "--hospitals", "3", "--epochs", "2", "--insecure-test-params",
        "--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert asked["args"][1] == "breastmnist"
    assert "consortium of 3 hospitals" in result.output
    assert "no single party could decrypt" in result.output
    report = json.loads((tmp_path / "demo" / "report" / "consortium.json").read_text())
    _check_report(report, 3)
