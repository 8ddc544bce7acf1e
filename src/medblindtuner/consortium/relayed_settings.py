"""Settings agreed over the service: one hospital's side of `consortium.agreement`'s rounds.

    hospital  settings: the roster (its sealing key, saved first), then every aggregation
              round through its `RemoteMailbox`; writes the agreed public plan (`plan.json`,
              what every later role takes), its own rows scaled as agreed (`rows.npz`, what
              `train` sends), where they sit in the union (`ownership.json`) and the agreed
              preconditioner (`preconditioner.npy`)

A masked sum is the same bytes when recomputed, a sealed envelope is not (a fresh nonce), so
every envelope is written to the state folder before it is posted and a restarted hospital
re-posts the saved bytes (the service takes a same-bytes retry): killed mid-round, the same
command resumes. `keys` then reuses the saved sealing key and roster.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from nacl.public import PrivateKey

from medblindtuner.he.params import HOSPITAL, params_for_mode

from .agreement import AgreedSettings, Sums, collect_sums, hospital_settings, post_masked
from .client import WAIT_TIMEOUT_S, ConsortiumClient
from .remote import RemoteMailbox, exchange_roster
from .run import HospitalShard
from .sealing import Mailbox, Roster, read_routing
from .settings import SecureAggregator

SEALING_KEY, ROSTER, SENT_DIR = "sealing_key.bin", "roster.json", "settings-sent"
PLAN, ROWS, OWNERSHIP = "plan.json", "rows.npz", "ownership.json"
PRECONDITIONER = "preconditioner.npy"  # p_j: x_grad is encrypted as x p (public among them)


class PersistedMailbox:
    """A `Mailbox` that writes each envelope to `folder` before posting it, and posts the
    saved bytes instead when that envelope (request, recipient) was made before."""

    def __init__(self, mailbox: Mailbox, folder: Path) -> None:
        self.mailbox, self.folder = mailbox, folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def post(self, envelope: bytes) -> None:
        routing = read_routing(envelope)
        path = self.folder / f"{routing['request']}-to-{int(routing['recipient'])}.bin"
        if path.exists():
            envelope = path.read_bytes()
        else:
            _write_atomic(path, envelope)
        self.mailbox.post(envelope)

    def fetch(self, job_id: str, request_id: str, recipient: int) -> list[bytes]:
        return self.mailbox.fetch(job_id, request_id, recipient)


def sealing_identity(client: ConsortiumClient, state: Path,
                     timeout_s: float = WAIT_TIMEOUT_S) -> tuple[PrivateKey, Roster]:
    """This hospital's sealing key (made and saved once, 0600) and the consortium's roster
    (exchanged through the service, then saved)."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_file = state / SEALING_KEY
    if key_file.exists():
        key = PrivateKey(key_file.read_bytes())
    else:
        key = PrivateKey.generate()
        _write_atomic(key_file, bytes(key))
    roster = exchange_roster(client, key, timeout_s)
    _write_atomic(state / ROSTER, json.dumps({"job_id": roster.job_id, "public_keys": [
        k.hex() for k in roster.public_keys]}).encode())
    return key, roster


def agree_over_relay(client: ConsortiumClient, state: Path, shard: HospitalShard,
                     n_classes: int, insecure: bool = False, pca_dims: int | None = None,
                     weight_decay: float | None = None, epochs: int | None = None,
                     timeout_s: float = WAIT_TIMEOUT_S) -> AgreedSettings:
    """This hospital's side of every settings round over the service; writes `plan.json`,
    `rows.npz` and `ownership.json` to `state` and returns the settings."""
    key, roster = sealing_identity(client, state, timeout_s)
    index = client.index
    mailbox = PersistedMailbox(RemoteMailbox(client, timeout_s), state / SENT_DIR)
    params = params_for_mode(HOSPITAL, insecure=insecure)
    rounds = hospital_settings(index, shard, client.n_hospitals, n_classes, params, pca_dims,
                               weight_decay, epochs)
    aggregator = SecureAggregator(key, roster, index)
    contribution: Sums = next(rounds)
    while True:
        mine = post_masked(index, aggregator, key, roster, contribution, mailbox)
        sums = collect_sums(index, key, roster, contribution, mine, mailbox)
        try:
            contribution = rounds.send(sums)
        except StopIteration as stop:
            agreed: AgreedSettings = stop.value
            break
    _write_outputs(state, agreed, index, shard)
    return agreed


def _write_outputs(state: Path, agreed: AgreedSettings, index: int,
                   shard: HospitalShard) -> None:
    scaler = agreed.scaler
    _write_atomic(state / PLAN, json.dumps(agreed.plan.to_dict()).encode())
    owned = agreed.ownership(index)
    _write_atomic(state / OWNERSHIP, json.dumps({
        **asdict(owned), "n_train": sum(agreed.train_counts),
        "n_val": sum(agreed.val_counts)}).encode())
    with open(state / f"{PRECONDITIONER}.tmp", "wb") as out:
        np.save(out, agreed.preconditioner)
    os.replace(state / f"{PRECONDITIONER}.tmp", state / PRECONDITIONER)
    rows = state / ROWS
    with open(f"{rows}.tmp", "wb") as out:
        np.savez(out, x_train=scaler.augment(shard.x_train), y_train=shard.y_train,
                 x_val=scaler.augment(shard.x_val), y_val=shard.y_val)
    os.replace(f"{rows}.tmp", rows)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` (0600) through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
