"""A hospital killed midway resumes (`medblindtuner consortium keys | train`, a real service,
insecure test ring): each hospital process is armed with a failpoint that SIGKILLs it right
after it kept a message and before it posted it; started again with the same command, it
posts the kept bytes (no 409: the service takes the same bytes again, other bytes would be
refused) and goes on from its saved share, ledger and judge. Killed:

    keys    hospital 1 at its public-key message, hospital 2 at its relin-1 share (mid-ceremony)
    train   hospital 0 while it sends its rows; hospital 1 after it answered refresh 0, at
            refresh 1's share (recorded in its ledger, not posted); hospital 2 at its judge's
            decision of epoch 1 (decrypted and recorded, not posted: answered again from its
            saved judge, not decrypted again)

The job completes and every hospital's model equals the plaintext mirror's (the tolerance of
tests/test_consortium_roles_training.py).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_consortium_training import N, shard_of, train_plan, union
from helpers_service import ServiceProcess
from typer.testing import CliRunner

from medblindtuner.cli.main import app
from medblindtuner.failpoints import FAILPOINT_ENV, MARKER_ENV

HERE = Path(__file__).resolve().parent
TIMEOUT = 300
WEIGHT_TOL = 3e-3
KEY_KILLS = {1: "hospital.key_round_saved@2", 2: "hospital.key_round_saved@3"}
TRAIN_KILLS = {0: "hospital.rows_saved@2", 1: "hospital.refresh_saved@6",
               2: "hospital.decision_saved@1"}


class Role:
    """One role's command, run (and, killed by its failpoint, run again) with its output in
    a file."""

    def __init__(self, root: Path, name: str, args: list[str], failpoint: str | None = None):
        self.root, self.name, self.args = root, name, args
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
        self.marker = root / f"{name}.fired"
        if failpoint:
            self.env.update({FAILPOINT_ENV: failpoint, MARKER_ENV: str(self.marker)})
        self.runs = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        self.runs += 1
        log = open(self.root / f"{self.name}-{self.runs}.log", "w")  # noqa: SIM115 - the child's
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "medblindtuner.cli.main", "consortium", *self.args,
                 "--insecure-test-params", "--timeout", str(TIMEOUT)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def output(self, run: int | None = None) -> str:
        return (self.root / f"{self.name}-{run or self.runs}.log").read_text()

    def step(self) -> bool:
        """True once it finished well; killed by its failpoint: started again (once)."""
        code = self.process.poll()
        if code is None:
            return False
        if code == -9 and self.marker.exists() and self.runs == 1:
            self.process = self._start()  # the same command, the same environment
            return False
        assert code == 0, f"{self.name} (run {self.runs}): {self.output()[-3000:]}"
        return True


def supervised(roles: list[Role]) -> list[Role]:
    deadline = time.monotonic() + 2 * TIMEOUT
    try:
        while not all([role.step() for role in roles]):
            assert time.monotonic() < deadline, "the roles did not finish"
            time.sleep(0.2)
    finally:
        for role in roles:
            if role.process.poll() is None:
                role.process.kill()
    return roles


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    plan = train_plan()
    (root / "plan.json").write_text(json.dumps(plan.to_dict()))
    x_train, _, x_val, _ = union()
    counts = ["--n-train", str(len(x_train)), "--n-val", str(len(x_val))]
    with ServiceProcess(root / "cloud") as server:
        made = CliRunner().invoke(app, ["consortium", "create", "--service", server.url,
                                        "--hospitals", str(N), "--out", str(root / "members")])
        assert made.exit_code == 0, made.output
        cid = json.loads((root / "members" / "hospital-0.json").read_text())["consortium_id"]

        def hospital(i: int, role: str, kills: dict[int, str], *extra: str) -> Role:
            return Role(root, f"{role}-{i}", [
                role, "--member", str(root / "members" / f"hospital-{i}.json"), "--state",
                str(root / f"state-{i}"), "--plan", str(root / "plan.json"), *extra],
                kills.get(i))

        keys = supervised([hospital(i, "keys", KEY_KILLS) for i in range(N)])
        for i in range(N):
            owned, (xt, yt, xv, yv) = shard_of(i)
            np.savez(root / f"rows-{i}.npz", x_train=xt, y_train=yt, x_val=xv, y_val=yv)
        trainers = [hospital(i, "train", TRAIN_KILLS, "--rows", str(root / f"rows-{i}.npz"),
                             "--train-offset", str(shard_of(i)[0].train_offset),
                             "--val-offset", str(shard_of(i)[0].val_offset), *counts,
                             "--out", str(root / f"model-{i}.npy"))
                    for i in range(N)]
        operator = Role(root, "cloud-train", [
            "cloud-train", "--data-dir", str(server.data_dir), "--consortium", cid, "--plan",
            str(root / "plan.json"), *counts, "--workdir", str(root / "work")])
        supervised([*trainers, operator])
    return plan, root, keys, trainers, operator


def test_hospitals_killed_mid_ceremony_resume_the_same_joint_key(resumed):
    _plan, root, keys, _trainers, _operator = resumed
    assert [role.runs for role in keys] == [1, 2, 2]
    tags = {line.split()[-1] for role in keys for line in role.output().splitlines()
            if "joint key" in line}
    assert len(tags) == 1  # one joint key, its shares drawn once (the resumed share kept)
    for i in range(N):
        state = root / f"state-{i}"
        assert not (state / "ceremony").exists() and not (state / "posted" / "keys").exists()
        assert stat.S_IMODE((state / "sealing_key.bin").stat().st_mode) == 0o600
        assert stat.S_IMODE((state / "party" / "secret_share.bin").stat().st_mode) == 0o600


def test_hospitals_killed_mid_training_resume_and_get_the_mirrors_model(resumed):
    plan, root, _keys, trainers, operator = resumed
    assert [role.runs for role in trainers] == [2, 2, 2]
    mirror = plan.check_ranges(*union())
    assert f"best epoch {mirror.best_epoch}" in operator.output()
    for i, role in enumerate(trainers):
        assert f"best epoch {mirror.best_epoch}" in role.output()
        assert "409" not in role.output(1) + role.output()
        weights = np.load(root / f"model-{i}.npy")
        assert np.max(np.abs(weights - mirror.weights)) < WEIGHT_TOL


def test_what_a_hospital_keeps_is_its_own(resumed):
    plan, root, _keys, _trainers, _operator = resumed
    for i in range(N):
        training = next((root / f"state-{i}" / "training").iterdir())
        assert stat.S_IMODE(training.stat().st_mode) == 0o700
        kept = list((training / "posted").iterdir())
        assert any(p.name.startswith(f"round-rows-{i}-") for p in kept)
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in kept)
        judge = json.loads((training / "judge.json").read_text())
        assert len(judge["decrypted"]) == len(judge["answers"]) <= plan.config.epochs
        shared = json.loads((training / "shared.json").read_text())
        assert sorted(shared["losses"]) == sorted(judge["answers"]) and shared["model"]
