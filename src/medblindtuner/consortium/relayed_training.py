"""A consortium's training with each hospital in its own process and the cloud on the
service's store (what `consortium.run` does in one process):

    hospital i  send_rows: its rows of the union's chunks under the joint key (`data.
                encrypt_share`), one round message per ciphertext (`rows-<i>-<split>-<pos>-
                <part>`), then its manifest (`rows-<i>`)
                TrainingAnswers(member, ledger, client).run(): answers the cloud's joint
                refreshes (its `MemberRefresher`) and its epochs' losses (its judge), in
                whatever order the cloud asks; then decrypts the model its judge chose
    cloud       train_over_relay: the union's dataset (`data.combine_shares`), the unchanged
                trainer, refreshes through `RelayedMember`s, decisions through
                `RelayedDecide`, the model published (`remote.publish_model`)

The settings (scaler, plan, preconditioner) are agreed before, the same for all
(`relayed_settings`); with a preconditioned plan hospital 0 also sends the decay vector
(`rows-0-decay`, named in its manifest).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openfhe as ofhe

from medblindtuner.cloud.cloud import Cloud
from medblindtuner.cloud.trainer import EncryptedState
from medblindtuner.he.ciphertexts import ciphertext_from_bytes, ciphertext_to_bytes
from medblindtuner.he.joint_refresh import PHASES, JointCloudRefresher
from medblindtuner.he.params import CkksParams
from medblindtuner.he.threshold import RoundMessage
from medblindtuner.hospital.client import ServiceError
from medblindtuner.protocol import CLOUD_PARTY
from medblindtuner.training.plan import TrainingPlan

from .ceremony import JointKeys
from .client import WAIT_TIMEOUT_S, ConsortiumClient
from .data import Ownership, ShareChunk, combine_shares, encrypt_decay, encrypt_share
from .member import ConsortiumMember
from .refresher import MemberRefresher
from .remote import (
    MODEL_ROUND,
    RelayedDecide,
    RelayedMember,
    RelayError,
    answer_loss,
    decrypt_published_model,
    loss_topic,
    publish_model,
    refresh_topic,
)

DECAY = "decay"  # a preconditioned plan's decay vector, sent by hospital 0 with its rows
LOOK_S = 0.3  # one long poll per kind of question while a hospital waits for the next


@dataclass
class JointEncryptor:
    """What `data.encrypt_share` needs of the joint keys on a hospital: the joint public key."""

    params: CkksParams
    context: ofhe.CryptoContext
    public_key: ofhe.PublicKey

    def encrypt(self, values, level: int = 0) -> ofhe.Ciphertext:  # noqa: ANN001 - array
        plaintext = self.context.MakeCKKSPackedPlaintext(
            np.ascontiguousarray(values, dtype=np.float64), 1, level, None, self.params.slots)
        return self.context.Encrypt(self.public_key, plaintext)


def rows_topic(hospital: int, split: str = "", position: int = 0, part: str = "") -> str:
    if split == DECAY:
        return f"rows-{hospital}-{DECAY}"
    return f"rows-{hospital}" + (f"-{split}-{position}-{part}" if split else "")


def send_rows(client: ConsortiumClient, encryptor: JointEncryptor, plan: TrainingPlan,
              owned: Ownership, shard, n_train: int, n_val: int,  # noqa: ANN001 - 4 arrays
              preconditioner: np.ndarray | None = None) -> int:
    """Post this hospital's rows of the union's chunks (x_train, y_train, x_val, y_val in
    `shard`), then the manifest naming them. Returns the ciphertexts posted."""
    job_id, index = client.consortium_id, client.index
    train, val = encrypt_share(encryptor, plan, owned, *shard, n_train, n_val, preconditioner)
    manifest: dict[str, Any] = {"train": [], "val": []}
    if index == 0 and plan.config.preconditioned:  # the coordinator sends the decay vector
        decay = encrypt_decay(encryptor, plan, preconditioner)
        client.post_round(RoundMessage(job_id, rows_topic(0, DECAY), 0,
                                       ciphertext_to_bytes(decay)).to_bytes())
        manifest[DECAY] = True
    for split, chunks in (("train", train), ("val", val)):
        for chunk in chunks:
            parts = {"x_dup": chunk.x_dup, "x_grad": chunk.x_grad,
                     **{f"label{k}": ct for k, ct in enumerate(chunk.labels)}}
            for part, ct in parts.items():
                topic = rows_topic(index, split, chunk.position, part)
                client.post_round(RoundMessage(job_id, topic, index,
                                               ciphertext_to_bytes(ct)).to_bytes())
            manifest[split].append([chunk.position, len(chunk.labels)])
    client.post_round(RoundMessage(job_id, rows_topic(index), index,
                                   json.dumps(manifest).encode()).to_bytes())
    return sum(3 + n for split in ("train", "val") for _p, n in manifest[split])


def receive_rows(relay, consortium_id: str, n_parties: int,  # noqa: ANN001 - ConsortiumRelay
                 timeout_s: float = WAIT_TIMEOUT_S
                 ) -> tuple[list[tuple[list, list]], ofhe.Ciphertext | None]:
    """The cloud's side of `send_rows`: every hospital's chunks, once its manifest is in, and
    the decay vector hospital 0 sent with a preconditioned plan's rows (else None)."""
    shares, decay = [], None
    for hospital in range(n_parties):
        manifest = json.loads(_message(relay, consortium_id, rows_topic(hospital), hospital,
                                       timeout_s))
        if hospital == 0 and manifest.get(DECAY):
            decay = ciphertext_from_bytes(_message(relay, consortium_id, rows_topic(0, DECAY),
                                                   0, 0))

        def part(split: str, position: int, name: str, i: int = hospital) -> ofhe.Ciphertext:
            return ciphertext_from_bytes(_message(relay, consortium_id,
                                                  rows_topic(i, split, position, name), i, 0))

        shares.append(tuple(
            [ShareChunk(int(p), part(split, p, "x_dup"), part(split, p, "x_grad"),
                        [part(split, p, f"label{k}") for k in range(int(n))])
             for p, n in manifest[split]] for split in ("train", "val")))
    return shares, decay


def _message(relay, consortium_id: str, topic: str, party: int,  # noqa: ANN001
             timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        found = relay.read(consortium_id, topic)
        if party in found:
            return RoundMessage.from_bytes(found[party], consortium_id, topic, party).payload
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{topic!r}: waiting for hospital {party}")
        time.sleep(0.05)


def train_over_relay(relay, consortium_id: str, keys: JointKeys,  # noqa: ANN001
                     plan: TrainingPlan, n_train: int, n_val: int, workdir: Path,
                     decay: ofhe.Ciphertext | None = None,
                     timeout_s: float = WAIT_TIMEOUT_S,
                     on_step: Callable[[dict], None] | None = None) -> EncryptedState:
    """The cloud's whole training: the union's dataset from the store, the unchanged trainer
    with every refresh and decision through the members, then the chosen model published.
    `on_step`: the trainer's progress after each step (as `Cloud.train`'s)."""
    n = relay.n_parties(consortium_id)
    shares, sent_decay = receive_rows(relay, consortium_id, n, timeout_s)
    dataset = combine_shares(keys.context, plan, shares, n_train, n_val,
                             decay if decay is not None else sent_decay)
    params = keys.params
    cloud = Cloud.sharing_context(keys.context, params, keys.public_key)
    if params.refreshed_by_hospital:
        members = [RelayedMember(relay, consortium_id, i, timeout_s) for i in range(n)]
        cloud.evaluator.refresher = JointCloudRefresher(
            keys.context, params, keys.public_key, members, plan.job_tag(params),
            Path(workdir) / "refresh_journal")
    trainer = cloud.trainer(dataset, Path(workdir) / "checkpoints")
    state = cloud.train(trainer, decide=RelayedDecide(relay, consortium_id, n, timeout_s),
                        on_step=on_step)
    publish_model(relay, consortium_id, state.best_epoch,
                  trainer.weights_of_epoch(state.best_epoch))
    return state


def cloud_question(client: ConsortiumClient, topic: str, look_s: float) -> bytes | None:
    """The cloud's message in round `topic` (waiting up to `look_s`), None if not there."""
    try:
        message = client.round_message(topic, CLOUD_PARTY, look_s)
    except ServiceError as exc:
        if exc.status_code == 404:
            return None
        raise
    return RoundMessage.from_bytes(message, client.consortium_id, topic, CLOUD_PARTY).payload


def post_last_share_again(ledger: MemberRefresher, client: ConsortiumClient,
                          look_s: float = 0.0) -> None:
    """Post the ledger's last shared refresh answer again: a kill may have come after the
    ledger recorded it, before it was posted (the ledger gives the kept bytes)."""
    if not ledger.finished:
        return
    topic = refresh_topic(ledger.finished - 1, PHASES[-1])
    request = cloud_question(client, topic, look_s)
    if request is not None:
        client.post_round(RoundMessage(client.consortium_id, topic, client.index,
                                       ledger(request)).to_bytes())


class TrainingAnswers:
    """A hospital's side of one training over the relay: the cloud's joint refreshes (by the
    member's ledger) and epochs' losses (by its judge) in the order the cloud asks, then the
    model. `run` returns the decrypted weights; no question for `timeout_s`: `RelayError`.

    Restarted with a persisted ledger and judge (a hospital killed midway), it goes on where
    they stand: it first answers again the last refresh its ledger shared and the last epoch
    its judge answered (their answers may have been recorded but not posted; the ledger, the
    judge and a `JournaledClient` give the same bytes), then the cloud's next questions."""

    def __init__(self, member: ConsortiumMember, ledger: MemberRefresher,
                 client: ConsortiumClient, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        self.member, self.ledger, self.client, self.timeout_s = member, ledger, client, timeout_s
        answered = max(member.judge.answers, default=0) if member.judge is not None else 0
        self.epoch, self.phase = max(1, answered), 0
        self.decided = False  # the judge stopped or the plan's last epoch was answered

    def _cloud(self, topic: str) -> bytes | None:
        return cloud_question(self.client, topic, LOOK_S)

    def _refresh(self) -> bool:
        topic = refresh_topic(self.ledger.finished, PHASES[self.phase])
        request = self._cloud(topic)
        if request is None:
            return False
        self.client.post_round(RoundMessage(self.client.consortium_id, topic,
                                            self.member.index, self.ledger(request)).to_bytes())
        self.phase = (self.phase + 1) % len(PHASES)
        return True

    def _loss(self) -> bool:
        if self.decided or self._cloud(loss_topic(self.epoch)) is None:
            return False
        decision = answer_loss(self.member, self.client, self.epoch, self.timeout_s)
        plan = self.member.plan
        self.decided = not decision.continue_training or self.epoch >= plan.config.epochs
        self.epoch += 1
        return True

    def run(self) -> np.ndarray:
        post_last_share_again(self.ledger, self.client, LOOK_S)
        last = time.monotonic()
        while not (self.decided and self._cloud(MODEL_ROUND) is not None):
            if self._refresh() or self._loss():
                last = time.monotonic()
            elif time.monotonic() - last > self.timeout_s:
                raise RelayError(f"hospital {self.member.index}: the cloud asked nothing for "
                                 f"{self.timeout_s:g} s (refresh {self.ledger.finished}, epoch "
                                 f"{self.epoch})")
        return decrypt_published_model(self.member, self.client, self.timeout_s)
