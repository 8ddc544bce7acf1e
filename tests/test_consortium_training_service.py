"""A consortium trains over a real service (insecure test ring): three hospital processes,
each with only its own rows and secret share, make the joint key, send their rows under it,
and answer every joint refresh and epoch; the cloud (this process, on the service's store)
trains the union with the unchanged trainer; every hospital's decrypted model equals the
plaintext mirror's within the consortium tolerances (tests/test_consortium.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_consortium import plaintext_in
from helpers_consortium_training import TIMEOUT_S, N, train_plan, union
from helpers_service import ServiceProcess

from medblindtuner.consortium.ceremony import key_schedule
from medblindtuner.consortium.client import ConsortiumClient
from medblindtuner.consortium.relayed_training import train_over_relay
from medblindtuner.consortium.remote import assemble_joint_keys
from medblindtuner.consortium.roles import consortium_params, store_reader
from medblindtuner.he.threshold import joint_context
from medblindtuner.service.consortia import ConsortiumRelay
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.store import Store

HERE = Path(__file__).resolve().parent
WEIGHT_TOL, LOSS_TOL = 3e-3, 1e-3  # as tests/test_consortium.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("relayed-training")
    with ServiceProcess(root / "cloud") as server:
        created = ConsortiumClient.create(server.url, N)
        cid = created["consortium_id"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
        hospitals = [subprocess.Popen(
            [sys.executable, str(HERE / "helpers_consortium_training.py"), server.url, cid,
             token, str(root / f"hospital-{i}.json")], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for i, token in enumerate(created["tokens"])]
        try:
            plan = train_plan()
            params = consortium_params(plan, insecure=True)
            config = ServiceConfig(server.data_dir)
            relay = ConsortiumRelay(config, Store(config.resolved_db_url))
            context = joint_context(params)
            schedule = key_schedule(context, params, plan.rotation_indices,
                                    plan.kernel_rotation_indices)
            keys = assemble_joint_keys(context, params, cid, N,
                                       store_reader(relay, cid, N, TIMEOUT_S), schedule)
            x_train, _, x_val, _ = union()
            state = train_over_relay(relay, cid, keys, plan, len(x_train), len(x_val),
                                     root / "work", timeout_s=TIMEOUT_S)
            outputs = [h.communicate(timeout=TIMEOUT_S)[0] for h in hospitals]
            for hospital, out in zip(hospitals, outputs, strict=True):
                assert hospital.returncode == 0, out[-3000:]
        finally:
            for hospital in hospitals:
                if hospital.poll() is None:
                    hospital.kill()
                    hospital.wait()
        learnt = [json.loads((root / f"hospital-{i}.json").read_text()) for i in range(N)]
        yield plan, state, learnt, server.data_dir


def test_every_hospital_decrypts_the_mirrors_model(trained):
    plan, state, learnt, _data_dir = trained
    mirror = plan.check_ranges(*union())
    assert state.best_epoch == mirror.best_epoch
    for hospital in learnt:
        assert np.max(np.abs(np.asarray(hospital["weights"]) - mirror.weights)) < WEIGHT_TOL
        for record in mirror.history:
            assert abs(hospital["losses"][str(record["epoch"])] - record["val_loss"]) < LOSS_TOL
        assert hospital["refreshes"] == state.steps * plan.refreshes_per_step > 0


def test_the_service_saw_ciphertexts_and_sealed_shares_only(trained):
    _plan, _state, _learnt, data_dir = trained
    x_train = union()[0]
    needles = [f"{v:.6f}" for v in x_train[:4, :-1].ravel() if abs(v) > 1e-3][:12]
    for path in data_dir.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".sqlite3", ".sqlite3-wal"):
            assert not plaintext_in(path.read_bytes(), needles), f"a plaintext feature in {path}"
