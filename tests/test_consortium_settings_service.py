"""The settings rounds over a real service (issue #23): three hospitals, each with only its
own rows and its own client, agree on the same plan, scaler and preconditioner as the same
rounds in one process; a hospital killed mid-round resumes with the same state folder (its
kept envelopes posted again: no 409), and the service's files hold no hospital's statistics
in the clear."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers_service import ServiceProcess
from test_consortium import skewed_shards

from medblindtuner.consortium import roles
from medblindtuner.consortium.agreement import agree_settings
from medblindtuner.consortium.journal import JournaledClient
from medblindtuner.consortium.relayed_settings import OWNERSHIP, PLAN, ROWS
from medblindtuner.consortium.sealing import Roster, SealedMailbox, new_sealing_key
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.training.plan import TrainingPlan

N, TIMEOUT_S = 3, 60.0


class Crash(RuntimeError):
    """The simulated death of a hospital process."""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server = ServiceProcess(tmp_path_factory.mktemp("settings-service")).start()
    yield server
    server.stop()


def run_hospitals(url: str, root: Path, crash_after_posts: int | None = None) -> list:
    """Three hospitals in threads; hospital 2 dies after `crash_after_posts` envelopes and
    is run again with the same state folder. Returns each one's AgreedSettings."""
    shards = skewed_shards()
    members = roles.create(url, N, root / "members")
    results: list = [None] * N
    errors: list = []

    def hospital(i: int) -> None:
        try:
            if i == 2 and crash_after_posts is not None:
                with pytest.raises(Crash):
                    _crashing(members[i], root / f"h{i}", shards[i], crash_after_posts)
            results[i] = roles.settings(members[i], root / f"h{i}", shards[i], 2,
                                        insecure=True, timeout_s=TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((i, exc))

    threads = [threading.Thread(target=hospital, args=(i,), name=f"hospital-{i}")
               for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * TIMEOUT_S)
    assert not errors, errors
    return results


def _crashing(member: Path, state: Path, shard, posts: int) -> None:
    """Hospital 2 dies after its `posts`-th sealed envelope left (kept and posted)."""
    original = JournaledClient.post_sealed
    count = {"n": 0}

    def post_sealed(self, envelope: bytes):  # noqa: ANN202 - as the original
        answer = original(self, envelope)
        if threading.current_thread().name == "hospital-2":
            count["n"] += 1
            if count["n"] >= posts:
                raise Crash("killed mid-round")
        return answer

    JournaledClient.post_sealed = post_sealed  # the other hospitals' threads pass through
    try:
        roles.settings(member, state, shard, 2, insecure=True, timeout_s=TIMEOUT_S)
    finally:
        JournaledClient.post_sealed = original


def in_process() -> TrainingPlan:
    keys = [new_sealing_key() for _ in range(N)]
    roster = Roster("one-process", tuple(bytes(k.public_key) for k in keys))
    return agree_settings(skewed_shards(), roster, keys, 2,
                          params_for_mode(HOSPITAL, insecure=True), None, None, None,
                          SealedMailbox())


def test_hospitals_agree_over_the_service_as_in_one_process(service, tmp_path):
    results = run_hospitals(service.url, tmp_path)
    reference = in_process()
    for i, agreed in enumerate(results):
        assert agreed.plan == reference.plan
        np.testing.assert_allclose(agreed.preconditioner, reference.preconditioner, rtol=1e-9)
        np.testing.assert_allclose(agreed.scaler.components_ if agreed.scaler.components_
                                   is not None else agreed.scaler.mean_,
                                   reference.scaler.components_ if reference.scaler.components_
                                   is not None else reference.scaler.mean_, atol=1e-9)
        saved = TrainingPlan.from_dict(json.loads((tmp_path / f"h{i}" / PLAN).read_text()))
        assert saved.to_dict() == reference.plan.to_dict()
        owned = json.loads((tmp_path / f"h{i}" / OWNERSHIP).read_text())
        assert owned["train_offset"] == sum(reference.train_counts[:i])
        with np.load(tmp_path / f"h{i}" / ROWS) as rows:
            assert rows["x_train"].shape == (reference.train_counts[i],
                                             reference.plan.n_features)
    # the service holds sealed, masked sums only: no hospital's own feature sum in the clear
    shard = skewed_shards()[0]
    needle = f"{shard.x_train.sum(axis=0)[0]:.6f}".encode()
    stored = b"".join(p.read_bytes() for p in service.data_dir.rglob("*") if p.is_file()
                      and p.suffix not in {".db", ".log", ".out"})
    assert needle not in stored and shard.x_train.astype("<f8").tobytes()[:64] not in stored


def test_a_hospital_killed_mid_rounds_resumes_with_its_saved_envelopes(service, tmp_path):
    results = run_hospitals(service.url, tmp_path, crash_after_posts=5)
    reference = in_process()
    assert all(agreed.plan == reference.plan for agreed in results)
