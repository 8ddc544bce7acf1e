"""Refresh by n key-share holders (he.joint_refresh, consortium.refresher), insecure test ring.

Three parties under a joint key: the refreshed ciphertext decrypts (threshold, all three) to
its input within 1e-4 (measured ~1e-5 at ring 2^12, 45-bit scaling: each party's share adds
OpenFHE's flooding noise), at level 0. Without one party's share the refresh cannot finish,
and a forged sum of two shares decrypts to nothing. Each member answers only the planned
refreshes, in order, once each, persisted, and refuses foreign, repeated and re-committed
requests.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_he import toy_problem

from medblindtuner.consortium.ceremony import make_parties
from medblindtuner.consortium.refresher import MemberRefresher
from medblindtuner.he.ciphertexts import ciphertext_to_bytes
from medblindtuner.he.joint_refresh import (
    CLOUD,
    JointCloudRefresher,
    JointMessage,
    RefreshPaused,
    by_party,
    common_element,
)
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.he.refresh import RefreshError, max_refresh_level
from medblindtuner.he.threshold import joint_params
from medblindtuner.hospital.refresher import RefreshRefusal
from medblindtuner.training.plain import TrainConfig
from medblindtuner.training.plan import TrainingPlan

TOL = 1e-4
N = 3
CONFIG = TrainConfig(learning_rate=1.0, momentum=0.5, epochs=2, batch_size=64, patience=3)


@pytest.fixture(scope="module")
def joint():
    params = joint_params(params_for_mode(HOSPITAL, insecure=True))
    x_train, _, x_val, _ = toy_problem(2, n_train=100, n_val=30, seed=2)
    plan = TrainingPlan.create(params, x_train, x_val, 2, CONFIG)
    context, parties, bootstrap = make_parties("job-r", params, N)
    assert bootstrap == []  # refresh mode: no bootstrapping keys at all
    chain: list[bytes] = []
    for party in parties:
        chain.append(party.public_key_round(chain[-1] if chain else None))
    for party in parties:
        party.accept_joint_public_key(chain[-1])
    return params, plan, context, parties


def encrypt(joint, values, level):
    params, _plan, context, parties = joint
    plain = context.MakeCKKSPackedPlaintext(values, 1, level, None, params.slots)
    return context.Encrypt(parties[0].joint_public_key, plain)


def decrypt(joint, ct) -> np.ndarray:
    params, _plan, context, parties = joint
    shares = [context.MultipartyDecryptLead([ct], parties[0]._secret_key())[0]]
    shares += [context.MultipartyDecryptMain([ct], p._secret_key())[0] for p in parties[1:]]
    plain = context.MultipartyDecryptFusion(shares)
    plain.SetLength(params.slots)
    return np.asarray(plain.GetRealPackedValue())


def members_of(joint, root=None, **kwargs) -> list[MemberRefresher]:
    params, plan, _context, parties = joint
    return [MemberRefresher(p, params, plan, None if root is None else root / f"m{p.index}",
                            **kwargs) for p in parties]


def cloud_of(joint, members, journal=None) -> JointCloudRefresher:
    params, plan, context, parties = joint
    return JointCloudRefresher(context, params, parties[0].joint_public_key, members,
                               plan.job_tag(params), journal)


def test_three_party_refresh_equals_its_input_at_level_zero(joint, tmp_path):
    params = joint[0]
    values = np.random.default_rng(0).uniform(-4, 4, params.slots)
    cloud = cloud_of(joint, members_of(joint, tmp_path))
    ct = encrypt(joint, values, max_refresh_level(params) - 1)
    ct = joint[2].EvalMult(ct, 1.0)  # a pending rescale: effective level = the maximum
    fresh = cloud.refresh(ct, 0)
    assert fresh.GetLevel() == 0
    assert np.max(np.abs(decrypt(joint, fresh) - values)) < TOL
    assert len(cloud.round_trips) == 1 and all(s > 0 for s in cloud.round_trips[0])


def test_a_missing_member_stops_the_refresh(joint):
    params, _plan, context, parties = joint
    members = members_of(joint)

    def offline(_message: bytes) -> bytes:
        raise ConnectionError("hospital 2 is offline")

    ct = encrypt(joint, np.ones(params.slots), 0)
    with pytest.raises(RefreshPaused, match="paused in phase 'commit': member 2 did not answer"):
        cloud_of(joint, members[:2] + [offline]).refresh(ct, 0)
    # a cloud that pretends the consortium has two members gets no share: every member
    # waits for all n commitments before revealing anything
    two = cloud_of(joint, members[:2])
    with pytest.raises(RefreshError, match="needs one answer from each of the 3 parties"):
        by_party([], "commit", 0, two.job, "", N)
    adjusted, request = two.prepare(ct, 0)
    commits = [JointMessage.from_bytes(m(JointMessage("commit", 0, two.job, CLOUD,
                                                      request.digest, (request.c1,)).to_bytes()))
               for m in members[:2]]
    with pytest.raises(RefreshError, match="cannot finish"):
        members[0](JointMessage("reveal", 0, two.job, CLOUD, request.digest,
                                (request.c1, *[c.to_bytes() for c in commits])).to_bytes())
    # and two parties' shares summed do not refresh: the result decrypts to nothing
    c1 = adjusted.Clone()
    c1.RemoveElement(0)
    a = common_element(context, [JointMessage("reveal", 0, "j", i, "d", (
        ciphertext_to_bytes(p.random_element()),)) for i, p in enumerate(parties)])
    shares = [list(p.refresh_share(c1, a)) for p in parties[:2]]
    partial = context.IntMPBootEncrypt(parties[0].joint_public_key,
                                       context.IntMPBootAdd(shares), a, adjusted)
    try:
        error = np.max(np.abs(decrypt(joint, partial) - 1.0))
    except RuntimeError:  # OpenFHE: "approximation error is too high"
        error = np.inf
    assert error > 1.0


def test_members_answer_only_the_plan_in_order_once(joint, tmp_path):
    params, plan, _context, _parties = joint
    members = members_of(joint, tmp_path)
    cloud = cloud_of(joint, members)
    ct = encrypt(joint, np.ones(params.slots), 0)
    fresh = cloud.refresh(ct, 0)
    assert np.max(np.abs(decrypt(joint, fresh) - 1.0)) < TOL
    # another ciphertext (fresh encryption randomness: other c1) under the same index
    _, request = cloud.prepare(encrypt(joint, np.ones(params.slots), 0), 0)

    def ask(member, phase, index=0, job=cloud.job, req=request, extra=()):
        return member(JointMessage(phase, index, job, CLOUD, req.digest,
                                   (req.c1, *extra)).to_bytes())

    with pytest.raises(RefreshRefusal, match="already asked for another ciphertext"):
        ask(members[0], "commit")
    with pytest.raises(RefreshRefusal, match="only refresh 1 next"):
        ask(members[0], "commit", index=2)
    with pytest.raises(RefreshRefusal, match="names job"):
        ask(members[0], "commit", index=1, job="0" * 16)
    with pytest.raises(RefreshRefusal, match="beyond the plan"):
        ask(members[0], "commit", index=plan.max_refreshes)
    with pytest.raises(RefreshRefusal, match="not committed"):
        ask(members[0], "share", index=1)
    with pytest.raises(RefreshError):
        members[0](b"not a message")
    # a commitment set the cloud altered after a reveal: no second reveal, no share
    _, second = cloud.prepare(ct, 1)
    commits = [ask(m, "commit", 1, req=second) for m in members]
    assert ask(members[1], "commit", 1, req=second) == commits[1]  # asked again: same bytes
    reveals = [ask(m, "reveal", 1, req=second, extra=commits) for m in members]
    forged = JointMessage("commit", 1, cloud.job, 2, second.digest, (b"0" * 64,)).to_bytes()
    with pytest.raises(RefreshRefusal, match="do not hold|other commitments"):
        ask(members[1], "reveal", 1, req=second, extra=[*commits[:2], forged])
    bad_reveal = JointMessage("reveal", 1, cloud.job, 2, second.digest,
                              (JointMessage.from_bytes(reveals[0]).parts[0],)).to_bytes()
    with pytest.raises(RefreshRefusal, match="does not match its commitment"):
        ask(members[0], "share", 1, req=second, extra=[*reveals[:2], bad_reveal])
    share = ask(members[0], "share", 1, req=second, extra=reveals)
    assert ask(members[0], "share", 1, req=second, extra=reveals) == share
    # the ledger survives a restart: the same answer, the same order
    again = MemberRefresher(joint[3][0], params, plan, tmp_path / "m0")
    assert again.finished == 2
    assert ask(again, "share", 1, req=second, extra=reveals) == share
    stopped = MemberRefresher(joint[3][0], params, plan, tmp_path / "m0",
                              stopped=lambda: True)
    with pytest.raises(RefreshRefusal, match="stopped"):
        ask(stopped, "commit", 2, req=cloud.prepare(ct, 2)[1])


def test_cloud_journal_finishes_the_same_refresh_after_a_crash(joint, tmp_path):
    params = joint[0]
    members = members_of(joint, tmp_path / "members")
    calls = []

    def flaky(message: bytes) -> bytes:
        answer = members[2](message)
        calls.append(JointMessage.from_bytes(message).phase)
        if calls == ["commit", "reveal", "share"]:
            raise ConnectionError("the cloud died before reading the last share")
        return answer

    ct = encrypt(joint, np.full(params.slots, 0.5), 0)
    crashed = cloud_of(joint, members[:2] + [flaky], journal=tmp_path / "journal")
    with pytest.raises(RefreshPaused, match="member 2 did not answer"):
        crashed.refresh(ct, 0)
    resumed = cloud_of(joint, members[:2] + [flaky], journal=tmp_path / "journal")
    fresh = resumed.refresh(encrypt(joint, np.zeros(params.slots), 0), 0)  # journaled input
    assert np.max(np.abs(decrypt(joint, fresh) - 0.5)) < TOL
