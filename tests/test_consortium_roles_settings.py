"""The whole consortium through the CLI roles and the service's worker (insecure test ring):
`create`; each hospital's `settings` (its own feature file; secure aggregation over the
service), `keys` and `train`, every input from its state folder; hospital 0's `start`. The
service's supervised worker trains the union with the agreed, preconditioned plan (hospital 0
sends the decay vector with its rows), and every hospital's model equals the plaintext mirror
on the union of the hospitals' scaled rows (tests/test_consortium.py tolerance).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from helpers_consortium_cli import consortium_cli
from helpers_consortium_cli import finished as finished_processes
from helpers_service import ServiceProcess
from test_consortium import WEIGHT_TOL, skewed_shards
from typer.testing import CliRunner

from medblindtuner.cli.main import app
from medblindtuner.features.extract import FeatureSet
from medblindtuner.training.plan import TrainingPlan

N, TIMEOUT = 3, "300"


def cli(*args: str) -> subprocess.Popen:
    return consortium_cli(*args, timeout=TIMEOUT)


def finished(processes: list[subprocess.Popen]) -> list[str]:
    return finished_processes(processes, TIMEOUT)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles-settings")
    for i, shard in enumerate(skewed_shards()):
        FeatureSet.from_arrays({"train": (shard.x_train, shard.y_train),
                                "val": (shard.x_val, shard.y_val)}, 2,
                               name=f"hospital-{i}").save(root / f"features-{i}.npz")
    with ServiceProcess(root / "cloud") as server:
        made = CliRunner().invoke(app, ["consortium", "create", "--service", server.url,
                                        "--hospitals", str(N), "--out", str(root / "members")])
        assert made.exit_code == 0, made.output

        def role(i: int, name: str, *extra: str) -> subprocess.Popen:
            return cli(name, "--member", str(root / "members" / f"hospital-{i}.json"),
                       "--state", str(root / f"state-{i}"), *extra)

        settled = finished([role(i, "settings", "--features", str(root / f"features-{i}.npz"),
                                 "--epochs", "3")
                            for i in range(N)])
        finished([role(i, "keys") for i in range(N)])
        trainers = [role(i, "train", "--out", str(root / f"model-{i}.npy")) for i in range(N)]
        started = finished([role(0, "start")])
        outputs = finished(trainers)
    return root, settled, started, outputs


def test_settings_keys_train_and_start_from_the_state_folders(consortium):
    root, settled, started, outputs = consortium
    plans = [(root / f"state-{i}" / "plan.json").read_text() for i in range(N)]
    assert len(set(plans)) == 1 and all("agreed" in out for out in settled)
    plan = TrainingPlan.from_dict(json.loads(plans[0]))
    assert plan.config.preconditioned
    rows = [np.load(root / f"state-{i}" / "rows.npz") for i in range(N)]
    union = [np.concatenate([r[k] for r in rows]) for k in ("x_train", "y_train", "x_val",
                                                            "y_val")]
    mirror = plan.check_ranges(*union)
    for i in range(N):
        assert f"best epoch {mirror.best_epoch}" in outputs[i], outputs[i][-2000:]
        weights = np.load(root / f"model-{i}.npy")
        assert np.max(np.abs(weights - mirror.weights)) < WEIGHT_TOL
    assert "training" in started[0] or "queued" in started[0] or "done" in started[0]
