"""Decryption shares travel sealed from one hospital to another (PyNaCl `Box`).

A share is sealed once per recipient with `Box(sender's secret, recipient's public key)`:
Curve25519 key agreement and XSalsa20-Poly1305 authenticated encryption, so only the recipient
can open it and the recipient knows which hospital made it. The relay (the cloud) routes
envelopes by their clear routing header and can read nothing else; the header is repeated
inside the box, so a relay that re-addresses or replays an envelope into another job or
request is caught when it is opened.

The roster (each hospital's sealing public key) is agreed when the consortium is formed, e.g.
by comparing fingerprints out of band: the relay must not be able to substitute a key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.protocol import SEALED_FORMAT


class SealError(MedBlindTunerError, ValueError):
    """A sealed share cannot be opened by this hospital, or is of another job or request."""


@dataclass(frozen=True)
class Roster:
    """The consortium's sealing public keys, by hospital index (public)."""

    job_id: str
    public_keys: tuple[bytes, ...]

    def key_of(self, hospital: int) -> PublicKey:
        if not 0 <= hospital < len(self.public_keys):
            raise SealError(f"hospital {hospital} is not in the roster of job {self.job_id!r}")
        return PublicKey(self.public_keys[hospital])

    def fingerprint(self, hospital: int) -> str:
        """What hospitals compare out of band before trusting the roster."""
        return hashlib.sha256(self.public_keys[hospital]).hexdigest()[:16]


def new_sealing_key() -> PrivateKey:
    """A hospital's sealing key pair (kept next to its secret share; the public half goes
    into the roster)."""
    return PrivateKey.generate()


def _routing(job_id: str, request_id: str, sender: int, recipient: int) -> dict:
    return {"format": SEALED_FORMAT, "job_id": job_id, "request": request_id,
            "sender": sender, "recipient": recipient}


def seal_share(key: PrivateKey, roster: Roster, sender: int, recipient: int,
               request_id: str, share: bytes) -> bytes:
    """One envelope: clear routing header + the share boxed for `recipient`."""
    routing = _routing(roster.job_id, request_id, sender, recipient)
    header = json.dumps(routing, sort_keys=True).encode()
    inner = len(header).to_bytes(4, "big") + header + share
    boxed = Box(key, roster.key_of(recipient)).encrypt(inner)
    return len(header).to_bytes(4, "big") + header + bytes(boxed)


def read_routing(envelope: bytes) -> dict:
    """The clear routing header (all the relay may read)."""
    try:
        size = int.from_bytes(envelope[:4], "big")
        routing = json.loads(envelope[4 : 4 + size])
    except (ValueError, TypeError) as exc:
        raise SealError(f"not a sealed share: {exc}") from exc
    if not isinstance(routing, dict) or routing.get("format") != SEALED_FORMAT:
        raise SealError("not a sealed share")
    return routing


def open_share(key: PrivateKey, roster: Roster, recipient: int, request_id: str,
               envelope: bytes) -> tuple[int, bytes]:
    """(sender, share) of an envelope sealed for `recipient` in this job and request; refused
    if it is another's, altered, re-addressed, or from another job or request."""
    routing = read_routing(envelope)
    sender = routing.get("sender")
    if not isinstance(sender, int) or routing.get("recipient") != recipient:
        raise SealError(f"a share addressed to hospital {routing.get('recipient')} was handed "
                        f"to hospital {recipient}: refused")
    size = int.from_bytes(envelope[:4], "big")
    try:
        inner = Box(key, roster.key_of(sender)).decrypt(envelope[4 + size :])
    except CryptoError as exc:
        raise SealError(f"hospital {recipient} cannot open a share said to come from hospital "
                        f"{sender} (altered, or not sealed for this hospital)") from exc
    inner_size = int.from_bytes(inner[:4], "big")
    sealed_routing = json.loads(inner[4 : 4 + inner_size])
    expected = _routing(roster.job_id, request_id, sender, recipient)
    if sealed_routing != expected:
        raise SealError(f"a share of job {sealed_routing.get('job_id')!r}, request "
                        f"{sealed_routing.get('request')!r} was handed in for job "
                        f"{roster.job_id!r}, request {request_id!r} (a replay?): refused")
    return sender, bytes(inner[4 + inner_size :])


class Mailbox(Protocol):
    """Where a hospital's envelopes go and those addressed to it come from: `SealedMailbox`
    in one process, `remote.RemoteMailbox` over the service."""

    def post(self, envelope: bytes) -> None: ...

    def fetch(self, job_id: str, request_id: str, recipient: int) -> list[bytes]: ...


@dataclass
class SealedMailbox:
    """The relay's store of envelopes: routes by the clear header, holds nothing else.

    An envelope posted twice for the same (job, request, sender, recipient) is refused unless
    it is the same bytes (a retry)."""

    envelopes: dict[tuple[str, str, int, int], bytes] = field(default_factory=dict)

    def post(self, envelope: bytes) -> None:
        r = read_routing(envelope)
        slot = (r["job_id"], r["request"], int(r["sender"]), int(r["recipient"]))
        if slot in self.envelopes and self.envelopes[slot] != envelope:
            raise SealError(f"hospital {slot[2]} already sent its share of request {slot[1]!r} "
                            f"to hospital {slot[3]}: a second, different one is refused")
        self.envelopes[slot] = envelope

    def fetch(self, job_id: str, request_id: str, recipient: int) -> list[bytes]:
        return [e for (job, request, _sender, to), e in sorted(self.envelopes.items())
                if job == job_id and request == request_id and to == recipient]

    def senders(self, job_id: str, request_id: str, recipient: int) -> Sequence[int]:
        return sorted(s for (job, request, s, to) in self.envelopes
                      if job == job_id and request == request_id and to == recipient)
