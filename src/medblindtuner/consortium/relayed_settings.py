"""Settings agreed over the service: one hospital's side of `consortium.agreement`'s rounds.

    hospital  settings (`roles.settings`): the roster, then every aggregation round through
              its `RemoteMailbox`; writes the agreed public plan (`plan.json`, what every
              later role takes), its own rows scaled as agreed (`rows.npz`, what `train`
              sends), where they sit in the union (`ownership.json`) and the agreed
              preconditioner (`preconditioner.npy`)

A masked sum is the same bytes when recomputed, a sealed envelope is not (a fresh nonce): the
hospital posts through a `journal.JournaledClient`, which keeps every envelope before it
leaves, so a hospital killed mid-round reruns the same command and posts the kept bytes.
`keys` then reuses the saved sealing key, so the roster is the same.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from nacl.public import PrivateKey

from medblindtuner.he.params import HOSPITAL, params_for_mode

from .agreement import AgreedSettings, Sums, collect_sums, hospital_settings, post_masked
from .client import WAIT_TIMEOUT_S, ConsortiumClient
from .journal import private_dir, write_private
from .remote import RemoteMailbox, exchange_roster
from .run import HospitalShard
from .settings import SecureAggregator

PLAN, ROWS, OWNERSHIP = "plan.json", "rows.npz", "ownership.json"
PRECONDITIONER = "preconditioner.npy"  # p_j: x_grad is encrypted as x p (public among them)


def agree_over_relay(client: ConsortiumClient, sealing_key: PrivateKey, state: Path,
                     shard: HospitalShard, n_classes: int, insecure: bool = False,
                     pca_dims: int | None = None, weight_decay: float | None = None,
                     epochs: int | None = None,
                     timeout_s: float = WAIT_TIMEOUT_S) -> AgreedSettings:
    """This hospital's side of the roster and every settings round over the service (give a
    `JournaledClient` to resume after a kill); writes `plan.json`, `rows.npz`,
    `ownership.json` and `preconditioner.npy` to `state` and returns the settings."""
    index = client.index
    roster = exchange_roster(client, sealing_key, timeout_s)
    mailbox = RemoteMailbox(client, timeout_s)
    params = params_for_mode(HOSPITAL, insecure=insecure)
    rounds = hospital_settings(index, shard, client.n_hospitals, n_classes, params, pca_dims,
                               weight_decay, epochs)
    aggregator = SecureAggregator(sealing_key, roster, index)
    contribution: Sums = next(rounds)
    while True:
        mine = post_masked(index, aggregator, sealing_key, roster, contribution, mailbox)
        sums = collect_sums(index, sealing_key, roster, contribution, mine, mailbox)
        try:
            contribution = rounds.send(sums)
        except StopIteration as stop:
            agreed: AgreedSettings = stop.value
            break
    _write_outputs(state, agreed, index, shard)
    return agreed


def _write_outputs(state: Path, agreed: AgreedSettings, index: int,
                   shard: HospitalShard) -> None:
    scaler, owned = agreed.scaler, agreed.ownership(index)
    private_dir(state)
    write_private(state / PLAN, json.dumps(agreed.plan.to_dict()).encode())
    write_private(state / OWNERSHIP, json.dumps({
        **asdict(owned), "n_train": sum(agreed.train_counts),
        "n_val": sum(agreed.val_counts)}).encode())
    write_private(state / PRECONDITIONER, _npy(agreed.preconditioner))
    rows = io.BytesIO()
    np.savez(rows, x_train=scaler.augment(shard.x_train), y_train=shard.y_train,
             x_val=scaler.augment(shard.x_val), y_val=shard.y_val)
    write_private(state / ROWS, rows.getvalue())


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()
