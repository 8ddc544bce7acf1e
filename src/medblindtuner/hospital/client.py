"""Hospital-side HTTP client for the cloud service.

The client only ever sends the public bundle and the encrypted dataset; decryption of the
per-epoch validation loss and of the final weights happens locally with the secret key (see
`answer_decisions`). Uploads are chunked with a SHA-256 per chunk and resumable: the server is
asked which chunks it already holds and only the rest is sent, so a dropped connection costs at
most one chunk.

Encrypted inference uses the same upload protocol: `upload_queries` sends a query set (made by
`hospital.crypto.encrypt_queries`), `score` starts the cloud-side scoring,
`wait_scores` polls and `fetch_scores` downloads the encrypted scores, which only the
hospital can decrypt (`decrypt_scores`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.protocol import (
    AWAITING_DECISION,
    CHUNK_SHA_HEADER,
    CONTENT_SHA_HEADER,
    EPOCH_HEADER,
    FINISHED,
    MANIFEST_NAME,
    MAX_FINALIZE_BATCH,
    Q_DONE,
    Q_FAILED,
    Q_TERMINAL_STATES,
    REFRESH_INDEX_HEADER,
    REFRESH_WAIT_S,
    TERMINAL_STATES,
    bearer,
)

TERMINAL = TERMINAL_STATES
QUERY_TERMINAL = Q_TERMINAL_STATES


# A download whose bytes do not hash to the SHA-256 the service sent with them. Retried a few
# times while answering decisions (a restarted worker may be republishing the file), then fatal.
MISMATCH_STATUS = 502
MAX_MISMATCHES = 5
# Connection errors and "come back later" answers are retried, a bounded number of times.
RETRIES = 6
BACKOFF_S = 0.5
MAX_BACKOFF_S = 15.0
RETRY_STATUS = (429, 503)


class ServiceError(MedBlindTunerError, RuntimeError):
    """An HTTP error from the service, with its status code and message (a user-actionable
    refusal: the CLI prints it as one line)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class CloudProtocolError(ServiceError):
    """An answer of the cloud that does not follow the protocol (not JSON, fields missing or
    of the wrong type): the hospital treats it as a refusal, like a malformed question."""

    def __init__(self, message: str) -> None:
        super().__init__(MISMATCH_STATUS, message)


class JobFailed(RuntimeError):
    """The job ended as failed or cancelled instead of finishing."""


class HospitalClient:
    """Talks to one job (after `create_job`, or with a known job id and token)."""

    def __init__(self, base_url: str, token: str | None = None, job_id: str | None = None,
                 timeout: float = 120.0, progress: bool = True, retries: int = RETRIES,
                 backoff_s: float = BACKOFF_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.job_id = job_id
        self.progress = progress
        self.retries = retries
        self.backoff_s = backoff_s
        self.chunk_bytes: int | None = None
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HospitalClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ---- plumbing -------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return bearer(self.token)

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request, retried on connection errors and 429/503 with bounded exponential
        backoff (honouring Retry-After). Every request of the protocol may be repeated: chunks
        and manifests are idempotent, a repeated finalize or decision answers "done"/409."""
        for attempt in range(self.retries + 1):
            delay = min(self.backoff_s * 2 ** attempt, MAX_BACKOFF_S)
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    return response
                after = response.headers.get("Retry-After", "")
                if after.isdigit():
                    delay = min(float(after), MAX_BACKOFF_S)
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        response = self._send(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (json.JSONDecodeError, AttributeError):
                detail = response.text
            raise ServiceError(response.status_code, str(detail))
        return response

    def _job(self, suffix: str = "") -> str:
        if not self.job_id:
            raise RuntimeError("no job: call create_job() first or pass job_id")
        return f"/jobs/{self.job_id}{suffix}"

    # ---- jobs -----------------------------------------------------------------------------
    def create_job(self) -> dict[str, Any]:
        data = self._request("POST", "/jobs").json()
        self.job_id, self.token = data["job_id"], data["token"]
        self.chunk_bytes = data["chunk_bytes"]
        return data

    def status(self) -> dict[str, Any]:
        response = self._request("GET", self._job())
        try:
            return response.json()
        except ValueError as exc:
            raise CloudProtocolError(f"the job status is not JSON: {response.text[:200]!r}") \
                from exc

    def start(self) -> dict[str, Any]:
        return self._request("POST", self._job("/start")).json()

    def cancel(self) -> dict[str, Any]:
        return self._request("POST", self._job("/cancel")).json()

    def delete(self) -> dict[str, Any]:
        return self._request("DELETE", self._job()).json()

    # ---- uploads --------------------------------------------------------------------------
    def artifact_status(self, kind: str) -> dict[str, Any]:
        return self._request("GET", self._job(f"/artifacts/{kind}")).json()

    def _upload_manifest(self, base: str, directory: Path) -> dict[str, Any]:
        raw = (Path(directory) / MANIFEST_NAME).read_bytes()
        return self._request("PUT", f"{base}/manifest", content=raw,
                             headers={"Content-Type": "application/octet-stream"}).json()

    def _upload_chunk(self, base: str, name: str, index: int, data: bytes,
                      sha256: str | None = None) -> dict[str, Any]:
        digest = sha256 or hashlib.sha256(data).hexdigest()
        return self._request(
            "PUT", f"{base}/files/{name}/chunks/{index}", content=data,
            headers={CHUNK_SHA_HEADER: digest, "Content-Type": "application/octet-stream"},
        ).json()

    def upload_manifest(self, kind: str, directory: Path) -> dict[str, Any]:
        return self._upload_manifest(self._job(f"/artifacts/{kind}"), directory)

    def upload_chunk(self, kind: str, name: str, index: int, data: bytes,
                     sha256: str | None = None) -> dict[str, Any]:
        return self._upload_chunk(self._job(f"/artifacts/{kind}"), name, index, data, sha256)

    def finalize(self, kind: str, name: str) -> dict[str, Any]:
        return self._request("POST", self._job(f"/artifacts/{kind}/files/{name}/finalize")).json()

    def upload_dir(self, kind: str, directory: Path, max_chunks: int | None = None) -> dict:
        """Upload an artifact directory (manifest first, then its files), resuming if possible.

        `max_chunks` stops after sending that many chunks (used to test interrupted uploads).
        Returns {"sent_chunks": n, "skipped_chunks": m}.
        """
        return self._upload_dir(self._job(f"/artifacts/{kind}"), directory, kind, max_chunks)

    def _upload_dir(self, base: str, directory: Path, label: str,
                    max_chunks: int | None = None) -> dict:
        """The resumable protocol against `base` (an artifact or a query set): GET base tells
        which chunks the server holds, PUT base/manifest, base/files/{name}/chunks/{i},
        POST base/finalize for up to MAX_FINALIZE_BATCH files at a time."""
        directory = Path(directory)
        self._upload_manifest(base, directory)
        state = self._request("GET", base).json()
        todo = {name: info for name, info in state["files"].items() if not info["complete"]}
        remaining = sum(
            info["bytes"] - len(info["received"]) * info["chunk_bytes"] for info in todo.values()
        )
        sent = skipped = 0
        uploaded: list[str] = []  # fully sent, not yet finalized
        with tqdm(total=max(remaining, 0), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"upload {label}", disable=not self.progress) as bar:
            for name, info in sorted(todo.items()):
                have = set(info["received"])
                size, chunk = info["bytes"], info["chunk_bytes"]
                with open(directory / name, "rb") as handle:
                    for index in range(info["n_chunks"]):
                        if index in have:
                            skipped += 1
                            continue
                        if max_chunks is not None and sent >= max_chunks:
                            if uploaded:
                                self._finalize_files(base, uploaded)
                            return {"sent_chunks": sent, "skipped_chunks": skipped,
                                    "interrupted": True}
                        handle.seek(index * chunk)
                        data = handle.read(min(chunk, size - index * chunk))
                        self._upload_chunk(base, name, index, data)
                        sent += 1
                        bar.update(len(data))
                uploaded.append(name)
                if len(uploaded) == MAX_FINALIZE_BATCH:
                    self._finalize_files(base, uploaded)
            if uploaded:
                self._finalize_files(base, uploaded)
        return {"sent_chunks": sent, "skipped_chunks": skipped, "interrupted": False}

    def _finalize_files(self, base: str, names: list[str]) -> None:
        """POST base/finalize for `names` (emptied): one validator child checks their
        ciphertexts on the service, instead of one child per file."""
        self._request("POST", f"{base}/finalize", json={"names": list(names)})
        names.clear()

    # ---- early stopping -----------------------------------------------------------------------
    def validation_loss_raw(self) -> tuple[str | None, bytes]:
        """The question as the cloud sent it: its `X-Epoch` header (unparsed: the judge
        refuses a malformed one) and the ciphertext bytes (SHA-256 checked)."""
        response = self._request("GET", self._job("/validation-loss"))
        data = response.content
        digest = response.headers.get(CONTENT_SHA_HEADER)
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ServiceError(MISMATCH_STATUS,
                               "validation-loss ciphertext does not match its SHA-256")
        return response.headers.get(EPOCH_HEADER), data

    def validation_loss_bytes(self) -> tuple[int, bytes]:
        epoch, data = self.validation_loss_raw()
        if epoch is None or not epoch.isascii() or not epoch.isdigit() or len(epoch) > 7:
            raise CloudProtocolError(f"the cloud sent the epoch {str(epoch)[:40]!r}")
        return int(epoch), data

    def decide(self, epoch: int, continue_training: bool, best_epoch: int) -> dict[str, Any]:
        body = {"continue": continue_training, "best_epoch": best_epoch, "epoch": epoch}
        return self._request("POST", self._job("/decision"), json=body).json()

    def wait_for_decision(self, poll_s: float = 0.5, timeout_s: float | None = None,
                          on_status: Callable[[dict], None] | None = None,
                          refresher: Any = None,
                          wait_s: float = REFRESH_WAIT_S) -> dict[str, Any]:
        """Poll until the job awaits a decision or ends; returns the last status. With a
        `refresher` (a `HospitalRefresher`), refresh requests are answered meanwhile: each
        pause is a long poll of up to `wait_s` s for one (0: plain polling every `poll_s`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            current = self.status()
            if not isinstance(current, dict) or not isinstance(current.get("state"), str):
                raise CloudProtocolError(f"the job status is not the protocol's: "
                                         f"{str(current)[:200]}")
            if on_status:
                on_status(current)
            if current["state"] == AWAITING_DECISION or current["state"] in TERMINAL:
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {current['state']}")
            started = time.monotonic()
            if refresher is not None and self.answer_refresh(refresher, wait_s):
                continue
            time.sleep(max(poll_s - (time.monotonic() - started), 0.0))

    # ---- refresh mode "hospital" --------------------------------------------------------------
    def refresh_request(self, wait_s: float = 0.0) -> tuple[str | None, bytes] | None:
        """The refresh request awaiting an answer, as the cloud sent it (its `X-Refresh-Index`
        header, unparsed, and bytes, SHA-256 checked), waiting up to `wait_s` s for one; None
        when there is none."""
        response = self._request("GET", self._job("/refresh"), params={"wait": wait_s},
                                 timeout=max(self.http.timeout.read or 0.0, wait_s + 30.0))
        if response.status_code == 204:
            return None
        data = response.content
        digest = response.headers.get(CONTENT_SHA_HEADER)
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ServiceError(MISMATCH_STATUS, "refresh request does not match its SHA-256")
        return response.headers.get(REFRESH_INDEX_HEADER), data

    def post_refresh_answer(self, answer: bytes) -> dict[str, Any]:
        return self._request("POST", self._job("/refresh"), content=answer, headers={
            "Content-Type": "application/octet-stream"}).json()

    def answer_refresh(self, refresher: Any, wait_s: float = REFRESH_WAIT_S) -> bool:
        """Answer the pending refresh request, if one comes within `wait_s` s, with
        `refresher.answer_cloud` (the hospital's ledger: planned, in order, once); whether
        one was answered. A request answered meanwhile (409) is not an error."""
        try:
            got = self.refresh_request(wait_s)
        except ServiceError as exc:
            if exc.status_code == MISMATCH_STATUS:  # republished between two reads
                return False
            raise
        if got is None:
            return False
        index_text, data = got
        answer = refresher.answer_cloud(data, index_text)
        try:
            self.post_refresh_answer(answer)
        except ServiceError as exc:
            if exc.status_code != 409:
                raise
        return True

    def answer_decisions(self, judge, poll_s: float = 0.5, timeout_s: float | None = None,
                         on_status: Callable[[dict], None] | None = None,
                         refresher: Any = None,
                         wait_s: float = REFRESH_WAIT_S) -> dict[str, Any]:
        """Answer every early-stopping question with `judge` (a `HospitalJudge`) until the end,
        and, with a `refresher`, every refresh request (`wait_for_decision`).

        The loss ciphertext is handed to the judge exactly as the cloud sent it (epoch header
        and bytes: `judge.answer_cloud` parses them in a limited subprocess and decrypts here,
        at the hospital); only the one-bit decision and the best epoch go back. Raises
        JobFailed unless the job finishes.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        mismatches = 0
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            current = self.wait_for_decision(poll_s, left, on_status, refresher, wait_s)
            if current["state"] == FINISHED:
                return current
            if current["state"] in TERMINAL:
                raise JobFailed(f"job {self.job_id} {current['state']}: {current.get('error')}")
            try:
                epoch_text, data = self.validation_loss_raw()
            except ServiceError as exc:
                if exc.status_code == 409:  # answered meanwhile (e.g. by a restarted worker)
                    continue
                if exc.status_code == MISMATCH_STATUS and mismatches < MAX_MISMATCHES:
                    # a restarted worker was republishing the loss between our two reads
                    mismatches += 1
                    time.sleep(poll_s)
                    continue
                raise
            mismatches = 0
            decision = judge.answer_cloud(epoch_text, data)
            try:
                self.decide(int(epoch_text or 0), decision.continue_training,
                            decision.best_epoch)
            except ServiceError as exc:
                if exc.status_code != 409:
                    raise

    # ---- results ------------------------------------------------------------------------------
    def result_manifest(self) -> dict[str, Any]:
        return self._request("GET", self._job("/result")).json()

    def fetch_result(self, dest: Path) -> dict[str, Any]:
        """Download the encrypted weights (best epoch) into `dest`, each file SHA-checked."""
        return self._download(self._job("/result"), self.result_manifest(), dest, "result")

    def _download(self, base: str, manifest: dict[str, Any], dest: Path,
                  label: str) -> dict[str, Any]:
        """Fetch every file of `manifest` from base/files/{name}, SHA-256 checked; the
        manifest is written last, so its presence means the directory is complete."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        total = sum(int(info.get("bytes", 0)) for info in manifest["files"].values())
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"download {label}", disable=not self.progress) as bar:
            for name, info in manifest["files"].items():
                if "/" in name or name.startswith("."):
                    raise ServiceError(502, f"{label} lists an unsafe file name {name!r}")
                data = self._request("GET", f"{base}/files/{name}").content
                if hashlib.sha256(data).hexdigest() != info["sha256"]:
                    raise ServiceError(502, f"downloaded {name} does not match its SHA-256")
                tmp = dest / f".{name}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, dest / name)
                bar.update(len(data))
        (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        return manifest

    # ---- encrypted inference -------------------------------------------------------------------
    def _query(self, query_id: str, suffix: str = "") -> str:
        return self._job(f"/queries/{query_id}{suffix}")

    def create_query(self) -> str:
        """A new, empty query set of this (finished) job; returns its id."""
        return self._request("POST", self._job("/queries")).json()["query_id"]

    def query_status(self, query_id: str) -> dict[str, Any]:
        return self._request("GET", self._query(query_id)).json()

    def upload_queries(self, directory: Path, query_id: str | None = None,
                       max_chunks: int | None = None) -> str:
        """Upload an encrypted query set (`EncryptedQueries.save` output); returns its id.

        Pass the `query_id` of an interrupted upload to resume it instead of starting anew.
        """
        query_id = query_id or self.create_query()
        self._upload_dir(self._query(query_id), directory, "queries", max_chunks)
        return query_id

    def score(self, query_id: str) -> dict[str, Any]:
        """Ask the cloud to score the uploaded queries with the job's encrypted weights."""
        return self._request("POST", self._query(query_id, "/score")).json()

    def wait_scores(self, query_id: str, poll_s: float = 0.5, timeout_s: float | None = None,
                    on_status: Callable[[dict], None] | None = None) -> dict[str, Any]:
        """Poll until scoring is done; raises JobFailed if it failed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with tqdm(desc="encrypted scoring", disable=not self.progress, unit="poll") as bar:
            while True:
                current = self.query_status(query_id)
                bar.set_postfix(state=current["state"])
                bar.update(1)
                if on_status:
                    on_status(current)
                if current["state"] == Q_DONE:
                    return current
                if current["state"] == Q_FAILED:
                    raise JobFailed(f"scoring of query set {query_id} failed: "
                                    f"{current.get('error')}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"query set {query_id} still {current['state']}")
                time.sleep(poll_s)

    def scores_manifest(self, query_id: str) -> dict[str, Any]:
        return self._request("GET", self._query(query_id, "/scores")).json()

    def fetch_scores(self, query_id: str, dest: Path) -> dict[str, Any]:
        """Download the encrypted scores into `dest` (read: `artifacts.load_scores`)."""
        return self._download(self._query(query_id, "/scores"), self.scores_manifest(query_id),
                              dest, "scores")

    def delete_query(self, query_id: str) -> dict[str, Any]:
        return self._request("DELETE", self._query(query_id)).json()


def load_result_weights(keys, plan, directory: Path):
    """Decrypt a downloaded result (hospital side) into a (rows, features) array; the format,
    parameter fingerprint, checksums and row count are checked (`EncryptedResult.load`)."""
    from medblindtuner.hospital.crypto import decrypt_weights
    from medblindtuner.training.artifacts import EncryptedResult

    result = EncryptedResult.load(Path(directory), keys.params, plan.rows)
    return decrypt_weights(keys, plan, result.weights)
