"""A consortium job in one process: n hospitals, an in-memory relay, the unchanged trainer.

    result = run_consortium(shards, n_classes=2, params=INSECURE_TEST, allow_insecure=True,
                            workdir=tmp)

In order: sealing keys and roster; settings from securely aggregated statistics (every
hospital computes the same scaler and plan); the joint key rounds; each hospital encrypts its
rows of the union's chunks under the joint key; the cloud adds them into the union's dataset
and trains with `EncryptedTrainer` (refresh mode "bootstrap": joint bootstrapping keys;
"hospital": every refresh through all members, `he.joint_refresh`, the mode that fits the
128-bit ring); each epoch's validation loss and the final model are
decrypted by every hospital from all n sealed shares (`member.ConsortiumMember`). What each
party learns: docs/security.md.

The cloud is `cloud.Cloud.sharing_context` on the ceremony's context rather than a `Cloud`
that opens the bundle (which resets OpenFHE's process-wide key maps and contexts): in one
process the hospitals' shares must stay on the same context as the cloud's ciphertexts. In a
deployment the cloud is its own process and opens the joint bundle with `Cloud`
(`tests/test_threshold.py` does that).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.cloud.cloud import Cloud
from medblindtuner.cloud.trainer import EncryptedState
from medblindtuner.errors import MedBlindTunerError
from medblindtuner.features.preprocess import FeatureScaler
from medblindtuner.he.ciphertexts import ciphertext_to_bytes
from medblindtuner.he.joint_refresh import JointCloudRefresher
from medblindtuner.he.params import CkksParams, require_secure
from medblindtuner.he.threshold import for_decryption, joint_params
from medblindtuner.training.plan import Decision, TrainingPlan

from .agreement import agree_settings
from .ceremony import make_parties, run_key_ceremony
from .data import Ownership, combine_shares, encrypt_decay, encrypt_share
from .member import ConsortiumMember
from .refresher import MemberRefresher
from .sealing import Roster, SealedMailbox, new_sealing_key


class ConsortiumError(MedBlindTunerError, RuntimeError):
    """The hospitals disagree, or a consortium job cannot go on."""


@dataclass(frozen=True)
class HospitalShard:
    """One hospital's own features and labels (never leave it in the clear)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass
class ConsortiumResult:
    plan: TrainingPlan
    params: CkksParams
    scaler: FeatureScaler
    state: EncryptedState
    weights: list[np.ndarray]  # as each hospital decrypted them (all equal)
    losses: list[dict[int, float]]  # each hospital's decrypted validation losses
    scaled: list[HospitalShard]  # each hospital's rows after the agreed scaling (for mirrors)
    seconds: dict[str, float] = field(default_factory=dict)
    relay_bytes: int = 0
    mailbox: SealedMailbox | None = None
    members: list[ConsortiumMember] = field(default_factory=list)
    joint_public_key: ofhe.PublicKey | None = None
    # refresh mode "hospital": seconds waiting on each member, per joint refresh
    refresh_round_trips: list[list[float]] = field(default_factory=list)
    model: list[ofhe.Ciphertext] = field(default_factory=list)  # the best epoch's, encrypted
    settings_why: dict = field(default_factory=dict)  # how width and decay were chosen


def consortium_decide(members: Sequence[ConsortiumMember]
                      ) -> Callable[[int, ofhe.Ciphertext], Decision]:
    """The cloud's `decide`: every hospital shares (sealed) and judges; go on only if all
    hospitals decided the same."""
    def decide(epoch: int, loss: ofhe.Ciphertext) -> Decision:
        loss = for_decryption(loss)
        data = ciphertext_to_bytes(loss)
        for member in members:
            member.share_validation_loss(epoch, data)
        decisions = [member.judge(epoch, loss) for member in members]
        if any(d != decisions[0] for d in decisions):
            raise ConsortiumError(f"the hospitals decided differently at epoch {epoch}: "
                                  f"{decisions}; training pauses")
        return decisions[0]
    return decide


def run_consortium(shards: Sequence[HospitalShard], n_classes: int, params: CkksParams,
                   workdir: Path, job_id: str = "consortium", pca_dims: int | None = None,
                   weight_decay: float | None = None, epochs: int | None = None,
                   allow_insecure: bool = False,
                   log: Callable[[str], None] | None = None) -> ConsortiumResult:
    """The whole job for n >= 2 hospitals (see the module docstring)."""
    require_secure(params, allow_insecure)
    say = log or (lambda _m: None)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    sealing_keys = [new_sealing_key() for _ in shards]
    roster = Roster(job_id, tuple(bytes(k.public_key) for k in sealing_keys))
    mailbox = SealedMailbox()
    agreed = agree_settings(shards, roster, sealing_keys, n_classes, params, pca_dims,
                            weight_decay, epochs, mailbox)
    pooled, scaler, plan = agreed.pooled, agreed.scaler, agreed.plan
    scaled = [HospitalShard(scaler.augment(s.x_train), np.asarray(s.y_train),
                            scaler.augment(s.x_val), np.asarray(s.y_val)) for s in shards]
    seconds["settings"] = time.perf_counter() - start
    say(f"agreed: {pooled.n_train} training rows, {plan.n_features} features, "
        f"{plan.config.epochs} epochs, batch {plan.config.batch_size}")

    start = time.perf_counter()
    keyed = joint_params(params.with_bootstrap_slots(plan.bootstrap_slots))
    context, parties, bootstrap = make_parties(job_id, keyed, len(shards))
    keys = run_key_ceremony(context, keyed, parties, plan.rotation_indices,
                            plan.kernel_rotation_indices, bootstrap)  # files: a temp folder
    seconds["keys"] = time.perf_counter() - start
    seconds.update({f"keys_{k}": v for k, v in keys.seconds.items()})
    say(f"joint keys: {seconds['keys']:.1f} s, {keys.message_bytes / 2**20:.1f} MiB relayed")

    members = [ConsortiumMember(p, k, roster, mailbox) for p, k in zip(parties, sealing_keys,
                                                                       strict=True)]
    for member in members:
        member.attach_plan(plan, pooled.n_val)

    start = time.perf_counter()
    shares, offsets = [], np.cumsum([0] + [len(s.y_train) for s in scaled])
    val_offsets = np.cumsum([0] + [len(s.y_val) for s in scaled])
    for i, shard in enumerate(scaled):
        owned = Ownership(int(offsets[i]), len(shard.y_train), int(val_offsets[i]),
                          len(shard.y_val))
        shares.append(encrypt_share(keys, plan, owned, shard.x_train, shard.y_train,
                                    shard.x_val, shard.y_val, pooled.n_train, pooled.n_val,
                                    agreed.preconditioner))
    seconds["encrypt"] = time.perf_counter() - start

    start = time.perf_counter()
    decay = encrypt_decay(keys, plan, agreed.preconditioner)  # hospital 0, the coordinator
    dataset = combine_shares(context, plan, shares, pooled.n_train, pooled.n_val, decay)
    trainer, state, refresher = train_on_union(dataset, keys, members, Path(workdir),
                                                seconds, say)
    seconds["training"] = time.perf_counter() - start
    say(f"trained: {state.epoch} epochs, best {state.best_epoch}, "
        f"{seconds['training']:.1f} s"
        + ("" if refresher is None else
           f", {len(refresher.round_trips)} joint refreshes of {len(members)} members"))

    start = time.perf_counter()
    model = trainer.weights_of_epoch(state.best_epoch)
    model_bytes = [ciphertext_to_bytes(ct) for ct in model]
    for member in members:
        member.share_model(state.best_epoch, model_bytes)
    weights = [member.decrypt_model(model) for member in members]
    seconds["decrypt_model"] = time.perf_counter() - start
    return ConsortiumResult(plan, keyed, scaler, state, weights,
                            [dict(m.judge.losses) for m in members], scaled, seconds,
                            keys.message_bytes, mailbox, members, keys.public_key,
                            [] if refresher is None else refresher.round_trips, model,
                            agreed.why)


def train_on_union(dataset, keys, members: Sequence[ConsortiumMember], workdir: Path,
                   seconds: dict[str, float], say: Callable[[str], None] = lambda _m: None):
    """The cloud trains on the union (`Cloud.sharing_context`). Refresh mode "hospital": its
    evaluator refreshes through every member (`JointCloudRefresher`), each member answering
    by its own ledger (`MemberRefresher`, none after its judge stopped). Adds the mean step
    time to `seconds`, says a line a step (`say`). Returns (trainer, state, the joint
    refresher or None)."""
    params = keys.params
    cloud = Cloud.sharing_context(keys.context, params, keys.public_key)
    refresher = None
    if params.refreshed_by_hospital:
        plan = members[0].plan
        holders = [MemberRefresher(m.party, params, plan, workdir / f"member-{m.index}" /
                                   "refreshes", stopped=_stopped_of(m)) for m in members]
        refresher = JointCloudRefresher(keys.context, params, keys.public_key, holders,
                                        plan.job_tag(params), workdir / "refresh_journal")
        cloud.evaluator.refresher = refresher
    trainer = cloud.trainer(dataset, workdir / "checkpoints")
    steps: list[float] = []

    def on_step(info: dict) -> None:  # progress: a line a step
        steps.append(info["step_seconds"])
        say(f"  epoch {info['epoch']} step {info['step_in_epoch']}/{info['steps_per_epoch']}: "
            f"{info['step_seconds']:.1f} s")

    state = cloud.train(trainer, decide=consortium_decide(members), on_step=on_step)
    if steps:
        seconds["step_mean"] = float(np.mean(steps))
    return trainer, state, refresher


def _stopped_of(member: ConsortiumMember) -> Callable[[], bool]:
    return lambda: member.judge is not None and member.judge.stopped
