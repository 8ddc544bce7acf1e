"""One hospital of a consortium training over the service, as its own process.

    python helpers_consortium_training.py URL CONSORTIUM_ID TOKEN OUT.json

Its rows are its part of `union()` (consecutive, `shard_of`); the plan is agreed (the same
`train_plan()` everywhere). Joins the roster, answers the key rounds (attested), sends its
rows under the joint key, then answers every joint refresh and epoch the cloud asks, by its
ledger and its judge, and decrypts the model; writes its weights, losses and refreshes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from helpers_he import toy_problem

from medblindtuner.consortium.ceremony import key_schedule
from medblindtuner.consortium.client import ConsortiumClient
from medblindtuner.consortium.data import Ownership
from medblindtuner.consortium.member import ConsortiumMember
from medblindtuner.consortium.refresher import MemberRefresher
from medblindtuner.consortium.relayed_training import JointEncryptor, TrainingAnswers, send_rows
from medblindtuner.consortium.remote import RemoteMailbox, answer_key_rounds, exchange_roster
from medblindtuner.consortium.roles import consortium_params
from medblindtuner.consortium.sealing import new_sealing_key
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.he.threshold import ThresholdParty, joint_context
from medblindtuner.training.plain import TrainConfig
from medblindtuner.training.plan import TrainingPlan

N = 3
TIMEOUT_S = 300.0
CONFIG = TrainConfig(learning_rate=1.0, momentum=0.9, epochs=2, batch_size=64, patience=5)


def union():
    """The union's rows (x_train, y_train, x_val, y_val), bias appended, norm <= 1."""
    return toy_problem(2, n_train=96, n_val=30, seed=5)


def train_plan() -> TrainingPlan:
    x_train, _, x_val, _ = union()
    return TrainingPlan.create(params_for_mode(HOSPITAL, insecure=True), x_train, x_val, 2,
                               CONFIG)


def shard_of(index: int) -> tuple[Ownership, tuple]:
    """Hospital `index`'s consecutive part of the union and where it lies."""
    x_train, y_train, x_val, y_val = union()
    train = np.array_split(np.arange(len(y_train)), N)[index]
    val = np.array_split(np.arange(len(y_val)), N)[index]
    owned = Ownership(int(train[0]), len(train), int(val[0]), len(val))
    return owned, (x_train[train], y_train[train], x_val[val], y_val[val])


def main(url: str, consortium_id: str, token: str, out: Path) -> None:
    plan = train_plan()
    params = consortium_params(plan, insecure=True)
    client = ConsortiumClient(url, consortium_id, token)
    sealing_key = new_sealing_key()
    roster = exchange_roster(client, sealing_key, TIMEOUT_S)
    context = joint_context(params)
    party = ThresholdParty(consortium_id, client.index, N, context)
    answer_key_rounds(party, client, key_schedule(context, params, plan.rotation_indices,
                                                  plan.kernel_rotation_indices),
                      sealing_key, roster, TIMEOUT_S)
    owned, shard = shard_of(client.index)
    x_train, _, x_val, _ = union()
    send_rows(client, JointEncryptor(params, context, party.joint_public_key), plan, owned,
              shard, len(x_train), len(x_val))
    member = ConsortiumMember(party, sealing_key, roster, RemoteMailbox(client, TIMEOUT_S))
    member.attach_plan(plan, len(x_val))
    ledger = MemberRefresher(party, params, plan, out.with_suffix(".ledger"),
                             stopped=lambda: member.judge.stopped)
    weights = TrainingAnswers(member, ledger, client, TIMEOUT_S).run()
    out.write_text(json.dumps({"weights": np.asarray(weights).tolist(),
                               "losses": {str(e): v for e, v in member.judge.losses.items()},
                               "refreshes": ledger.finished}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
