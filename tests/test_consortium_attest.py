"""The key rounds over a relay that alters messages (`consortium.attest`): in memory, each
hospital a thread, insecure test ring. An honest relay gives every hospital one joint key; a
relay that substitutes hospital 0's public key or lead relinearisation share for hospital 1
is caught by hospital 1 before its secret share touches the forged bytes.
"""

from __future__ import annotations

import json
import threading

import openfhe as ofhe
import pytest
from helpers_consortium import PARAMS

from medblindtuner.consortium.attest import check_chain
from medblindtuner.consortium.ceremony import key_schedule
from medblindtuner.consortium.client import round_of
from medblindtuner.consortium.remote import answer_key_rounds
from medblindtuner.consortium.sealing import Roster, SealError, new_sealing_key, read_routing
from medblindtuner.he.threshold import RoundMessage, ThresholdParty, joint_context

N = 2
JOB = "attested-job"
WAIT_S = 3.0


class Relay:
    """An in-memory relay: slots of round messages and envelopes, waited on."""

    def __init__(self) -> None:
        self.tables: dict[str, dict] = {"rounds": {}, "sealed": {}}
        self.changed = threading.Condition()

    def put(self, table: str, key: tuple, value: bytes) -> None:
        with self.changed:
            self.tables[table].setdefault(key, value)
            self.changed.notify_all()

    def get(self, table: str, key: tuple) -> bytes:
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.tables[table], WAIT_S):
                raise TimeoutError(f"{table} {key} never came")
            return self.tables[table][key]


class Client:
    """`ConsortiumClient`'s interface on `Relay`; `tamper(round, party, data)` is what the
    relay shows this hospital instead of the stored round message."""

    def __init__(self, relay: Relay, index: int, tamper=None) -> None:  # noqa: ANN001
        self.relay, self.index, self.tamper = relay, index, tamper
        self.consortium_id, self.n_hospitals = JOB, N

    def post_round(self, message: bytes) -> None:
        size = int.from_bytes(message[:4], "big")
        party = json.loads(message[4 : 4 + size])["party"]
        self.relay.put("rounds", (round_of(message), party), message)

    def round_message(self, name: str, party: int, _timeout_s: float) -> bytes:
        data = self.relay.get("rounds", (name, party))
        return self.tamper(name, party, data) if self.tamper else data

    def post_sealed(self, envelope: bytes) -> None:
        routing = read_routing(envelope)
        self.relay.put("sealed", (routing["request"], routing["sender"], routing["recipient"]),
                       envelope)

    def sealed_envelope(self, request: str, sender: int, _timeout_s: float) -> bytes:
        return self.relay.get("sealed", (request, sender, self.index))


def run_rounds(tamper=None) -> list:  # noqa: ANN001
    """Every hospital's key rounds in its own thread; each one's party or its exception."""
    context = joint_context(PARAMS)
    keys = [new_sealing_key() for _ in range(N)]
    roster = Roster(JOB, tuple(bytes(k.public_key) for k in keys))
    relay, outcome = Relay(), [None] * N
    schedule = key_schedule(context, PARAMS, [], [])

    def hospital(i: int) -> None:
        party = ThresholdParty(JOB, i, N, context)
        client = Client(relay, i, tamper if i == 1 else None)
        try:
            answer_key_rounds(party, client, schedule, keys[i], roster, WAIT_S)
            outcome[i] = party
        except Exception as exc:  # noqa: BLE001 - the test looks at which one
            outcome[i] = exc

    threads = [threading.Thread(target=hospital, args=(i,)) for i in range(N)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def cloud_message(round_name: str) -> bytes:
    """A message the relay made itself, in hospital 0's name."""
    context = joint_context(PARAMS)
    if round_name == "public-key":
        payload = ofhe.Serialize(context.KeyGen().publicKey, ofhe.BINARY)
    else:
        pair = context.KeyGen()
        payload = ofhe.Serialize(context.KeySwitchGen(pair.secretKey, pair.secretKey),
                                 ofhe.BINARY)
    return RoundMessage(JOB, round_name, 0, payload).to_bytes()


def test_an_honest_relay_gives_every_hospital_one_joint_key():
    parties = run_rounds()
    assert all(isinstance(p, ThresholdParty) for p in parties), parties
    assert len({p.joint_tag for p in parties}) == 1


@pytest.mark.parametrize("round_name", ["public-key", "relin-1"])
def test_a_substituted_message_is_refused_before_the_share_touches_it(round_name):
    forged = cloud_message(round_name)

    def tamper(name: str, party: int, data: bytes) -> bytes:
        return forged if (name, party) == (round_name, 0) else data

    parties = run_rounds(tamper)
    assert isinstance(parties[1], SealError), parties[1]
    assert "not the one it attested" in str(parties[1])


def test_a_broken_chain_is_refused():
    chain = [(b"pk0", []), (b"pk1", ["not the digest of pk0"])]
    with pytest.raises(SealError, match="chain is broken at hospital 1"):
        check_chain(chain)
