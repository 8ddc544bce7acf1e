"""The hospital's conversation with one cloud job, as one object.

`CloudSession` joins a `Hospital` (keys, folder, judge) to a `HospitalClient` (HTTP): submit
the public bundle and the encrypted dataset, answer the early-stopping questions, fetch and
decrypt the result, and run encrypted inference. It is the only reader and writer of the
folder's `job.json` and the only user of its `queries/` folders. The CLI, the demo and the
Python API call it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medblindtuner.hospital.client import HospitalClient
from medblindtuner.hospital.hospital import Hospital, HospitalError
from medblindtuner.protocol import REFRESH_WAIT_S

StatusCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainingOutcome:
    """A finished job as the hospital saw it: the final status, the validation losses it
    decrypted (one per epoch) and the downloaded result's manifest."""

    status: dict[str, Any]
    history: list[dict[str, float]]
    result: dict[str, Any]


@dataclass(frozen=True)
class EncryptedPrediction:
    """One query set scored under encryption: decrypted probabilities and where time went."""

    query_id: str
    probabilities: np.ndarray
    cloud_seconds: float | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def classes(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


class CloudSession:
    """One hospital folder's job on one cloud service."""

    def __init__(self, hospital: Hospital, client: HospitalClient) -> None:
        self.hospital = hospital
        self.client = client
        self.losses: dict[int, float] = {}

    # ---- job.json -------------------------------------------------------------------------
    @classmethod
    def create(cls, hospital: Hospital, url: str, progress: bool = True) -> CloudSession:
        """A new job on the service at `url`; its id and token go to job.json (mode 0600)."""
        client = HospitalClient(url, progress=progress)
        client.create_job()
        fd = os.open(hospital.folder.job, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"url": url, "job_id": client.job_id, "token": client.token}, handle)
        return cls(hospital, client)

    @classmethod
    def resume(cls, hospital: Hospital, progress: bool = True) -> CloudSession:
        """The job recorded in job.json."""
        path = hospital.folder.job
        if not path.exists():
            raise HospitalError(f"{path} not found: run `medblindtuner hospital submit` first")
        job = json.loads(path.read_text())
        return cls(hospital, HospitalClient(job["url"], token=job["token"],
                                            job_id=job["job_id"], progress=progress))

    @classmethod
    def has_job(cls, hospital: Hospital) -> bool:
        return hospital.folder.job.exists()

    @property
    def job_id(self) -> str | None:
        return self.client.job_id

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> CloudSession:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ---- training -------------------------------------------------------------------------
    def submit(self) -> None:
        """Upload the public bundle and the encrypted dataset (resumable), start training."""
        self.client.upload_dir("bundle", self.hospital.folder.public_bundle)
        self.client.upload_dir("dataset", self.hospital.folder.encrypted_dataset)
        if self.client.status()["state"] == "created":
            self.client.start()

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def answer_decisions(self, poll_s: float = 1.0, on_status: StatusCallback | None = None,
                         timeout_s: float | None = None,
                         refresh_wait_s: float = REFRESH_WAIT_S) -> dict[str, Any]:
        """Decrypt each epoch's validation loss and answer until the job ends, and in refresh
        mode "hospital" answer the cloud's refresh requests through the folder's ledger
        (`Hospital.refresher`; long polls of `refresh_wait_s`, 0: polling every `poll_s`);
        the final status (raises `JobFailed` if the cloud's job failed)."""
        judge = self.hospital.judge()
        refresher = (self.hospital.refresher(judge)
                     if self.hospital.params.refreshed_by_hospital else None)
        try:
            final = self.client.answer_decisions(judge, poll_s=poll_s, timeout_s=timeout_s,
                                                 on_status=on_status, refresher=refresher,
                                                 wait_s=refresh_wait_s)
        finally:
            if refresher is not None:
                refresher.close()
        self.losses = dict(judge.losses)
        return final

    @property
    def history(self) -> list[dict[str, float]]:
        """[{epoch, val_loss}] as decrypted by this hospital."""
        return [{"epoch": e, "val_loss": loss} for e, loss in sorted(self.losses.items())]

    def fetch_result(self) -> dict[str, Any]:
        """Download the encrypted result into the folder; its manifest."""
        return self.client.fetch_result(self.hospital.folder.result)

    def train(self, poll_s: float = 1.0,
              on_status: StatusCallback | None = None) -> TrainingOutcome:
        """Submit, answer every decision, fetch the result."""
        self.submit()
        final = self.answer_decisions(poll_s=poll_s, on_status=on_status)
        return TrainingOutcome(final, self.history, self.fetch_result())

    def decrypt(self) -> np.ndarray:
        """The fetched weights, decrypted (best epoch checked against this hospital's)."""
        return self.hospital.decrypt_result()

    # ---- encrypted inference --------------------------------------------------------------
    def predict(self, x: np.ndarray, poll_s: float = 0.5,
                timeout_s: float | None = None) -> EncryptedPrediction:
        """Encrypt scaled rows, have the cloud score them, decrypt the probabilities."""
        timings: dict[str, float] = {}

        def timed(key: str, step: Callable[[], Any]) -> Any:
            started = time.perf_counter()
            value = step()
            timings[key] = time.perf_counter() - started
            return value

        query_id = self.client.create_query()
        root = self.hospital.folder.query(query_id)
        timed("encrypt_s", lambda: self.hospital.encrypt_queries(x, root / "encrypted"))
        timed("upload_s", lambda: self.client.upload_queries(root / "encrypted",
                                                             query_id=query_id))

        def score() -> dict[str, Any]:
            self.client.score(query_id)
            return self.client.wait_scores(query_id, poll_s=poll_s, timeout_s=timeout_s)

        final = timed("cloud_scoring_wait_s", score)
        self.client.fetch_scores(query_id, root / "scores")
        probabilities = timed("decrypt_s",
                              lambda: self.hospital.decrypt_scores(root / "scores"))
        return EncryptedPrediction(query_id, probabilities, final.get("seconds"), timings)

    def ensure_result(self) -> None:
        """Download the result if this folder has none yet (to compare with plaintext)."""
        if not (self.hospital.folder.result / "manifest.json").exists():
            self.fetch_result()
