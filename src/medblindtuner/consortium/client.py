"""One hospital's HTTP client of the service's consortium relay (`service/consortia.py`).

    created = ConsortiumClient.create(url, n_hospitals=3)      # whoever forms the consortium
    client = ConsortiumClient(url, created["consortium_id"], created["tokens"][i])
    client.post_round(message)                       # a RoundMessage of this hospital
    messages = client.round_messages("relin-1")      # every hospital's, waiting for all
    client.post_sealed(envelope)                     # to the hospital named in its routing
    envelopes = client.sealed_envelopes(request_id)  # the n-1 addressed to this hospital

Waits are long polls (`?wait=`) repeated until `timeout_s`; a wait that runs out raises a
`ServiceError` whose message says which hospitals are still missing. Every download is
checked against the SHA-256 the service sends with it. The token decides the index: the
service answers which one (`index`).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx

from medblindtuner.hospital.client import (
    BACKOFF_S,
    MAX_BACKOFF_S,
    MISMATCH_STATUS,
    RETRIES,
    RETRY_STATUS,
    ServiceError,
)
from medblindtuner.protocol import (
    CLOUD_PARTY,
    CONSORTIUM_WAIT_S,
    CONTENT_SHA_HEADER,
    bearer,
)

from .sealing import read_routing

WAIT_TIMEOUT_S = 600.0  # the longest a hospital waits for the others by default


def round_of(message: bytes) -> str:
    """The round named in a `RoundMessage`'s header (where it is posted)."""
    try:
        size = int.from_bytes(message[:4], "big")
        return str(json.loads(message[4 : 4 + size])["round"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a round message: {exc}") from exc


class ConsortiumClient:
    """One hospital's (one token's) view of one consortium on the service."""

    def __init__(self, base_url: str, consortium_id: str, token: str, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.consortium_id = consortium_id
        self.token = token
        # a long poll waits up to CONSORTIUM_WAIT_S before it answers
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout + CONSORTIUM_WAIT_S,
                                 transport=transport)
        self._status: dict[str, Any] | None = None

    @staticmethod
    def create(base_url: str, n_hospitals: int,
               transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
        """A new consortium: {consortium_id, n_hospitals, tokens (tokens[i] = hospital i's,
        shown once), max_message_bytes}."""
        with httpx.Client(base_url=base_url.rstrip("/"), timeout=60,
                          transport=transport) as http:
            response = _send(http, "POST", "/consortia", json={"hospitals": n_hospitals})
        return _checked(response).json()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ConsortiumClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ---- plumbing -------------------------------------------------------------------------
    def _request(self, method: str, suffix: str, **kwargs) -> httpx.Response:
        path = f"/consortia/{self.consortium_id}{suffix}"
        return _checked(_send(self.http, method, path, headers=bearer(self.token), **kwargs))

    def _download(self, suffix: str, wait_s: float) -> bytes:
        response = self._request("GET", suffix, params={"wait": wait_s})
        data = response.content
        if hashlib.sha256(data).hexdigest() != response.headers.get(CONTENT_SHA_HEADER):
            raise ServiceError(MISMATCH_STATUS, f"{suffix}: the bytes do not match their "
                                                "SHA-256")
        return data

    def _until(self, suffix: str, timeout_s: float) -> bytes:
        """Long polls of one message until it is posted or `timeout_s` passed (then the
        service's 404: who is missing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                return self._download(suffix, min(left, CONSORTIUM_WAIT_S))
            except ServiceError as exc:
                if exc.status_code != 404 or time.monotonic() >= deadline:
                    raise

    def _listing(self, suffix: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.0, deadline - time.monotonic())
            listing = self._request("GET", suffix,
                                    params={"wait": min(left, CONSORTIUM_WAIT_S)}).json()
            if listing.get("complete") or time.monotonic() >= deadline:
                return listing

    # ---- the consortium ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self._status = self._request("GET", "").json()
        return self._status

    @property
    def index(self) -> int:
        """This hospital's index (the service's answer for this token)."""
        return int((self._status or self.status())["you"])

    @property
    def n_hospitals(self) -> int:
        return int((self._status or self.status())["n_hospitals"])

    def delete(self) -> dict[str, Any]:
        return self._request("DELETE", "").json()

    def start_training(self, plan: dict[str, Any], n_train: int, n_val: int,
                       insecure: bool = False) -> dict[str, Any]:
        """The coordinator's (hospital 0's) start of the service's training, once every
        hospital's rows are in; the training job's state (`status()["job"]` later)."""
        body = {"plan": plan, "n_train": n_train, "n_val": n_val,
                "insecure_test_params": insecure}
        return self._request("POST", "/start", json=body).json()["job"]

    # ---- rounds (broadcast) -----------------------------------------------------------------
    def post_round(self, message: bytes) -> dict[str, Any]:
        """Post this hospital's `RoundMessage` (the same bytes again: a harmless retry)."""
        return self._request("PUT", f"/rounds/{round_of(message)}", content=message).json()

    def round_listing(self, round_name: str, wait_s: float = 0.0) -> dict[str, Any]:
        return self._listing(f"/rounds/{round_name}", wait_s)

    def round_message(self, round_name: str, party: int,
                      timeout_s: float = WAIT_TIMEOUT_S) -> bytes:
        """Party `party`'s message of a round (CLOUD_PARTY: the cloud's), waiting for it."""
        return self._until(f"/rounds/{round_name}/parties/{party}", timeout_s)

    def cloud_message(self, round_name: str, timeout_s: float = WAIT_TIMEOUT_S) -> bytes:
        return self.round_message(round_name, CLOUD_PARTY, timeout_s)

    def round_messages(self, round_name: str,
                       timeout_s: float = WAIT_TIMEOUT_S) -> list[bytes]:
        """Every hospital's message of a round, by index, once all n are in; else a
        `ServiceError` (408) naming who is missing."""
        listing = self._listing(f"/rounds/{round_name}", timeout_s)
        if not listing["complete"]:
            raise ServiceError(408, f"round {round_name!r}: {listing['detail']}")
        return [self.round_message(round_name, i, timeout_s) for i in range(self.n_hospitals)]

    # ---- sealed envelopes (to one hospital) -------------------------------------------------
    def post_sealed(self, envelope: bytes) -> dict[str, Any]:
        """Post an envelope (`sealing.seal_share`) to the hospital its routing names."""
        routing = read_routing(envelope)
        return self._request("PUT", f"/sealed/{routing['request']}/to/{routing['recipient']}",
                             content=envelope).json()

    def sealed_listing(self, request_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """Who sent this hospital an envelope of `request_id`, who has not."""
        return self._listing(f"/sealed/{request_id}", wait_s)

    def sealed_envelope(self, request_id: str, sender: int,
                        timeout_s: float = WAIT_TIMEOUT_S) -> bytes:
        """Hospital `sender`'s envelope of `request_id` to this hospital, waiting for it."""
        return self._until(f"/sealed/{request_id}/from/{sender}", timeout_s)

    def sealed_envelopes(self, request_id: str,
                         timeout_s: float = WAIT_TIMEOUT_S) -> list[bytes]:
        """The n-1 envelopes of `request_id` addressed to this hospital, once all are in."""
        listing = self._listing(f"/sealed/{request_id}", timeout_s)
        if not listing["complete"]:
            raise ServiceError(408, f"request {request_id!r}: {listing['detail']}")
        return [self.sealed_envelope(request_id, sender, timeout_s)
                for sender in sorted(int(s) for s in listing["posted"])]


def _send(http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    """One request, retried on connection errors and 429/503 with bounded backoff (every
    request of the relay may be repeated: a slot takes the same bytes again)."""
    for attempt in range(RETRIES + 1):
        delay = min(BACKOFF_S * 2 ** attempt, MAX_BACKOFF_S)
        try:
            response = http.request(method, path, **kwargs)
        except httpx.TransportError:
            if attempt == RETRIES:
                raise
        else:
            if response.status_code not in RETRY_STATUS or attempt == RETRIES:
                return response
            after = response.headers.get("Retry-After", "")
            if after.isdigit():
                delay = min(float(after), MAX_BACKOFF_S)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except (json.JSONDecodeError, AttributeError):
            detail = response.text
        raise ServiceError(response.status_code, str(detail))
    return response
