"""The consortium's roles over the service: each hospital in its own process, the cloud on
the service's store. The in-process code runs unchanged on these adaptors:

    hospital i   roster = exchange_roster(client, sealing_key)
                 answer_key_rounds(party, client, schedule)       # its own secret share only
                 member = ConsortiumMember(party, sealing_key, roster, RemoteMailbox(client))
    cloud        keys = assemble_joint_keys(context, params, job_id, n, read_round, schedule)

Refresh mode "hospital": the cloud's `JointCloudRefresher` reaches member i through the store
(`RelayedMember`, one per member); each hospital answers with its `MemberRefresher` in
`serve_refreshes`. A phase waits until member i answered, else the refresh pauses
(`RefreshPaused`, naming the hospitals still missing) and a re-run resumes it.

Decryptions: the cloud's `decide` is `RelayedDecide` (publishes epoch e's encrypted loss in
round `loss-e`, waits for every hospital's decision in that round); each hospital runs
`serve_decisions`: its sealed share only for the epoch its own judge expects, all n fused,
its judge's decision posted; then the model (`publish_model`), shared only for the epoch its
judge chose.

Every message is the bytes the in-process relay carries (`RoundMessage`, sealed envelopes).
Each hospital combines the relinearisation shares itself (public material, the same sum for
all), so the service relays only what hospitals post; the cloud combines the products and
the automorphism shares into the joint bundle (`ceremony.install_schedule`).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.ciphertexts import ciphertext_from_bytes, ciphertext_to_bytes
from medblindtuner.he.joint_refresh import PHASES, JointMessage
from medblindtuner.he.threshold import (
    RoundError,
    RoundMessage,
    ThresholdParty,
    collect,
    combine_automorphism_shares,
    combine_relin_products,
    combine_relin_shares,
    for_decryption,
    install_joint_keys,
    round_of_automorphisms,
)
from medblindtuner.he.untrusted import run_isolated
from medblindtuner.protocol import CLOUD_PARTY
from medblindtuner.training.plan import Decision

from .attest import AttestedRounds, check_chain, check_same_lead
from .ceremony import JointKeys, KeySchedule, install_schedule
from .client import WAIT_TIMEOUT_S, ConsortiumClient
from .member import ConsortiumMember
from .sealing import Roster, SealError

if TYPE_CHECKING:  # the cloud's side only: a hospital's process needs no database
    from medblindtuner.service.consortia import ConsortiumRelay

ROSTER_ROUND = "roster"
PUBLIC_KEY_ROUND = "public-key"
MODEL_ROUND = "model"
PARSE_TIMEOUT_S, PARSE_MEMORY_BYTES = 120.0, 4 << 30  # as `hospital.crypto.UntrustedParseLimits`


class RelayError(MedBlindTunerError, RuntimeError):
    """The hospitals' answers over the relay disagree or are malformed: training pauses."""


class RemoteMailbox:
    """`SealedMailbox`'s interface for one hospital, over the service: it posts this
    hospital's envelopes and fetches those addressed to it (waiting for all n-1)."""

    def __init__(self, client: ConsortiumClient, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        self.client = client
        self.timeout_s = timeout_s

    def post(self, envelope: bytes) -> None:
        self.client.post_sealed(envelope)

    def fetch(self, job_id: str, request_id: str, recipient: int) -> list[bytes]:
        """The envelopes of `request_id` for `recipient` (this client's hospital only)."""
        if job_id != self.client.consortium_id or recipient != self.client.index:
            raise SealError(f"this mailbox is hospital {self.client.index}'s of consortium "
                            f"{self.client.consortium_id!r}, not hospital {recipient}'s of "
                            f"{job_id!r}")
        return self.client.sealed_envelopes(request_id, self.timeout_s)

    def senders(self, job_id: str, request_id: str, recipient: int) -> Sequence[int]:
        listing = self.client.sealed_listing(request_id)
        return sorted(int(s) for s in listing["posted"])


def exchange_roster(client: ConsortiumClient, sealing_key,  # noqa: ANN001 - PyNaCl key
                    timeout_s: float = WAIT_TIMEOUT_S) -> Roster:
    """Post this hospital's sealing public key, then read every hospital's: the roster.
    (Hospitals compare `Roster.fingerprint`s out of band before trusting it.)"""
    job_id, index = client.consortium_id, client.index
    client.post_round(RoundMessage(job_id, ROSTER_ROUND, index,
                                   bytes(sealing_key.public_key)).to_bytes())
    keys = collect(client.round_messages(ROSTER_ROUND, timeout_s), job_id, ROSTER_ROUND,
                   client.n_hospitals)
    if keys[index] != bytes(sealing_key.public_key):
        raise SealError(f"the roster's key of hospital {index} is not this hospital's")
    return Roster(job_id, tuple(keys))


def answer_key_rounds(party: ThresholdParty, client: ConsortiumClient, schedule: KeySchedule,
                      sealing_key, roster: Roster,  # noqa: ANN001 - a PyNaCl PrivateKey
                      timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """This hospital's side of every key round, in `run_key_ceremony`'s order: the public-key
    chain (after party i-1), relinearisation (sums the n shares itself) and each automorphism
    chunk (after party 0). Only public bytes leave; the secret share stays in `party`. Every
    message it uses is attested by its author and checked to be the one all others used
    (`attest`): an altering relay is refused before this hospital's share touches its
    bytes."""
    if party.job_id != client.consortium_id or party.index != client.index:
        raise RoundError(f"party {party.index} of {party.job_id!r} is not this client's "
                         f"hospital {client.index} of {client.consortium_id!r}")
    i, n = party.index, party.n_parties
    rounds = AttestedRounds(client, sealing_key, roster, timeout_s)
    previous = None if i == 0 else rounds.fetch(PUBLIC_KEY_ROUND, i - 1)[0]
    rounds.post(party.public_key_round(previous), [previous] if previous else [])
    chain = rounds.fetch_all(PUBLIC_KEY_ROUND)
    check_chain(chain)
    party.accept_joint_public_key(chain[-1][0])

    lead = None if i == 0 else rounds.fetch("relin-1", 0)[0]
    rounds.post(party.relin_share(lead), [lead] if lead else [])
    shares = rounds.fetch_all("relin-1")
    check_same_lead(shares, "relin-1")
    summed = combine_relin_shares(party.context, [m for m, _ in shares], party.job_id, n,
                                  party.joint_tag)
    client.post_round(party.relin_product(summed))  # used by the cloud only

    for number, indices in schedule.rounds:
        name = round_of_automorphisms(number)
        lead = None if i == 0 else rounds.fetch(name, 0)[0]
        rounds.post(party.automorphism_share(number, indices, lead), [lead] if lead else [])


def assemble_joint_keys(context: ofhe.CryptoContext, params, job_id: str,  # noqa: ANN001
                        n_parties: int, read_round: Callable[[str], list[bytes]],
                        schedule: KeySchedule, keys_dir: Path | None = None) -> JointKeys:
    """The cloud's side: the joint public key, relinearisation key and every automorphism
    chunk, from the members' messages (`read_round(name)`: all n, by party), installed in
    `context` and written like `run_key_ceremony`'s (`JointKeys.save_public_bundle`; files in
    `keys_dir`, else a temporary folder)."""
    seconds: dict[str, float] = {}
    carried = 0

    def read(name: str) -> list[bytes]:
        nonlocal carried
        messages = read_round(name)
        carried += sum(len(m) for m in messages)
        return messages

    start = time.perf_counter()
    chain = read(PUBLIC_KEY_ROUND)
    last = RoundMessage.from_bytes(chain[-1], job_id, PUBLIC_KEY_ROUND, n_parties - 1)
    public_key = ofhe.DeserializePublicKeyString(last.payload, ofhe.BINARY)
    tag = public_key.GetKeyTag()
    install_joint_keys(context, combine_relin_products(context, read("relin-2"), job_id,
                                                       n_parties, tag), [], tag)
    seconds["public_and_relinearisation"] = time.perf_counter() - start

    def join(number: int, _indices: tuple[int, ...]) -> bytes:
        return combine_automorphism_shares(context, read(round_of_automorphisms(number)),
                                           job_id, n_parties, number, tag)

    start = time.perf_counter()
    shard_file, shard_dir = install_schedule(context, schedule, tag, join, keys_dir)
    seconds["rotations"] = time.perf_counter() - start
    return JointKeys(params, context, public_key, schedule.rotation_indices,
                     schedule.shard_rotation_indices, shard_file, seconds, carried, shard_dir)


def refresh_topic(index: int, phase: str) -> str:
    """The relay's round of one phase of joint refresh `index`."""
    return f"refresh-{index}-{phase}"


class RelayedMember:
    """The cloud's `JointKeyHolder` for member `index`, through the service's store (the
    worker's side): publishes the phase's request as the cloud's round message (the same
    bytes for every member, so the first publication serves all) and waits for this member's
    answer. None within `timeout_s`: a `TimeoutError` (an `OSError`), which the refresher
    turns into `RefreshPaused` naming who is missing."""

    def __init__(self, relay: ConsortiumRelay, consortium_id: str, index: int,
                 timeout_s: float = WAIT_TIMEOUT_S, poll_s: float = 0.02) -> None:
        self.relay, self.consortium_id, self.index = relay, consortium_id, index
        self.timeout_s, self.poll_s = timeout_s, poll_s

    def __call__(self, message: bytes) -> bytes:
        joint = JointMessage.from_bytes(message)
        topic = refresh_topic(joint.index, joint.phase)
        self.relay.publish(self.consortium_id, topic, RoundMessage(
            self.consortium_id, topic, CLOUD_PARTY, message).to_bytes(), awaits_answers=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            found = self.relay.read(self.consortium_id, topic)
            if self.index in found:
                return RoundMessage.from_bytes(found[self.index], self.consortium_id, topic,
                                               self.index).payload
            if time.monotonic() >= deadline:
                n = self.relay.n_parties(self.consortium_id)
                missing = ", ".join(str(i) for i in range(n) if i not in found)
                raise TimeoutError(f"no answer to {topic!r} within {self.timeout_s:g} s "
                                   f"(waiting for hospitals {missing})")
            time.sleep(self.poll_s)


def serve_refreshes(member: Callable[[bytes], bytes], client: ConsortiumClient, count: int,
                    first: int = 0, timeout_s: float = WAIT_TIMEOUT_S) -> int:
    """A hospital answers the cloud's joint refreshes `first`, ..., `first + count - 1`, each
    phase in order, with its own rules (`member`: its `MemberRefresher`, which refuses what
    its ledger does not allow). Returns the number answered; a `ServiceError` if the cloud
    asks nothing within `timeout_s`."""
    job_id, index = client.consortium_id, client.index
    for number in range(first, first + count):
        for phase in PHASES:
            topic = refresh_topic(number, phase)
            request = RoundMessage.from_bytes(client.round_message(topic, CLOUD_PARTY,
                                                                   timeout_s),
                                              job_id, topic, CLOUD_PARTY).payload
            client.post_round(RoundMessage(job_id, topic, index, member(request)).to_bytes())
    return count



def loss_topic(epoch: int) -> str:
    return f"loss-{epoch}"


def _published(relay: ConsortiumRelay, consortium_id: str, topic: str, data: bytes,
               awaits_answers: bool = False) -> None:
    relay.publish(consortium_id, topic, RoundMessage(consortium_id, topic, CLOUD_PARTY,
                                                     data).to_bytes(), awaits_answers)


class RelayedDecide:
    """The cloud's `decide(epoch, loss)` through the store: publishes the encrypted loss in
    round `loss-<epoch>` and waits for every hospital's decision in that round; all equal:
    that decision; different: `RelayError`; not all in within `timeout_s`: `TimeoutError`
    naming the hospitals missing (the job pauses, the status shows them as `awaiting`)."""

    def __init__(self, relay: ConsortiumRelay, consortium_id: str, n_parties: int,
                 timeout_s: float = WAIT_TIMEOUT_S, poll_s: float = 0.05) -> None:
        self.relay, self.consortium_id, self.n = relay, consortium_id, n_parties
        self.timeout_s, self.poll_s = timeout_s, poll_s

    def __call__(self, epoch: int, loss: ofhe.Ciphertext) -> Decision:
        topic = loss_topic(epoch)
        _published(self.relay, self.consortium_id, topic,
                   ciphertext_to_bytes(for_decryption(loss)), True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            found = {p: m for p, m in self.relay.read(self.consortium_id, topic).items()
                     if p != CLOUD_PARTY}
            if len(found) == self.n or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        missing = ", ".join(str(i) for i in range(self.n) if i not in found)
        if missing:
            raise TimeoutError(f"epoch {epoch}: waiting for hospitals {missing}")
        decisions = [_decision(found[i], self.consortium_id, topic, i) for i in range(self.n)]
        if any(d != decisions[0] for d in decisions):
            raise RelayError(f"the hospitals decided differently at epoch {epoch}: "
                             f"{decisions}; training pauses")
        return decisions[0]


def _decision(message: bytes, job_id: str, topic: str, party: int) -> Decision:
    try:
        data = json.loads(RoundMessage.from_bytes(message, job_id, topic, party).payload)
        return Decision(bool(data["continue_training"]), int(data["best_epoch"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise RelayError(f"hospital {party}'s decision in {topic!r} is malformed ({exc})") from exc


def publish_model(relay: ConsortiumRelay, consortium_id: str, best_epoch: int,
                  ciphertexts: Sequence[ofhe.Ciphertext]) -> None:
    """The chosen epoch's encrypted model for the hospitals (`model-<k>`, then `model`)."""
    for k, ct in enumerate(ciphertexts):
        _published(relay, consortium_id, f"{MODEL_ROUND}-{k}", ciphertext_to_bytes(ct))
    _published(relay, consortium_id, MODEL_ROUND, json.dumps(
        {"best_epoch": best_epoch, "ciphertexts": len(ciphertexts)}).encode())


def _cloud_ciphertext(client: ConsortiumClient, member: ConsortiumMember, topic: str,
                      timeout_s: float) -> bytes:
    """The cloud's ciphertext of round `topic`, parsed first in a limited subprocess."""
    data = RoundMessage.from_bytes(client.cloud_message(topic, timeout_s),
                                   client.consortium_id, topic, CLOUD_PARTY).payload
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ciphertext.bin"
        path.write_bytes(data)
        verdict = run_isolated([str(path), "--role", "ciphertext", "--ring-dim",
                                str(member.party.context.GetRingDimension())],
                               PARSE_TIMEOUT_S, PARSE_MEMORY_BYTES, f"the cloud's {topic!r}")
    if not verdict.ok:
        raise RelayError(f"hospital {member.index}: {topic!r} is refused: {verdict.error}")
    return data


def answer_loss(member: ConsortiumMember, client: ConsortiumClient, epoch: int,
                timeout_s: float = WAIT_TIMEOUT_S) -> Decision:
    """Epoch `epoch`'s loss: this hospital's sealed share only if its judge expects that
    epoch, all n fused, its judge's decision posted in the loss round."""
    topic = loss_topic(epoch)
    data = _cloud_ciphertext(client, member, topic, timeout_s)
    member.share_validation_loss(epoch, data)
    decision = member.judge(epoch, ciphertext_from_bytes(data))
    client.post_round(RoundMessage(client.consortium_id, topic, member.index,
                                   json.dumps(asdict(decision)).encode()).to_bytes())
    return decision


def decrypt_published_model(member: ConsortiumMember, client: ConsortiumClient,
                            timeout_s: float = WAIT_TIMEOUT_S) -> np.ndarray:
    """The model the cloud published, shared and decrypted only for the epoch this
    hospital's judge chose (after it stopped or the plan's last epoch)."""
    job_id = client.consortium_id
    info = json.loads(RoundMessage.from_bytes(client.cloud_message(MODEL_ROUND, timeout_s),
                                              job_id, MODEL_ROUND, CLOUD_PARTY).payload)
    model = [_cloud_ciphertext(client, member, f"{MODEL_ROUND}-{k}", timeout_s)
             for k in range(int(info["ciphertexts"]))]
    member.share_model(int(info["best_epoch"]), model)
    return member.decrypt_model([ciphertext_from_bytes(ct) for ct in model])


def serve_decisions(member: ConsortiumMember, client: ConsortiumClient,
                    timeout_s: float = WAIT_TIMEOUT_S) -> np.ndarray:
    """A hospital's decryptions of one training job, by its own judge: epoch 1, 2, ...
    (`answer_loss`) until its judge stopped or the plan's last epoch, then the model
    (`decrypt_published_model`). Returns the decrypted weights."""
    plan, epoch = member.plan, 1
    if plan is None:
        raise RelayError(f"hospital {member.index} has no plan: it decrypts nothing")
    while True:
        decision = answer_loss(member, client, epoch, timeout_s)
        if not decision.continue_training or epoch >= plan.config.epochs:
            break
        epoch += 1
    return decrypt_published_model(member, client, timeout_s)
