"""A malicious cloud over real HTTP against the unmodified `medblindtuner hospital fetch`.

The fake cloud below holds what a real cloud holds (the public bundle, the encrypted dataset and
the public plan) and speaks the service's protocol on loopback. It tries to turn the hospital's
early-stopping judge into a decryption oracle: questions beyond the plan's epochs built from a
patient's encrypted feature (the attack of issue 14: each best-epoch answer says whether the
feature is below a threshold), the same epoch asked again with new thresholds, skipped epochs,
impossible losses and questions after the hospital stopped. `hospital fetch` runs as its own
process, exactly as a user runs it; every refusal must be loud (exit code 2, an `error:` line)
and the hospital must never answer more questions than the plan has epochs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import openfhe as ofhe
import pytest
from test_service_cli import toy_features
from typer.testing import CliRunner

from medblindtuner.cli.main import app
from medblindtuner.errors import EXIT_USER_ERROR
from medblindtuner.he.ciphertexts import ciphertext_to_bytes
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import CloudCrypto
from medblindtuner.he.params import data_level
from medblindtuner.protocol import (
    AWAITING_DECISION,
    CONTENT_SHA_HEADER,
    EPOCH_HEADER,
    FINISHED,
    RUNNING,
)
from medblindtuner.training.artifacts import EncryptedDataset
from medblindtuner.training.plan import TrainingPlan

EPOCHS = 4
PATIENCE = 2
# A length field of a serialised ciphertext: flipping this bit makes OpenFHE's parser ask for
# gigabytes (found by scanning single-bit flips); the hospital parses it in a limited child.
FLIP_OFFSET, FLIP_BIT = 20, 0x40
JOB_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A hospital folder after keygen + encrypt (insecure test ring), never submitted."""
    root = tmp_path_factory.mktemp("malicious")
    toy_features(root / "features.npz")
    work = root / "hospital"
    runner = CliRunner()
    for args in (["keygen", "--features", str(root / "features.npz"), "--pca", "6",
                  "--epochs", str(EPOCHS), "--batch-size", "128", "--patience", str(PATIENCE),
                  "--lr", "1.0", "--insecure-test-params"], ["encrypt"]):
        result = runner.invoke(app, ["hospital", *args, "--workdir", str(work)])
        assert result.exit_code == 0, (args, result.output, result.exception)
    return work


class AttackerView:
    """What the cloud has: public bundle, encrypted dataset, public plan. No secret key."""

    def __init__(self, work: Path) -> None:
        self.crypto = CloudCrypto.load(work / "public_bundle", allow_insecure=True,
                                       setup_bootstrap=False, with_eval_keys=False)
        self.ev = Evaluator(self.crypto.context, self.crypto.params, self.crypto.public_key)
        dataset = EncryptedDataset.load(work / "encrypted_dataset", self.crypto.params)
        self.plan: TrainingPlan = dataset.plan
        self.patient_ct = dataset.val[0].x_grad  # slot 0: one patient's (scaled) feature
        self.n_val = sum(self.plan.val_batch_sizes)
        padding = sum(self.plan.layout.samples_per_ct - n for n in self.plan.val_batch_sizes)
        self.padding_loss = self.plan.padding_loss(padding)

    def loss(self, value: float) -> ofhe.Ciphertext:
        """A ciphertext the judge decrypts to the per-sample loss `value`."""
        vector = np.zeros(self.crypto.params.slots)
        vector[0] = value * self.n_val + self.padding_loss
        return self.crypto.encrypt(vector, data_level(self.crypto.params))

    def feature_below(self, threshold: float) -> ofhe.Ciphertext:
        """Decrypts to the 'loss' 1 + x - threshold (x: the patient's feature): inside the
        Brier range for |x - threshold| < 1, so only the question budget stops the attack."""
        shifted = self.ev.add_scalar(self.patient_ct, 1.0 - threshold)
        return self.ev.add(self.ev.mul_scalar(shifted, float(self.n_val)),
                           self.loss(0.0))


@dataclass
class FakeCloud:
    """Serves `questions` one by one (epoch, ciphertext), then reports `final_state`. An
    epoch may be any header text and a question raw bytes (malformed answers); `status_body`
    replaces the status JSON."""

    questions: list[tuple[int | str, Callable[[], ofhe.Ciphertext | bytes]]]
    final_state: str = FINISHED
    status_body: bytes | None = None
    decisions: list[dict] = field(default_factory=list)
    downloads: int = 0
    answered_epochs: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self) -> dict:
        asking = bool(self.questions)
        state = AWAITING_DECISION if asking else self.final_state
        return {"job_id": JOB_ID, "state": state, "epoch": len(self.decisions) + 1,
                "epochs_done": len(self.decisions), "steps": len(self.decisions),
                "bootstraps": len(self.decisions), "best_epoch": None, "error": None,
                "awaiting_epoch": self.questions[0][0] if asking else None}

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:  # quiet
                pass

            def _json(self, body: dict, status: int = 200) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with cloud.lock:
                    if self.path == f"/jobs/{JOB_ID}" and cloud.status_body is not None:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(cloud.status_body)))
                        self.end_headers()
                        self.wfile.write(cloud.status_body)
                        return None
                    if self.path == f"/jobs/{JOB_ID}":
                        return self._json(cloud.status())
                    if self.path == f"/jobs/{JOB_ID}/validation-loss" and cloud.questions:
                        epoch, make = cloud.questions[0]
                        made = make()
                        data = made if isinstance(made, bytes) else ciphertext_to_bytes(made)
                        cloud.downloads += 1
                        self.send_response(200)
                        self.send_header(EPOCH_HEADER, str(epoch))
                        self.send_header(CONTENT_SHA_HEADER, hashlib.sha256(data).hexdigest())
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return None
                    if self.path == f"/jobs/{JOB_ID}/result":
                        return self._json({"files": {}, "best_epoch": 1})
                    return self._json({"detail": "not found"}, 404)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with cloud.lock:
                    if self.path != f"/jobs/{JOB_ID}/decision" or not cloud.questions:
                        return self._json({"detail": "not found"}, 404)
                    cloud.decisions.append(body)
                    cloud.questions.pop(0)
                    cloud.answered_epochs.append(body["epoch"])
                    return self._json({"state": RUNNING})

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"


def hospital_fetch(prepared: Path, tmp_path: Path, cloud: FakeCloud):
    """Run the unmodified `medblindtuner hospital fetch` (own process) against `cloud`."""
    work = tmp_path / "hospital"
    if not work.exists():  # a second call with the same tmp_path: a re-run of fetch
        shutil.copytree(prepared, work)
    server, url = cloud.serve()
    (work / "job.json").write_text(json.dumps({"url": url, "job_id": JOB_ID,
                                               "token": "t" * 43}))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "medblindtuner.cli.main", "hospital", "fetch",
             "--workdir", str(work), "--poll", "0.05"],
            capture_output=True, text=True, timeout=240)
    finally:
        server.shutdown()
        server.server_close()
    return done, {int(e): v for e, v in judge_state(work)["losses"].items()}


def judge_state(work: Path) -> dict:
    path = work / "local" / "judge.json"
    return json.loads(path.read_text()) if path.exists() else {"losses": {}}


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """A clean refusal: exit 2, no traceback, exactly one `error:` line on stderr."""
    assert done.returncode == EXIT_USER_ERROR, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def attacker(prepared) -> AttackerView:
    return AttackerView(prepared)


def test_threshold_oracle_gets_no_more_answers_than_the_plan_has_epochs(
        prepared, attacker, tmp_path):
    thresholds = np.linspace(-0.9, 0.9, 30)
    cloud = FakeCloud([(e + 1, lambda t=t: attacker.feature_below(t))
                       for e, t in enumerate(thresholds)])
    done, losses = hospital_fetch(prepared, tmp_path, cloud)
    assert done.returncode == EXIT_USER_ERROR, done.stdout + done.stderr
    answered = len(cloud.decisions)
    assert 1 <= answered <= EPOCHS  # the plan's one bit per epoch at most (fewer: it stopped)
    assert [d["epoch"] for d in cloud.decisions] == list(range(1, answered + 1))
    assert sorted(losses) == list(range(1, answered + 1))
    refused = cloud.questions[0][0]  # the refused question got no decision
    assert refused == answered + 1 and f"epoch {refused}" in done.stderr
    assert "refused" in done.stderr


def test_the_same_epoch_asked_again_gets_the_first_answer(prepared, attacker, tmp_path):
    """A resumed cloud may ask again; a crafted re-ask learns nothing new (no decryption)."""
    first = [(1, lambda: attacker.loss(0.2))]
    repeats = [(1, lambda t=t: attacker.feature_below(t)) for t in np.linspace(-0.9, 0.9, 8)]
    cloud = FakeCloud(first + repeats)
    done, losses = hospital_fetch(prepared, tmp_path, cloud)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(cloud.decisions) == 9
    assert all(d == cloud.decisions[0] for d in cloud.decisions)
    assert losses == {1: pytest.approx(0.2, abs=1e-3)}  # one decryption only


@pytest.mark.parametrize("script, message", [
    ([(1, 0.3), (3, 0.2)], "plan allows only epoch 2 next"),
    ([(1, 0.3), (2, -0.4)], "outside the Brier range"),
    ([(1, 7.0)], "outside the Brier range"),
    ([(0, 0.3)], "plan allows only epoch 1 next"),
], ids=["skipped-epoch", "negative-loss", "loss-above-range", "epoch-zero"])
def test_out_of_plan_questions_are_refused_loudly(prepared, attacker, tmp_path, script,
                                                  message):
    cloud = FakeCloud([(e, lambda v=v: attacker.loss(v)) for e, v in script])
    done, losses = hospital_fetch(prepared, tmp_path, cloud)
    assert done.returncode == EXIT_USER_ERROR, done.stdout + done.stderr
    assert message in " ".join(done.stderr.split())
    assert len(cloud.decisions) == len(script) - 1  # everything before the bad one answered
    assert len(losses) == len(script) - 1  # and the refused one left no trace


def test_questions_after_the_hospital_stopped_are_refused(prepared, attacker, tmp_path):
    # the best loss at epoch 1, then PATIENCE worse ones: the hospital says stop
    worse = [(e, lambda e=e: attacker.loss(0.2 + 0.01 * e)) for e in range(1, PATIENCE + 2)]
    cloud = FakeCloud([*worse, (PATIENCE + 2, lambda: attacker.loss(0.01))])
    done, losses = hospital_fetch(prepared, tmp_path, cloud)
    assert done.returncode == EXIT_USER_ERROR, done.stdout + done.stderr
    assert "after the hospital stopped" in " ".join(done.stderr.split())
    assert [d["continue"] for d in cloud.decisions] == [True] * PATIENCE + [False]
    assert [d["best_epoch"] for d in cloud.decisions] == [1] * (PATIENCE + 1)
    assert sorted(losses) == list(range(1, PATIENCE + 2))


def test_more_epochs_than_planned_are_refused(prepared, attacker, tmp_path):
    better = [(e, lambda e=e: attacker.loss(0.3 - 0.01 * e)) for e in range(1, EPOCHS + 2)]
    cloud = FakeCloud(better)
    done, _ = hospital_fetch(prepared, tmp_path, cloud)
    assert done.returncode == EXIT_USER_ERROR, done.stdout + done.stderr
    assert f"the plan has {EPOCHS} epochs" in " ".join(done.stderr.split())
    assert [d["best_epoch"] for d in cloud.decisions] == list(range(1, EPOCHS + 1))


# ---- issue 26: no bit beyond the plan, across re-runs; every malformed answer refused -----------
def test_a_refusal_ends_the_jobs_questions_for_good(prepared, attacker, tmp_path):
    """The round-2 attack: a refused question is asked again in a re-run of `hospital fetch`
    (8 re-runs gave RARARAAA). Now the first refusal is persisted and every later question,
    in any re-run, is refused unread: no decision, no decryption."""
    first = FakeCloud([(1, lambda: attacker.loss(0.3)), (2, lambda: attacker.loss(7.0))])
    done, losses = hospital_fetch(prepared, tmp_path, first)
    assert "outside the Brier range" in one_error_line(done)
    assert first.answered_epochs == [1] and sorted(losses) == [1]
    for threshold in np.linspace(-0.9, 0.9, 4):  # re-runs, each with a fresh question
        again = FakeCloud([(2, lambda t=threshold: attacker.feature_below(t))])
        done, losses = hospital_fetch(prepared, tmp_path, again)
        assert "ended with a refusal" in one_error_line(done)
        assert again.decisions == [] and again.downloads == 0  # refused before reading
        assert sorted(losses) == [1]
    saved = judge_state(tmp_path / "hospital")
    assert "Brier range" in saved["refused"] and len(saved["decrypted"]) == 2


def test_decryption_budget_holds_across_restarts(prepared, attacker, tmp_path):
    """Decryptions are counted before they happen: a state file whose budget is spent (a
    process killed after each decryption, before its answer) allows no new decryption."""
    work = tmp_path / "hospital"
    shutil.copytree(prepared, work)
    spent = [[e, f"{e:064x}"] for e in range(1, EPOCHS + 1)]  # E decryptions, no answers
    (work / "local" / "judge.json").write_text(json.dumps(
        {"losses": {}, "answers": {}, "decrypted": spent, "refused": None}))
    cloud = FakeCloud([(1, lambda: attacker.loss(0.3))])
    done, losses = hospital_fetch(prepared, tmp_path, cloud)
    assert f"the plan allows {EPOCHS}" in one_error_line(done)
    assert cloud.decisions == [] and losses == {}


@pytest.mark.parametrize("epoch_text", ["abc", "1e3", "-1", "1.0", "1 2", "", "9" * 30],
                         ids=["abc", "1e3", "negative", "float", "inner-space", "empty",
                              "30-digits"])
def test_malformed_epoch_header_is_a_recorded_refusal(prepared, attacker, tmp_path,
                                                      epoch_text):
    cloud = FakeCloud([(epoch_text, lambda: attacker.loss(0.3))])
    done, losses = hospital_fetch(prepared, tmp_path, cloud)
    assert "not a plain integer" in one_error_line(done)
    assert cloud.decisions == [] and losses == {}
    assert "not a plain integer" in judge_state(tmp_path / "hospital")["refused"]


@pytest.fixture(scope="module")
def foreign_loss(attacker) -> bytes:
    """A loss ciphertext the cloud made under its own keys and context (same parameters)."""
    from medblindtuner.he.keys import HospitalKeys

    params = attacker.crypto.params
    keys = HospitalKeys.generate(params, [], allow_insecure=True)
    vector = np.zeros(params.slots)
    vector[0] = 0.3 * attacker.n_val + attacker.padding_loss
    return ciphertext_to_bytes(keys.encrypt(vector, data_level(params)))


@pytest.mark.parametrize("kind", ["foreign-context", "garbage", "truncated", "oversized",
                                  "flipped-length"])
def test_malformed_loss_ciphertext_is_a_recorded_refusal(prepared, attacker, foreign_loss,
                                                         tmp_path, kind):
    good = ciphertext_to_bytes(attacker.loss(0.3))
    flipped = bytearray(good)
    flipped[FLIP_OFFSET] ^= FLIP_BIT
    data = {"foreign-context": foreign_loss, "garbage": b"\x00garbage" * 100,
            "truncated": good[: len(good) // 2], "oversized": good + b"\0" * (64 << 20),
            "flipped-length": bytes(flipped)}[kind]
    cloud = FakeCloud([(1, lambda: data)])
    done, losses = hospital_fetch(prepared, tmp_path, cloud)
    line = one_error_line(done)
    assert "refused" in line
    assert cloud.decisions == [] and losses == {}
    assert judge_state(tmp_path / "hospital")["refused"]


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"state": 3}', b"{}"],
                         ids=["not-json", "list", "state-int", "empty"])
def test_malformed_status_is_a_recorded_refusal(prepared, tmp_path, body):
    cloud = FakeCloud([], status_body=body)
    done, _ = hospital_fetch(prepared, tmp_path, cloud)
    assert "malformed answer from the cloud" in one_error_line(done)
    assert "malformed" in judge_state(tmp_path / "hospital")["refused"]
