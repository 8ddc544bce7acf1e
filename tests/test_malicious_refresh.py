"""A malicious cloud asks the unmodified `medblindtuner hospital fetch` for refreshes.

Refresh mode "hospital": the cloud sends `c1` of a ciphertext and the hospital answers a masked
share with its secret key. The fake cloud below holds what a real cloud holds (the public
bundle and plan, no secret key), speaks the service's protocol on loopback and asks for
refreshes outside the plan: an index out of order, more refreshes than the plan has, another
ciphertext for an index already answered, a request of another job, bytes that are no
request or whose `c1` is no ciphertext. `hospital fetch` runs as its own process; each is a
loud refusal (exit 2, one `error:` line naming the rule), nothing beyond the plan is
answered, and a request asked again with the same bytes gets the same answer.
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
import pytest
from test_malicious_cloud import one_error_line
from test_service_cli import toy_features
from typer.testing import CliRunner

from medblindtuner.cli.main import app
from medblindtuner.he.keys import CloudCrypto
from medblindtuner.he.refresh import CloudRefresher, RefreshRequest
from medblindtuner.protocol import (
    CONTENT_SHA_HEADER,
    FINISHED,
    REFRESH_INDEX_HEADER,
    RUNNING,
)
from medblindtuner.training.artifacts import EncryptedDataset

JOB_ID = "fedcba9876543210fedcba9876543210"
EPOCHS = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A hospital folder in refresh mode "hospital" after keygen + encrypt (insecure ring)."""
    root = tmp_path_factory.mktemp("malicious_refresh")
    toy_features(root / "features.npz")
    work = root / "hospital"
    runner = CliRunner()
    for args in (["keygen", "--features", str(root / "features.npz"), "--pca", "6",
                  "--epochs", str(EPOCHS), "--batch-size", "64", "--patience", "5",
                  "--lr", "1.0", "--refresh", "hospital", "--insecure-test-params"],
                 ["encrypt"]):
        result = runner.invoke(app, ["hospital", *args, "--workdir", str(work)])
        assert result.exit_code == 0, (args, result.output, result.exception)
    return work


class Attacker:
    """The cloud's view: public bundle and plan; it makes well-formed requests of any
    index, for any job tag, from any ciphertext it can encrypt."""

    def __init__(self, work: Path) -> None:
        self.crypto = CloudCrypto.load(work / "public_bundle", allow_insecure=True,
                                       setup_bootstrap=False, with_eval_keys=False)
        self.plan = EncryptedDataset.load(work / "encrypted_dataset", self.crypto.params).plan
        self.job = self.plan.job_tag(self.crypto.params)
        self.max_refreshes = self.plan.max_refreshes

    def request(self, index: int, value: float = 0.5, job: str | None = None) -> bytes:
        params = self.crypto.params
        ct = self.crypto.encrypt(np.full(params.slots, value), 0)
        refresher = CloudRefresher(self.crypto.context, params, self.crypto.public_key,
                                   lambda _b: b"", job or self.job)
        return refresher.prepare(ct, index)[1].to_bytes()


@dataclass
class FakeCloud:
    """Serves `requests` (bytes, made lazily) one by one on `GET /jobs/{id}/refresh`, records
    the answers, then reports `finished`."""

    requests: list[Callable[[], bytes]]
    answers: list[bytes] = field(default_factory=list)
    served: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.partition("?")[0]
                with cloud.lock:
                    if path == f"/jobs/{JOB_ID}":
                        state = RUNNING if cloud.requests else FINISHED
                        return self._send(200, json.dumps({
                            "job_id": JOB_ID, "state": state, "steps": 0, "error": None,
                            "epochs_done": EPOCHS, "best_epoch": 1}).encode())
                    if path == f"/jobs/{JOB_ID}/refresh":
                        if not cloud.requests:
                            return self._send(204, b"")
                        data = cloud.requests[0]()
                        cloud.served.append(data)
                        try:
                            index = str(RefreshRequest.from_bytes(data).index)
                        except ValueError:  # not even a request: any label
                            index = "0"
                        return self._send(200, data, {
                            REFRESH_INDEX_HEADER: index,
                            CONTENT_SHA_HEADER: hashlib.sha256(data).hexdigest()})
                    if path == f"/jobs/{JOB_ID}/result":
                        return self._send(200, json.dumps({"files": {},
                                                           "best_epoch": 1}).encode())
                    return self._send(404, b'{"detail": "not found"}')

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with cloud.lock:
                    if self.path != f"/jobs/{JOB_ID}/refresh" or not cloud.requests:
                        return self._send(404, b'{"detail": "not found"}')
                    cloud.answers.append(body)
                    cloud.requests.pop(0)
                    return self._send(200, b'{"accepted": true}')

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"


def hospital_fetch(prepared: Path, tmp_path: Path, cloud: FakeCloud):
    """The unmodified `medblindtuner hospital fetch` (own process) against `cloud`."""
    work = tmp_path / "hospital"
    if not work.exists():  # a second call with the same tmp_path: a re-run of fetch
        shutil.copytree(prepared, work)
    server, url = cloud.serve()
    (work / "job.json").write_text(json.dumps({"url": url, "job_id": JOB_ID,
                                               "token": "t" * 43}))
    try:
        return subprocess.run(
            [sys.executable, "-m", "medblindtuner.cli.main", "hospital", "fetch",
             "--workdir", str(work), "--poll", "0.05"],
            capture_output=True, text=True, timeout=240)
    finally:
        server.shutdown()
        server.server_close()


def ledger(tmp_path: Path) -> dict[int, str]:
    path = tmp_path / "hospital" / "local" / "refreshes" / "ledger.json"
    saved = json.loads(path.read_text()) if path.exists() else {"digests": {}}
    return {int(k): v for k, v in saved["digests"].items()}


@pytest.fixture(scope="module")
def attacker(prepared) -> Attacker:
    return Attacker(prepared)


def test_planned_requests_are_answered_and_a_repeat_gets_the_same_bytes(prepared, attacker,
                                                                        tmp_path):
    first = attacker.request(0)
    cloud = FakeCloud([lambda: first, lambda: first, lambda: attacker.request(1)])
    done = hospital_fetch(prepared, tmp_path, cloud)
    assert done.returncode == 0, done.stderr
    assert len(cloud.answers) == 3 and cloud.answers[0] == cloud.answers[1]
    assert sorted(ledger(tmp_path)) == [0, 1]


@pytest.mark.parametrize(("script", "answered", "message"), [
    (lambda a: [lambda: a.request(1)], 0, "the plan allows only refresh 0 next"),
    (lambda a: [lambda: a.request(0), lambda: a.request(2)], 1,
     "the plan allows only refresh 1 next"),
    (lambda a: [lambda: a.request(0), lambda: a.request(0, value=0.25)], 1,
     "already answered for another ciphertext"),
    (lambda a: [lambda: a.request(0, job="another-job")], 0, "names job 'another-job'"),
    (lambda a: [lambda: b"\x00\x00\x00\x02{}"], 0, "malformed refresh request"),
    (lambda a: [lambda: RefreshRequest(0, a.job, b"not a ciphertext").to_bytes()], 0,
     "refresh request 0 is refused"),
], ids=["out-of-order", "skipped", "other-bytes", "foreign-job", "not-a-request",
        "c1-not-a-ciphertext"])
def test_out_of_plan_refreshes_are_refused_loudly(prepared, attacker, tmp_path, script,
                                                   answered, message):
    cloud = FakeCloud(script(attacker))
    done = hospital_fetch(prepared, tmp_path, cloud)
    assert message in one_error_line(done)
    assert len(cloud.answers) == answered == len(ledger(tmp_path))


def test_more_refreshes_than_planned_are_refused(prepared, attacker, tmp_path):
    planned = attacker.max_refreshes
    cloud = FakeCloud([lambda i=i: attacker.request(i) for i in range(planned + 1)])
    done = hospital_fetch(prepared, tmp_path, cloud)
    assert f"beyond the plan's {planned} refreshes" in one_error_line(done)
    assert len(cloud.answers) == planned == len(ledger(tmp_path))
    # a re-run of fetch after the refusal: still nothing beyond the plan
    again = FakeCloud([lambda: attacker.request(planned)])
    assert "beyond the plan's" in one_error_line(hospital_fetch(prepared, tmp_path, again))
    assert not again.answers
