"""Refresh by n key-share holders: OpenFHE's interactive bootstrapping (IntMPBoot*) with n
parties, the common random element `a` drawn by commit-reveal over the parties.

The cloud's ciphertext `(c0, c1)` runs out of levels (as in `he.refresh`, one key holder);
under a joint key (`he.threshold`, secret s = s_0 + ... + s_{n-1}) every party contributes:

    cloud      adjusted = IntMPBootAdjustScale(ct); request = c1 of it (never c0)
    1 commit   party i: a_i = IntMPBootRandomElementGen(pk), kept; answers H(job, k, i, c1, a_i)
    2 reveal   party i, once it holds all n commitments: answers a_i
    3 share    party i, once all n reveals match their commitments:
                 a = a_0 + ... + a_{n-1};  (h0_i, h1_i) = IntMPBootDecrypt(s_i, c1, a)
    cloud      fresh = IntMPBootEncrypt(pk, IntMPBootAdd([(h0_i, h1_i) for all i]), a, adjusted)

Why commit-reveal. The sum of the h1 shares is `-s a + M + e`: whoever chose `a` (say a = 0)
learns the mask M and, with the cloud's `c0 + sum h0 = m - M + e`, the plaintext. So `a` must
be uniform and chosen by nobody: it is the sum of every party's own draw, each committed
before any is revealed, so one honest party's uniform a_i makes `a` uniform and no party (nor
the cloud, which only relays) can steer it. A party that sees others' reveals first can only
refuse to go on (its commitment binds it); a cloud that shows different commitments to
different parties is caught at step 3 (each party checks the reveals against the commitments
it recorded). With fewer than n shares the sum is not `s c1 - M` and the result decrypts to
garbage: every party is needed for every refresh (`tests/test_joint_refresh.py`).

Messages are bytes (`JointMessage`), the same in-process and over a relay. Which refreshes a
party answers is decided above this layer (`consortium.refresher`); this module checks shapes,
commitments and completeness only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.ciphertexts import ciphertext_to_bytes
from medblindtuner.he.params import CkksParams
from medblindtuner.he.refresh import (
    CloudRefresher,
    RefreshError,
    RefreshRequest,
    _ciphertext,
    _index,
    _pack,
    _unpack,
)

JOINT_FORMAT = "medblindtuner-joint-refresh/1"
PHASES = ("commit", "reveal", "share")
CLOUD = -1  # the sender number of the cloud's requests
MAX_PARTS = 1 + 2 * 256  # c1 and the answers of up to 256 parties
ANSWERS_FORMAT = "medblindtuner-joint-refresh-answers/1"


@dataclass(frozen=True)
class JointMessage:
    """One message of one refresh: the cloud's request for a phase (party CLOUD; parts: c1,
    then the n commitments or reveals the phase needs) or a party's answer (its commitment,
    its a_i, or its (h0_i, h1_i))."""

    phase: str
    index: int
    job: str
    party: int
    request_digest: str
    parts: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        return _pack({"format": JOINT_FORMAT, "phase": self.phase, "index": self.index,
                      "job": self.job, "party": self.party,
                      "request_digest": self.request_digest, "n": len(self.parts)},
                     list(self.parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> JointMessage:
        header, parts = _unpack(data, JOINT_FORMAT, _part_count(data))
        phase, party = header.get("phase"), header.get("party")
        if phase not in PHASES or not isinstance(party, int) or isinstance(party, bool):
            raise RefreshError(f"joint refresh message: unknown phase {phase!r} or party "
                               f"{party!r}")
        return cls(phase, _index(header), str(header.get("job")), party,
                   str(header.get("request_digest")), tuple(parts))

    @property
    def c1(self) -> bytes:
        """The request's c1 (a cloud request's first part), checked against its digest."""
        if self.party != CLOUD or not self.parts:
            raise RefreshError("only a cloud request carries c1")
        if hashlib.sha256(self.parts[0]).hexdigest() != self.request_digest:
            raise RefreshError(f"refresh {self.index}: c1 does not match the request digest")
        return self.parts[0]


def _part_count(data: bytes) -> int:
    """How many parts a message says it has (`_unpack` then checks every length)."""
    try:
        size = int.from_bytes(bytes(data[:4]), "big")
        count = json.loads(bytes(data[4 : 4 + size])).get("n")
    except (TypeError, ValueError, AttributeError) as exc:
        raise RefreshError(f"not a joint refresh message: {exc}") from exc
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_PARTS:
        raise RefreshError("not a joint refresh message: bad part count")
    return count


def commitment(job: str, index: int, party: int, request_digest: str, a: bytes) -> bytes:
    """A party's commitment to its random element for one refresh (binding: SHA-256; hiding:
    a_i is a uniform ring element, thousands of bits of entropy)."""
    head = f"{JOINT_FORMAT}|{job}|{index}|{party}|{request_digest}|".encode()
    return hashlib.sha256(head + a).hexdigest().encode()


def by_party(messages: Sequence[bytes | JointMessage], phase: str, index: int, job: str,
             request_digest: str, n_parties: int) -> list[JointMessage]:
    """The answers of one phase, one from each party 0..n-1 in order; anything else (a
    missing or doubled party, another refresh, job or request) is refused."""
    parsed = [m if isinstance(m, JointMessage) else JointMessage.from_bytes(m)
              for m in messages]
    for m in parsed:
        if (m.phase, m.index, m.job, m.request_digest) != (phase, index, job, request_digest):
            raise RefreshError(f"a {m.phase!r} answer of refresh {m.index} (job {m.job!r}) was "
                               f"handed in for the {phase!r} phase of refresh {index}: refused")
    parties = sorted(m.party for m in parsed)
    if parties != list(range(n_parties)):
        raise RefreshError(f"refresh {index}, phase {phase!r}: needs one answer from each of "
                           f"the {n_parties} parties, got parties {parties}: cannot finish")
    return sorted(parsed, key=lambda m: m.party)


def check_reveals(reveals: Sequence[JointMessage], commits: Sequence[JointMessage]) -> None:
    """Every revealed a_i matches the commitment recorded for its party."""
    for reveal, commit in zip(reveals, commits, strict=True):
        if len(reveal.parts) != 1 or commitment(reveal.job, reveal.index, reveal.party,
                                                reveal.request_digest,
                                                reveal.parts[0]) != commit.parts[0]:
            raise RefreshError(f"refresh {reveal.index}: party {reveal.party}'s random element "
                               "does not match its commitment: refused")


def common_element(context: ofhe.CryptoContext, reveals: Sequence[JointMessage],
                   known: Mapping[int, ofhe.Ciphertext] | None = None) -> ofhe.Ciphertext:
    """a = sum of the revealed a_i (`IntMPBootAdd` sums ring elements pairwise). `known`:
    elements already parsed, by party (a party's own a_i: its reveal was checked against its
    commitment, so it is the same element), used instead of parsing the reveal again."""
    known = known or {}
    elements = [known[r.party] if r.party in known else
                _ciphertext(r.parts[0], f"party {r.party}'s random element") for r in reveals]
    for element in elements:
        if element.NumberCiphertextElements() != 1:
            raise RefreshError("a random element is one ring element")
    return context.IntMPBootAdd([[e, e] for e in elements])[0]


class RefreshPaused(RefreshError):
    """A member did not answer (unreachable) or refused: the refresh, and training, wait; a
    re-run with the same journal finishes the same refresh."""


JointKeyHolder = Callable[[bytes], bytes]
"""How the cloud reaches one party: a `JointMessage`'s bytes in, the party's answer out."""


class JointCloudRefresher(CloudRefresher):
    """Cloud side with n parties: the three phases through every party, then the fresh
    ciphertext. Journaled like `CloudRefresher` (request and adjusted ciphertext before
    asking; the n reveals and shares once they came), so a re-run finishes the same refresh.

    `seconds[i]`: time spent waiting on party i (all three phases), summed over refreshes."""

    def __init__(self, context: ofhe.CryptoContext, params: CkksParams,
                 public_key: ofhe.PublicKey, parties: Sequence[JointKeyHolder], job: str,
                 journal: Path | None = None) -> None:
        super().__init__(context, params, public_key, key_holder=self._ask_all, job=job,
                         journal=journal)
        if len(parties) < 2:
            raise RefreshError("a joint refresh needs n >= 2 parties")
        self.parties = list(parties)
        self.seconds = [0.0] * len(parties)
        self.round_trips: list[list[float]] = []

    def _ask(self, phase: str, request: RefreshRequest,
             extra: Sequence[bytes]) -> list[JointMessage]:
        message = JointMessage(phase, request.index, self.job, CLOUD, request.digest,
                               (request.c1, *extra)).to_bytes()
        answers = []
        for i, party in enumerate(self.parties):
            start = time.perf_counter()
            try:
                answers.append(party(message))
            except (OSError, MedBlindTunerError) as exc:  # ConnectionError is an OSError
                raise RefreshPaused(
                    f"refresh {request.index} paused in phase {phase!r}: member {i} "
                    f"{'refused' if isinstance(exc, MedBlindTunerError) else 'did not answer'}"
                    f" ({exc}); every member is needed, a re-run resumes this refresh") from exc
            self.seconds[i] += time.perf_counter() - start
            self.round_trips[-1][i] += time.perf_counter() - start
        return by_party(answers, phase, request.index, self.job, request.digest,
                        len(self.parties))

    def _ask_all(self, request_bytes: bytes) -> bytes:
        """The three phases for one request; returns the n reveals and n shares packed."""
        request = RefreshRequest.from_bytes(request_bytes)
        self.round_trips.append([0.0] * len(self.parties))
        commits = self._ask("commit", request, [])
        reveals = self._ask("reveal", request, [m.to_bytes() for m in commits])
        check_reveals(reveals, commits)
        shares = self._ask("share", request, [m.to_bytes() for m in reveals])
        return _pack({"format": ANSWERS_FORMAT,
                      "index": request.index, "request_digest": request.digest},
                     [m.to_bytes() for m in reveals + shares])

    def refresh(self, ct: ofhe.Ciphertext, index: int) -> ofhe.Ciphertext:
        journaled = self._journaled_joint(index)
        if journaled is None:
            adjusted, request = self.prepare(ct, index)
            self._write(index, "request", request.to_bytes())
            self._write(index, "adjusted", ciphertext_to_bytes(adjusted))
            answers = None
        else:
            adjusted, request, answers = journaled
        if answers is None:
            answers = self._ask_all(request.to_bytes())
            # journaled while the answers are parsed and joined (a thread: file I/O only),
            # done before the fresh ciphertext is handed back
            with ThreadPoolExecutor(max_workers=1) as io:
                written = io.submit(self._write, index, "answer", answers)
                fresh = self.finish_joint(adjusted, request, answers)
                written.result()
            return fresh
        return self.finish_joint(adjusted, request, answers)

    def finish_joint(self, adjusted: ofhe.Ciphertext, request: RefreshRequest,
                     answers: bytes) -> ofhe.Ciphertext:
        """Fresh ciphertext (level 0) from the adjusted one and all n parties' answers."""
        n = len(self.parties)
        _header, parts = _unpack(answers, ANSWERS_FORMAT, 2 * n)
        reveals = by_party(parts[:n], "reveal", request.index, self.job, request.digest, n)
        shares = by_party(parts[n:], "share", request.index, self.job, request.digest, n)
        a = common_element(self.context, reveals)
        pairs = []
        for share in shares:
            if len(share.parts) != 2:
                raise RefreshError(f"party {share.party}'s share is not (h0, h1)")
            pairs.append([_ciphertext(p, f"party {share.party}'s share") for p in share.parts])
        total = self.context.IntMPBootAdd(pairs)
        return self.context.IntMPBootEncrypt(self.public_key, total, a, adjusted)

    def _journaled_joint(self, index: int):
        if self.journal is None or not self._path(index, "adjusted").exists():
            return None
        adjusted = _ciphertext(self._path(index, "adjusted").read_bytes(), "journal entry")
        request = RefreshRequest.from_bytes(self._path(index, "request").read_bytes())
        answer = self._path(index, "answer")
        return adjusted, request, (answer.read_bytes() if answer.exists() else None)
