"""The cloud's object (`cloud.Cloud`): the one place that builds the evaluator and the trainer,
used by the single-process experiment too, whose result then passes the hospital's checks."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOUD_OBJECT = ROOT / "src" / "medblindtuner" / "cloud" / "cloud.py"


def _calls(path: Path, name: str) -> int:
    return sum(1 for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Call)
               and getattr(node.func, "id", getattr(node.func, "attr", None)) == name)


def test_trainer_and_evaluator_built_only_by_the_cloud_object():
    """Outside `Cloud` (and the tests), nothing in src or benchmarks builds the trainer, and
    only the HE layer's own code and benchmarks build an evaluator."""
    sources = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    trainers = [p for p in sources if _calls(p, "EncryptedTrainer") and p != CLOUD_OBJECT]
    assert not trainers, trainers
    assert _calls(CLOUD_OBJECT, "EncryptedTrainer") == 1
    assert _calls(CLOUD_OBJECT, "Evaluator") == 1
    allowed = {CLOUD_OBJECT, ROOT / "src/medblindtuner/cloud/cluster.py",  # a shard's kernel
               ROOT / "benchmarks/he_ops.py", ROOT / "benchmarks/probe_bootstrap.py"}
    evaluators = [p for p in sources if _calls(p, "Evaluator") and p not in allowed
                  and "medblindtuner/he/" not in p.as_posix()]
    assert not evaluators, evaluators


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """`run_encrypted` on a small binary problem (insecure test ring)."""
    from medblindtuner.experiment import run_encrypted
    from medblindtuner.features.extract import FeatureSet
    from medblindtuner.hospital.hospital import Hospital
    from medblindtuner.hospital.recipe import Overrides

    rng = np.random.default_rng(1)

    def blobs(n):
        y = rng.integers(0, 2, n)
        return rng.normal(size=(n, 8)) + 1.5 * y[:, None], y

    features = FeatureSet.from_arrays(
        {"train": blobs(120), "val": blobs(60), "test": blobs(60)}, n_classes=2)
    hospital = Hospital(tmp_path_factory.mktemp("experiment"), insecure_test_params=True)
    hospital.prepare(features, Overrides(epochs=2))
    return hospital, run_encrypted(hospital, log=lambda line: None)


def test_experiment_trains_through_the_cloud_and_decrypts_through_the_hospital(experiment):
    hospital, results = experiment
    encrypted = results["runs"]["encrypted"]
    assert encrypted["max_abs_weight_diff_vs_mirror"] < 5e-3
    assert encrypted["epochs"] >= 1 and encrypted["ops"]["bootstraps"] > 0
    # the result is the artifact a service would return: the hospital reopens and decrypts it
    assert (hospital.folder.result / "manifest.json").is_file()
    weights = np.asarray(encrypted["weights"])
    assert np.allclose(hospital.decrypt_result(), weights, atol=1e-3)


def test_experiment_result_is_refused_for_another_epoch(experiment, tmp_path):
    from medblindtuner.hospital.crypto import JudgeRefusal

    hospital, _ = experiment
    forged = tmp_path / "result"
    shutil.copytree(hospital.folder.result, forged)
    manifest = forged / "manifest.json"
    manifest.write_text(manifest.read_text().replace(
        f'"best_epoch": {hospital.judge().best_epoch}', '"best_epoch": 99'))
    with pytest.raises(JudgeRefusal, match="epoch 99"):
        hospital.decrypt_result(forged)
