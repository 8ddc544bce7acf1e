"""Load test of the cloud service while it trains: status pollers + concurrent uploads.

Starts a real service (uvicorn subprocess, insecure test parameters), submits one binary
training job whose early-stopping questions are answered by a HospitalJudge in this process,
and, while that job trains, runs N clients polling status and M clients uploading a full public
bundle each (to their own jobs). Reports latency percentiles (p50/p95/p99/max) and failures.

    .venv/bin/python benchmarks/service_load.py --pollers 20 --uploaders 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import INSECURE_TEST
from medblindtuner.hospital.client import HospitalClient
from medblindtuner.hospital.crypto import HospitalJudge, encrypt_dataset
from medblindtuner.training.plain import TrainConfig, add_bias
from medblindtuner.training.plan import TrainingPlan


def toy(n_train: int = 240, n_val: int = 40, dim: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, dim)) * 1.5

    def split(n: int):
        y = rng.integers(0, 2, n)
        return centers[y] + rng.normal(size=(n, dim)), y

    (xt, yt), (xv, yv) = split(n_train), split(n_val)
    scale = np.linalg.norm(xt, axis=1).max()
    return add_bias(xt / scale), yt, add_bias(np.clip(xv / scale, -1, 1)), yv


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    arr = np.asarray(values) * 1000.0
    return {"n": len(values), "p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p95_ms": round(float(np.percentile(arr, 95)), 2),
            "p99_ms": round(float(np.percentile(arr, 99)), 2),
            "max_ms": round(float(arr.max()), 2)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TimedClient(HospitalClient):
    """Records the latency of every chunk PUT."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_latencies: list[float] = []

    def upload_chunk(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().upload_chunk(*args, **kwargs)
        finally:
            self.chunk_latencies.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--uploaders", type=int, default=3)
    parser.add_argument("--duration", type=float, default=30.0, help="polling seconds")
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mbt-load-"))
    data = toy()
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=args.epochs, batch_size=64,
                         patience=5)
    plan = TrainingPlan.create(INSECURE_TEST, data[0], data[2], 2, config)
    params = INSECURE_TEST.with_bootstrap_slots(plan.bootstrap_slots)
    keys = HospitalKeys.generate(params, plan.rotation_indices, allow_insecure=True,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    keys.save_public_bundle(work / "bundle")
    encrypt_dataset(keys, plan, *data).save(work / "dataset", params)
    bundle_bytes = sum(p.stat().st_size for p in (work / "bundle").iterdir())

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.out", "wb")  # noqa: SIM115 - closed at the end
    server = subprocess.Popen(
        [sys.executable, "-m", "medblindtuner.service", "serve", "--port", str(port),
         "--data-dir", str(work / "cloud"), "--insecure-test-params"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if server.poll() is not None:
                raise RuntimeError((work / "server.out").read_text()[-2000:])
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        trainer_client = HospitalClient(url, progress=False)
        trainer_client.create_job()
        trainer_client.upload_dir("bundle", work / "bundle")
        trainer_client.upload_dir("dataset", work / "dataset")
        trainer_client.start()
        judge = HospitalJudge(keys, plan, len(data[3]))
        training_result: dict = {}

        def answer() -> None:
            try:
                training_result["final"] = trainer_client.answer_decisions(judge, poll_s=0.2)
            except Exception as exc:  # noqa: BLE001
                training_result["error"] = repr(exc)

        answerer = threading.Thread(target=answer)
        answerer.start()
        while trainer_client.status()["state"] not in ("running", "awaiting_decision"):
            time.sleep(0.2)

        status_latencies: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration

        def poller() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                headers = {"Authorization": f"Bearer {trainer_client.token}"}
                while time.monotonic() < stop_at:
                    start = time.perf_counter()
                    try:
                        response = http.get(f"/jobs/{trainer_client.job_id}", headers=headers)
                        ok = response.status_code == 200
                    except httpx.HTTPError as exc:
                        ok, response = False, exc
                    elapsed = time.perf_counter() - start
                    with lock:
                        status_latencies.append(elapsed)
                        if not ok:
                            failures.append(f"status: {response}")
                    time.sleep(args.poll_interval)

        uploads: list[dict] = []

        def uploader() -> None:
            client = TimedClient(url, progress=False)
            try:
                client.create_job()
                start = time.perf_counter()
                client.upload_dir("bundle", work / "bundle")
                seconds = time.perf_counter() - start
                with lock:
                    uploads.append({"seconds": seconds,
                                    "mib_per_s": bundle_bytes / 2**20 / seconds,
                                    "chunk_latencies": client.chunk_latencies})
                client.delete()
            except Exception as exc:  # noqa: BLE001
                with lock:
                    failures.append(f"upload: {exc!r}")

        threads = [threading.Thread(target=poller) for _ in range(args.pollers)]
        threads += [threading.Thread(target=uploader) for _ in range(args.uploaders)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_seconds = time.perf_counter() - began
        state_after_load = trainer_client.status()
        answerer.join(timeout=600)

        chunk_latencies = [x for u in uploads for x in u["chunk_latencies"]]
        report = {
            "command": " ".join(sys.argv),
            "cpu_count": os.cpu_count(),
            "pollers": args.pollers,
            "uploaders": args.uploaders,
            "load_seconds": round(load_seconds, 1),
            "bundle_mib": round(bundle_bytes / 2**20, 1),
            "status_requests": percentiles(status_latencies),
            "status_rps": round(len(status_latencies) / load_seconds, 1),
            "chunk_put": percentiles(chunk_latencies),
            "uploads": [{"seconds": round(u["seconds"], 2),
                         "mib_per_s": round(u["mib_per_s"], 1)} for u in uploads],
            "failures": len(failures),
            "failure_examples": failures[:5],
            "training_state_during_load": state_after_load["state"],
            "training_final": {k: training_result.get("final", {}).get(k)
                               for k in ("state", "epochs_done", "steps", "bootstraps")},
            "training_error": training_result.get("error"),
        }
        text = json.dumps(report, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for pid_file in (work / "cloud" / "jobs").glob("*/worker.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        log.close()


if __name__ == "__main__":
    main()
