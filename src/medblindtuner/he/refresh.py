"""Refresh by the key holder: OpenFHE's interactive bootstrapping with one party.

The cloud's ciphertext `(c0, c1)` runs out of levels; instead of bootstrapping it alone (keys of
GBs, two thirds of a step), the cloud asks the key holder for a *masked share*:

    cloud        adjusted = IntMPBootAdjustScale(ct)     (compressed to a few towers)
                 request  = c1 of `adjusted` only         ----------------------------->
    key holder   a        = IntMPBootRandomElementGen(pk)  (the key holder draws it: a cloud
                 (h0, h1) = IntMPBootDecrypt(sk, c1, a)     that chose `a` could unmask m)
                 answer   = (a, h0, h1)                    <-----------------------------
    cloud        fresh    = IntMPBootEncrypt(pk, IntMPBootAdd([(h0, h1)]), a, adjusted)

`h0 = s c1 - M + e0` and `h1 = -s a + M + e1` with a fresh uniform mask `M` and OpenFHE's
flooding noise: `c0 + h0 = m - M + e` is uniformly masked, and `fresh` encrypts `m` at level 0.
The cloud never sees a decryption; the key holder never sees `c0` and never decodes, so its
answer (and any refusal) does not depend on the plaintext. Which refreshes the key holder
answers is decided above this layer (`hospital.refresher`). Requests and answers are bytes
(`to_bytes` / `from_bytes`), the same in-process and over the service.

Levels: the input must keep `params.refresh_headroom + 1` towers (`he.params`); fewer are
refused here, loudly, before OpenFHE could throw or return garbage.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.formats import atomic_write_bytes
from medblindtuner.he.ciphertexts import ciphertext_from_bytes, ciphertext_to_bytes
from medblindtuner.he.keys import BundleError
from medblindtuner.he.params import CkksParams

REQUEST_FORMAT = "medblindtuner-refresh-request/1"
ANSWER_FORMAT = "medblindtuner-refresh-answer/1"
# A request or answer larger than this is refused before parsing (an answer at ring 2^15,
# depth 12 is about 8 MB).
MAX_MESSAGE_BYTES = 64 << 20


class RefreshError(MedBlindTunerError, ValueError):
    """A refresh cannot be made: too few levels, a malformed request or answer."""


def _pack(header: dict, parts: list[bytes]) -> bytes:
    """One message: a length-prefixed JSON header (with each part's length) then the parts."""
    head = json.dumps({**header, "parts": [len(p) for p in parts]}).encode()
    return struct.pack(">I", len(head)) + head + b"".join(parts)


def _unpack(data: bytes, fmt: str, n_parts: int) -> tuple[dict, list[bytes]]:
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_MESSAGE_BYTES or len(data) < 4:
        raise RefreshError(f"a refresh message must be 4 to {MAX_MESSAGE_BYTES} bytes")
    (size,) = struct.unpack(">I", data[:4])
    try:
        header = json.loads(bytes(data[4 : 4 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RefreshError(f"refresh message header is not JSON: {exc}") from exc
    lengths = header.get("parts") if isinstance(header, dict) else None
    if (header.get("format") != fmt or not isinstance(lengths, list) or len(lengths) != n_parts
            or not all(isinstance(n, int) and n >= 0 for n in lengths)
            or 4 + size + sum(lengths) != len(data)):
        raise RefreshError(f"not a well-formed {fmt} message")
    parts, offset = [], 4 + size
    for n in lengths:
        parts.append(bytes(data[offset : offset + n]))
        offset += n
    return header, parts


def _index(header: dict) -> int:
    index = header.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise RefreshError(f"refresh index must be a non-negative integer, got {index!r}")
    return index


@dataclass(frozen=True)
class RefreshRequest:
    """What the cloud sends: the job's public tag (`TrainingPlan.job_tag`), the refresh's
    index in the job and `c1` of the adjusted ciphertext (never `c0`)."""

    index: int
    job: str
    c1: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.c1).hexdigest()

    def to_bytes(self) -> bytes:
        return _pack({"format": REQUEST_FORMAT, "index": self.index, "job": self.job},
                     [self.c1])

    @classmethod
    def from_bytes(cls, data: bytes) -> RefreshRequest:
        header, (c1,) = _unpack(data, REQUEST_FORMAT, 1)
        return cls(_index(header), str(header.get("job")), c1)


@dataclass(frozen=True)
class RefreshAnswer:
    """What the key holder returns: its random element `a` and masked share `(h0, h1)`."""

    index: int
    request_digest: str
    a: bytes
    h0: bytes
    h1: bytes

    def to_bytes(self) -> bytes:
        return _pack({"format": ANSWER_FORMAT, "index": self.index,
                      "request_digest": self.request_digest}, [self.a, self.h0, self.h1])

    @classmethod
    def from_bytes(cls, data: bytes) -> RefreshAnswer:
        header, (a, h0, h1) = _unpack(data, ANSWER_FORMAT, 3)
        return cls(_index(header), str(header.get("request_digest")), a, h0, h1)


def message_bound(params: CkksParams) -> int:
    """Largest request or answer these parameters can give: three ring elements (an answer's
    `a`, `h0`, `h1`; a request holds one) at the top level, 8 bytes per coefficient per tower
    and OpenFHE's headers, plus the framing. Checked before anything is parsed."""
    return min(3 * 2 * params.ring_dim * (params.depth + 2) * 8 + (1 << 20), MAX_MESSAGE_BYTES)


def max_refresh_level(params: CkksParams) -> int:
    """Highest effective level (pending rescale counted) a refreshable input may have."""
    return params.depth - params.refresh_headroom


# Towers an adjusted ciphertext keeps: 4 for inputs up to effective level depth - 4, 3 at
# depth - 3 (measured at depth 12); 2 towers decrypt to garbage (environment-measurements.md).
MIN_REQUEST_TOWERS = 3


def request_levels(context: ofhe.CryptoContext, public_key: ofhe.PublicKey,
                   params: CkksParams) -> range:
    """Levels a well-formed request's c1 can have: from where `IntMPBootAdjustScale` puts a
    fresh input (measured on an encryption of zeros, so it follows OpenFHE) to where it keeps
    MIN_REQUEST_TOWERS towers (under a joint key one more: `CkksParams.refresh_headroom`)."""
    zero = context.Encrypt(public_key, context.MakeCKKSPackedPlaintext([0.0] * params.slots))
    lowest = int(context.IntMPBootAdjustScale(zero).GetLevel())
    towers = max(MIN_REQUEST_TOWERS, params.refresh_headroom)
    return range(lowest, params.depth + 2 - towers)


def _ciphertext(data: bytes, what: str) -> ofhe.Ciphertext:
    try:
        return ciphertext_from_bytes(data)
    except BundleError as exc:
        raise RefreshError(f"{what} is not a ciphertext of this job's parameters") from exc


def masked_share(context: ofhe.CryptoContext, secret_key: ofhe.PrivateKey,
                 public_key: ofhe.PublicKey, request: RefreshRequest,
                 levels: range) -> RefreshAnswer:
    """Key holder: the masked share for one request (no decoding; the checks look at the
    request's shape only: one ring element at a level `request_levels` allows)."""
    c1 = _ciphertext(request.c1, "the refresh request")
    if c1.NumberCiphertextElements() != 1 or c1.GetLevel() not in levels:
        raise RefreshError(
            f"refresh request {request.index} holds {c1.NumberCiphertextElements()} element(s) "
            f"at level {c1.GetLevel()}; a request is c1 alone at level {levels.start} to "
            f"{levels.stop - 1}: refused")
    a = context.IntMPBootRandomElementGen(public_key)
    h0, h1 = context.IntMPBootDecrypt(secret_key, c1, a)
    return RefreshAnswer(request.index, request.digest, ciphertext_to_bytes(a),
                         ciphertext_to_bytes(h0), ciphertext_to_bytes(h1))


KeyHolder = Callable[[bytes], bytes]
"""How the cloud reaches the key holder: request bytes in, answer bytes out (in-process, or
over the service: `service.worker`)."""


class CloudRefresher:
    """Cloud side: prepare a request, ask the key holder, finish to a fresh ciphertext.

    With `journal` (a folder beside the trainer's checkpoints) each adjusted ciphertext is
    kept before it is asked for and each answer once it came: a re-run (after a crash) that
    reaches a journaled index finishes the journaled request instead of asking a new one, so
    the key holder sees the same request again and answers it the same.
    """

    def __init__(self, context: ofhe.CryptoContext, params: CkksParams,
                 public_key: ofhe.PublicKey, key_holder: KeyHolder, job: str,
                 journal: Path | None = None) -> None:
        self.job = job
        self.context = context
        self.params = params
        self.public_key = public_key
        self.key_holder = key_holder
        self.journal = Path(journal) if journal is not None else None
        if self.journal is not None:
            self.journal.mkdir(parents=True, exist_ok=True)

    def prepare(self, ct: ofhe.Ciphertext, index: int) -> tuple[ofhe.Ciphertext, RefreshRequest]:
        """The adjusted ciphertext (kept by the cloud) and the request (sent)."""
        effective = ct.GetLevel() + ct.GetNoiseScaleDeg() - 1
        if effective > max_refresh_level(self.params):
            raise RefreshError(
                f"refresh {index}: the ciphertext is at effective level {effective}; a refresh "
                f"needs at most {max_refresh_level(self.params)} (depth {self.params.depth} "
                f"less {self.params.refresh_headroom} levels of headroom): refused")
        adjusted = self.context.IntMPBootAdjustScale(ct)
        c1 = adjusted.Clone()
        c1.RemoveElement(0)
        return adjusted, RefreshRequest(index, self.job, ciphertext_to_bytes(c1))

    def finish(self, adjusted: ofhe.Ciphertext, request: RefreshRequest,
               answer: RefreshAnswer) -> ofhe.Ciphertext:
        """Fresh ciphertext (level 0) from the adjusted one and the key holder's share."""
        if answer.index != request.index or answer.request_digest != request.digest:
            raise RefreshError(f"the answer to refresh {answer.index} does not belong to "
                               f"request {request.index}")
        a = _ciphertext(answer.a, "the answer's random element")
        shares = [_ciphertext(answer.h0, "the answer's share"),
                  _ciphertext(answer.h1, "the answer's share")]
        total = self.context.IntMPBootAdd([shares])
        return self.context.IntMPBootEncrypt(self.public_key, total, a, adjusted)

    def refresh(self, ct: ofhe.Ciphertext, index: int) -> ofhe.Ciphertext:
        """One refresh through the key holder (journaled when a journal is given)."""
        journaled = self._journaled(index)
        if journaled is not None:
            adjusted, request, answer = journaled
        else:
            adjusted, request = self.prepare(ct, index)
            answer = None
            self._write(index, "request", request.to_bytes())
            self._write(index, "adjusted", ciphertext_to_bytes(adjusted))
        if answer is None:
            answer = RefreshAnswer.from_bytes(self.key_holder(request.to_bytes()))
            self._write(index, "answer", answer.to_bytes())
        return self.finish(adjusted, request, answer)

    # ---- journal ----------------------------------------------------------------------------
    def _path(self, index: int, kind: str) -> Path:
        assert self.journal is not None
        return self.journal / f"{index:07d}.{kind}.bin"

    def _write(self, index: int, kind: str, data: bytes) -> None:
        if self.journal is not None:
            atomic_write_bytes(self._path(index, kind), data)

    def _journaled(self, index: int):
        if self.journal is None or not self._path(index, "adjusted").exists():
            return None
        adjusted = _ciphertext(self._path(index, "adjusted").read_bytes(), "journal entry")
        request = RefreshRequest.from_bytes(self._path(index, "request").read_bytes())
        answer_path = self._path(index, "answer")
        if not answer_path.exists():
            return adjusted, request, None
        return adjusted, request, RefreshAnswer.from_bytes(answer_path.read_bytes())

    def forget_before(self, index: int) -> None:
        """Drop journal entries of refreshes before `index` (a checkpoint covers them)."""
        if self.journal is None:
            return
        for path in self.journal.glob("*.bin"):
            if int(path.name.split(".")[0]) < index:
                path.unlink(missing_ok=True)
