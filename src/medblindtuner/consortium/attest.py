"""End-to-end integrity of the key rounds over an untrusted relay.

Round messages travel in the clear (they are public key material), so a relay that is also
the cloud could alter or equivocate on them, and that would break n-of-n:

* the public-key chain: shown a public key of the cloud's instead of hospital i-1's, hospital
  i chains on it, and the "joint" key no longer needs the others' shares (or, substituting the
  last one, is the cloud's own key: the hospitals would encrypt their rows for the cloud);
* a lead share (relin-1 or automorphisms of party 0) of the cloud's choosing makes hospital
  i's answer an RLWE sample of its share `s_i` for a public part the cloud picked (a constant
  part: `s_i` plus noise).

So every hospital seals to every other hospital, with its roster key (`sealing.seal_share`:
authenticated, bound to job, request, sender and recipient), a digest of each message it posts
and of the messages it built it on; a hospital uses another's message only if it matches the
author's attestation, and checks that everyone built on the same messages (the chain links,
the same lead share). The roster itself must be compared out of band (`Roster.fingerprint`):
a relay that substitutes a roster key can forge that hospital's attestations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from nacl.public import PrivateKey

from .client import WAIT_TIMEOUT_S, ConsortiumClient, round_of
from .sealing import Roster, SealError, open_share, seal_share

ATTESTATION = "attest-"  # request id prefix of a round's attestations: attest-<round>


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class AttestedRounds:
    """One hospital's key rounds over the relay: posts with attestations, fetches only
    attested messages. `fetch` returns (message, the digests of what its author built it
    on)."""

    client: ConsortiumClient
    sealing_key: PrivateKey
    roster: Roster
    timeout_s: float = WAIT_TIMEOUT_S
    own: dict[str, tuple[bytes, list[str]]] = field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.client.index

    def post(self, message: bytes, inputs: Sequence[bytes] = ()) -> None:
        """Post this hospital's round message, then its attestation to every other one."""
        round_name = round_of(message)
        self.own[round_name] = (message, [digest(i) for i in inputs])
        self.client.post_round(message)
        body = json.dumps({"round": round_name, "output": digest(message),
                           "inputs": self.own[round_name][1]}).encode()
        for other in range(len(self.roster.public_keys)):
            if other != self.index:
                self.client.post_sealed(seal_share(self.sealing_key, self.roster, self.index,
                                                   other, ATTESTATION + round_name, body))

    def fetch(self, round_name: str, party: int) -> tuple[bytes, list[str]]:
        """Party `party`'s message of `round_name`, refused unless its author attested it."""
        if party == self.index and round_name in self.own:
            return self.own[round_name]
        message = self.client.round_message(round_name, party, self.timeout_s)
        request = ATTESTATION + round_name
        envelope = self.client.sealed_envelope(request, party, self.timeout_s)
        sender, body = open_share(self.sealing_key, self.roster, self.index, request, envelope)
        claim = json.loads(body)
        if sender != party or claim.get("round") != round_name or claim.get(
                "output") != digest(message):
            raise SealError(f"hospital {self.index}: hospital {party}'s {round_name!r} message "
                            "is not the one it attested (altered or substituted by the "
                            "relay): refused")
        return message, [str(d) for d in claim.get("inputs", [])]

    def fetch_all(self, round_name: str) -> list[tuple[bytes, list[str]]]:
        return [self.fetch(round_name, party) for party in range(len(self.roster.public_keys))]


def check_chain(chain: Sequence[tuple[bytes, list[str]]]) -> None:
    """The public-key chain is one chain: party 0 built on nothing, party j on party j-1's
    message (as attested by both), so every hospital's share is in the joint key."""
    for j, (_message, inputs) in enumerate(chain):
        expected = [] if j == 0 else [digest(chain[j - 1][0])]
        if inputs != expected:
            raise SealError(f"the public-key chain is broken at hospital {j}: it built on "
                            f"another key than hospital {j - 1}'s message (the relay showed "
                            "hospitals different keys): refused")


def check_same_lead(shares: Sequence[tuple[bytes, list[str]]], round_name: str) -> None:
    """Every party j > 0 built its share of `round_name` on party 0's (attested) share."""
    lead = digest(shares[0][0])
    for j, (_message, inputs) in enumerate(shares[1:], start=1):
        if inputs != [lead]:
            raise SealError(f"hospital {j} built its {round_name!r} share on another lead "
                            "share than hospital 0's (the relay showed hospitals different "
                            "shares): refused")
