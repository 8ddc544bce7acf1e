"""Round trip of one refresh through the service's relay (refresh mode "hospital").

A binary job on synthetic rows runs on a real service (separate process, loopback) while
this process plays the hospital (`HospitalClient.answer_decisions` with a `HospitalRefresher`,
as `hospital fetch` does). Per refresh it reports, from the worker's log, how long the worker
waited between publishing the request and finding the answer (the relay's round trip: the
hospital's notice of the request, download, its limited-child parse, the masked share,
upload, the service's checks and write) and the worker's own limited-child parse of the
answer; and, timed here, the hospital's part (`answer_cloud`, of which `masked_share`).

    PYTHONPATH=src python benchmarks/refresh_relay.py --wait 25            # long poll
    PYTHONPATH=src python benchmarks/refresh_relay.py --wait 0 --poll 1.0  # polling
    flock /work/prod.lock env PYTHONPATH=src python benchmarks/refresh_relay.py --production
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.hospital.client import HospitalClient
from medblindtuner.hospital.crypto import HospitalJudge, encrypt_dataset
from medblindtuner.hospital.refresher import HospitalRefresher
from medblindtuner.service.local import LocalService
from medblindtuner.training.plain import TrainConfig, add_bias
from medblindtuner.training.plan import TrainingPlan

REQUESTED = re.compile(r"refresh \d+ requested \((\d+) bytes")
ANSWER_BYTES = re.compile(r"refresh \d+ answered \((\d+) bytes")
ANSWERED = re.compile(r"refresh (\d+) answered after ([\d.]+) s \(answer parsed in ([\d.]+) s\)")


def problem(n_train: int, n_val: int, dim: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, dim)) * 1.5
    y_train, y_val = rng.integers(0, 2, n_train), rng.integers(0, 2, n_val)
    x_train = centers[y_train] + rng.normal(size=(n_train, dim))
    x_val = centers[y_val] + rng.normal(size=(n_val, dim))
    scale = np.linalg.norm(x_train, axis=1).max()
    return add_bias(x_train / scale), y_train, add_bias(np.clip(x_val / scale, -1, 1)), y_val


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(values), "median": round(statistics.median(ordered), 4),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
            "max": round(ordered[-1], 4)}


class TimedRefresher(HospitalRefresher):
    """The hospital's ledger, timing each answer and its masked share."""

    answer_s: list[float]
    share_s: list[float]

    def answer_cloud(self, request_bytes: bytes, index_text: str | None = None) -> bytes:
        started = time.perf_counter()
        answer = super().answer_cloud(request_bytes, index_text)
        self.answer_s.append(time.perf_counter() - started)
        return answer

    def _answer_new(self, request):  # noqa: ANN001, ANN202 - RefreshRequest, bytes
        started = time.perf_counter()
        answer = super()._answer_new(request)
        self.share_s.append(time.perf_counter() - started)
        return answer


def run(args: argparse.Namespace, root: Path) -> dict:
    params = params_for_mode(HOSPITAL, insecure=not args.production)
    data = problem(args.rows, 40)
    config = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=args.epochs,
                         batch_size=args.batch, patience=args.epochs)
    plan = TrainingPlan.create(params, data[0], data[2], 2, config)
    params = params.with_bootstrap_slots(plan.bootstrap_slots)
    started = time.perf_counter()
    keys = HospitalKeys.generate(params, plan.rotation_indices, allow_insecure=True,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    keygen_s = time.perf_counter() - started
    keys.save_public_bundle(root / "bundle")
    encrypt_dataset(keys, plan, *data).save(root / "dataset", keys.params)
    service = LocalService(root / "cloud", insecure=not args.production).start()
    try:
        client = HospitalClient(service.url, progress=False)
        client.create_job()
        client.upload_dir("bundle", root / "bundle")
        client.upload_dir("dataset", root / "dataset")
        client.start()
        judge = HospitalJudge(keys, plan, len(data[3]))
        refresher = TimedRefresher(keys, plan, root / "ledger", stopped=lambda: judge.stopped)
        refresher.answer_s, refresher.share_s = [], []
        started = time.perf_counter()
        final = client.answer_decisions(judge, poll_s=args.poll, refresher=refresher,
                                        wait_s=args.wait, timeout_s=3600)
        train_s = time.perf_counter() - started
    finally:
        service.stop()
    log = "".join(path.read_text() for path in (root / "cloud" / "jobs").glob("*/worker.log"))
    found = [(float(w), float(p)) for _i, w, p in ANSWERED.findall(log)]
    service_log = (root / "cloud" / "service.log").read_text()
    return {
        "params": params.name, "ring_dim": params.ring_dim, "wait_s": args.wait,
        "poll_s": args.poll, "state": final["state"], "refreshes": final.get("refreshes"),
        "steps": final.get("steps"), "keygen_s": round(keygen_s, 1),
        "train_s": round(train_s, 1),
        "request_bytes": max(map(int, REQUESTED.findall(log)), default=None),
        "answer_bytes": max(map(int, ANSWER_BYTES.findall(service_log)), default=None),
        "worker_wait_s": summary([w for w, _p in found]),
        "worker_answer_parse_s": summary([p for _w, p in found]),
        "round_trip_s": summary([w + p for w, p in found]),
        "hospital_answer_s": summary(refresher.answer_s),
        "hospital_masked_share_s": summary(refresher.share_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=float, default=25.0, help="long poll (0: polling)")
    parser.add_argument("--poll", type=float, default=1.0, help="status poll interval, s")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--production", action="store_true",
                        help="128-bit parameters (ring 2^15; run under flock /work/prod.lock)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="refresh-relay-") as tmp:
        result = run(args, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
