"""One hospital of a consortium, as its own process, talking only to the service.

    python helpers_consortium.py URL CONSORTIUM_ID TOKEN OUT.json

Joins the roster, answers every key round (its secret share never leaves this process),
decrypts each ciphertext the cloud publishes (rounds `ciphertext-<name>`, NAMES) with the
others' sealed shares, answers one joint refresh (its `MemberRefresher`, ledger next to
OUT.json) and decrypts the refreshed ciphertext; then, with the plan attached, answers a
training's validation losses by its own judge and decrypts the model. Writes what it learnt
to OUT.json: the values, what its own share alone decodes to, a window of its decryption
share's bytes (the test looks for them in the service's files, where only sealed envelopes
may be), its judge's losses and the model's weights.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import openfhe as ofhe
from helpers_he import toy_problem

from medblindtuner.consortium.ceremony import key_schedule
from medblindtuner.consortium.client import ConsortiumClient
from medblindtuner.consortium.member import ConsortiumMember
from medblindtuner.consortium.refresher import MemberRefresher
from medblindtuner.consortium.remote import (
    RemoteMailbox,
    answer_key_rounds,
    exchange_roster,
    serve_decisions,
    serve_refreshes,
)
from medblindtuner.consortium.sealing import new_sealing_key
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.he.threshold import (
    RoundMessage,
    ThresholdParty,
    joint_context,
    joint_params,
    request_id_of,
    round_of_decryption,
)
from medblindtuner.protocol import CLOUD_PARTY
from medblindtuner.training.plain import TrainConfig
from medblindtuner.training.plan import TrainingPlan

PARAMS = joint_params(params_for_mode(HOSPITAL, insecure=True))
ROTATIONS = [1, 2, -4]
KERNEL_ROTATIONS = [1]
CHUNK = 2
NAMES = ("x", "square", "rotated")  # decrypted before the refresh
REFRESHED = "refreshed"  # and after it
N_VAL = 30  # the plan's validation rows (`refresh_plan`)
LENGTH = 8
TIMEOUT_S = 240.0


def schedule_of(context):  # noqa: ANN001, ANN201 - an OpenFHE context; a KeySchedule
    """The public plan's key rounds (the same for every party and the cloud)."""
    return key_schedule(context, PARAMS, ROTATIONS, KERNEL_ROTATIONS, None, CHUNK)


def refresh_plan() -> TrainingPlan:
    """The public plan the members' refresh ledgers follow (the same in every process)."""
    x_train, _, x_val, _ = toy_problem(2, n_train=100, n_val=N_VAL, seed=2)
    config = TrainConfig(learning_rate=1.0, momentum=0.5, epochs=2, batch_size=64, patience=3)
    return TrainingPlan.create(PARAMS, x_train, x_val, 2, config)


def alone(party: ThresholdParty, ciphertext: bytes) -> list[float]:
    """What this hospital's own decryption share decodes to without the others'."""
    request = request_id_of(ciphertext)
    share = RoundMessage.from_bytes(party.decryption_share(request, ciphertext), party.job_id,
                                    round_of_decryption(request)).payload
    try:
        fused = party.context.MultipartyDecryptFusion(
            [ofhe.DeserializeCiphertextString(share, ofhe.BINARY)])
        fused.SetLength(LENGTH)
        return [float(v) for v in fused.GetRealPackedValue()]
    except RuntimeError:  # OpenFHE refusing to decode is also "cannot decrypt"
        return [float("nan")] * LENGTH


def share_window(party: ThresholdParty, ciphertext: bytes) -> str:
    """48 bytes from the middle of this hospital's unsealed decryption share (hex)."""
    request = request_id_of(ciphertext)
    share = RoundMessage.from_bytes(party.decryption_share(request, ciphertext), party.job_id,
                                    round_of_decryption(request)).payload
    middle = len(share) // 2
    return share[middle : middle + 48].hex()


def plaintext_in(data: bytes, needles: list[str]) -> list[str]:
    """The needles found where a number starts, not inside one (a log timestamp's
    "12.0714293" holds "0.0714"; tests/test_service.py)."""
    text = data.decode("latin-1")
    return [n for n in needles if re.search(rf"(?<![\d.]){re.escape(n)}", text)]


def main(url: str, consortium_id: str, token: str, out: Path) -> None:
    client = ConsortiumClient(url, consortium_id, token)
    sealing_key = new_sealing_key()
    roster = exchange_roster(client, sealing_key, TIMEOUT_S)
    context = joint_context(PARAMS)
    party = ThresholdParty(consortium_id, client.index, client.n_hospitals, context)
    answer_key_rounds(party, client, schedule_of(context), sealing_key, roster, TIMEOUT_S)
    member = ConsortiumMember(party, sealing_key, roster, RemoteMailbox(client, TIMEOUT_S))
    learnt: dict = {"index": client.index, "values": {}, "alone": {}, "shares": []}
    refresher = MemberRefresher(party, PARAMS, refresh_plan(), out.with_suffix(".ledger"))
    for name in (*NAMES, REFRESHED):
        if name == REFRESHED:
            serve_refreshes(refresher, client, 1, timeout_s=TIMEOUT_S)
        round_name = f"ciphertext-{name}"
        data = RoundMessage.from_bytes(client.cloud_message(round_name, TIMEOUT_S),
                                       consortium_id, round_name, CLOUD_PARTY).payload
        member.post_shares(data)
        values = member.decrypt(ofhe.DeserializeCiphertextString(data, ofhe.BINARY), LENGTH)
        learnt["values"][name] = [float(v) for v in np.asarray(values)]
        learnt["alone"][name] = alone(party, data)
        learnt["shares"].append(share_window(party, data))
    member.attach_plan(refresh_plan(), N_VAL)  # then a training's decryptions, by its judge
    learnt["weights"] = [float(w) for w in np.ravel(serve_decisions(member, client, TIMEOUT_S))]
    learnt["losses"] = {str(e): v for e, v in member.judge.losses.items()}
    learnt["fingerprints"] = [roster.fingerprint(i) for i in range(client.n_hospitals)]
    out.write_text(json.dumps(learnt))
    client.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
