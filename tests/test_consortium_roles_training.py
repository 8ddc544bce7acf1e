"""`medblindtuner consortium create | keys | train | cloud-train` against a real service
(insecure test ring): three hospital processes make the joint key and save their state, then
three `train` processes restore it, send their rows and answer the cloud's refreshes and
epochs while the operator's `cloud-train` trains from the store; every hospital's saved model
equals the plaintext mirror's (tests/test_consortium.py tolerance).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from helpers_consortium_cli import consortium_cli
from helpers_consortium_cli import finished as finished_processes
from helpers_consortium_training import N, shard_of, train_plan, union
from helpers_service import ServiceProcess
from typer.testing import CliRunner

from medblindtuner.cli.main import app

TIMEOUT = "300"
WEIGHT_TOL = 3e-3


def cli(*args: str) -> subprocess.Popen:
    return consortium_cli(*args, timeout=TIMEOUT)


def finished(processes: list[subprocess.Popen]) -> list[str]:
    return finished_processes(processes, TIMEOUT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles-training")
    plan = train_plan()
    (root / "plan.json").write_text(json.dumps(plan.to_dict()))
    x_train, _, x_val, _ = union()
    counts = ["--n-train", str(len(x_train)), "--n-val", str(len(x_val))]
    with ServiceProcess(root / "cloud") as server:
        made = CliRunner().invoke(app, ["consortium", "create", "--service", server.url,
                                        "--hospitals", str(N), "--out", str(root / "members")])
        assert made.exit_code == 0, made.output
        cid = json.loads((root / "members" / "hospital-0.json").read_text())["consortium_id"]

        def hospital(i: int, role: str, *extra: str) -> subprocess.Popen:
            return cli(role, "--member", str(root / "members" / f"hospital-{i}.json"),
                       "--state", str(root / f"state-{i}"), "--plan", str(root / "plan.json"),
                       *extra)

        finished([hospital(i, "keys") for i in range(N)])
        trainers = []
        for i in range(N):
            owned, (xt, yt, xv, yv) = shard_of(i)
            np.savez(root / f"rows-{i}.npz", x_train=xt, y_train=yt, x_val=xv, y_val=yv)
            trainers.append(hospital(i, "train", "--rows", str(root / f"rows-{i}.npz"),
                                     "--train-offset", str(owned.train_offset),
                                     "--val-offset", str(owned.val_offset), *counts,
                                     "--out", str(root / f"model-{i}.npy")))
        operator = cli("cloud-train", "--data-dir", str(server.data_dir), "--consortium", cid,
                       "--plan", str(root / "plan.json"), *counts, "--workdir",
                       str(root / "work"))
        outputs = finished([*trainers, operator])
    return plan, root, outputs


def test_train_roles_give_every_hospital_the_mirrors_model(trained):
    plan, root, outputs = trained
    mirror = plan.check_ranges(*union())
    assert f"trained {len(mirror.history)} epochs" in outputs[-1]
    assert f"best epoch {mirror.best_epoch}" in outputs[-1]
    for i in range(N):
        assert f"best epoch {mirror.best_epoch}" in outputs[i]
        assert " 0 joint refreshes" not in outputs[i]  # every refresh went through all three
        weights = np.load(root / f"model-{i}.npy")
        assert np.max(np.abs(weights - mirror.weights)) < WEIGHT_TOL
