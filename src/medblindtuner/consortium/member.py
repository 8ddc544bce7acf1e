"""A hospital of a consortium: its secret share, its sealing key, its own early-stopping judge.

Every hospital decides for itself whether to reveal a value: it posts its sealed decryption
share of an epoch's validation loss only for the epoch its judge expects next, and of the
model only once training is over and for the epoch its judge chose. Each hospital then opens
the others' shares, fuses all n and runs the same `HospitalJudge` as a single key holder, so
every hospital computes the decision itself; the cloud goes on only when all agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.he.ciphertexts import atomic_write_json, ciphertext_to_bytes
from medblindtuner.he.threshold import ThresholdParty, fuse_decryption_shares, request_id_of
from medblindtuner.hospital.crypto import HospitalJudge, JudgeRefusal, decrypt_weights
from medblindtuner.training.plan import TrainingPlan

from .sealing import Mailbox, Roster, open_share, seal_share

JUDGE_STATE, SHARED_STATE = "judge.json", "shared.json"


class ConsortiumMember:
    """One hospital's side of threshold decryption (also the `keys` its judge decrypts with)."""

    def __init__(self, party: ThresholdParty, sealing_key, roster: Roster,
                 mailbox: Mailbox):
        if roster.job_id != party.job_id or len(roster.public_keys) != party.n_parties:
            raise ValueError("the roster does not describe this party's job")
        self.party = party
        self.sealing_key = sealing_key
        self.roster = roster
        self.mailbox = mailbox
        self.plan: TrainingPlan | None = None
        self.judge: HospitalJudge | None = None
        self.shared_losses: dict[int, str] = {}  # epoch -> request shared for it
        self.shared_model: tuple[str, ...] | None = None
        self.state_dir: Path | None = None

    @property
    def index(self) -> int:
        return self.party.index

    def attach_plan(self, plan: TrainingPlan, n_val: int, state_dir: Path | None = None) -> None:
        """The agreed public plan and the union's validation count: this hospital's judge.
        `state_dir` (this hospital's own folder): the judge's state (`judge.json`: decrypted
        losses, decisions, decryptions spent) and what this member shared (`shared.json`)
        persist there, so a restarted hospital answers the same and shares nothing else."""
        self.plan = plan
        self.state_dir = Path(state_dir) if state_dir is not None else None
        judge_path = None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            judge_path = self.state_dir / JUDGE_STATE
            shared = self.state_dir / SHARED_STATE
            if shared.exists():
                saved = json.loads(shared.read_text())
                self.shared_losses = {int(e): str(r) for e, r in saved["losses"].items()}
                model = saved.get("model")
                self.shared_model = tuple(model) if model is not None else None
        self.judge = HospitalJudge(self, plan, n_val, judge_path)

    def _save_shared(self) -> None:
        """Record what is about to be shared (before the shares leave)."""
        if self.state_dir is not None:
            atomic_write_json(self.state_dir / SHARED_STATE, {
                "losses": {str(e): r for e, r in self.shared_losses.items()},
                "model": list(self.shared_model) if self.shared_model is not None else None})

    # ---- what leaves this hospital: sealed shares, by its own judge's rules ------------------
    def post_shares(self, ciphertext: bytes) -> str:
        """Seal this hospital's decryption share of `ciphertext` to every other hospital."""
        request = request_id_of(ciphertext)
        share = self.party.decryption_share(request, ciphertext)
        for other in range(self.party.n_parties):
            if other != self.index:
                self.mailbox.post(seal_share(self.sealing_key, self.roster, self.index, other,
                                             request, share))
        return request

    def share_validation_loss(self, epoch: int, ciphertext: bytes) -> str:
        """Share the loss of `epoch` only if this hospital's judge would answer it."""
        judge = self._judge()
        request = request_id_of(ciphertext)
        if self.shared_losses.get(epoch, request) != request:
            raise JudgeRefusal(f"hospital {self.index}: asked to decrypt a second, different "
                               f"loss of epoch {epoch}: refused")
        if epoch not in judge.answers and epoch not in self.shared_losses:
            expected = max(judge.answers, default=0) + 1
            if judge.stopped or epoch != expected or epoch > judge.plan.config.epochs:
                raise JudgeRefusal(f"hospital {self.index}: the cloud asked to decrypt the loss "
                                   f"of epoch {epoch}; this hospital expects epoch {expected}"
                                   f"{' (stopped)' if judge.stopped else ''}: refused")
        self.shared_losses[epoch] = request
        self._save_shared()
        return self.post_shares(ciphertext)

    def share_model(self, best_epoch: int, ciphertexts: list[bytes]) -> list[str]:
        """Share the model only after training ended, and only the epoch this judge chose."""
        judge = self._judge()
        finished = judge.stopped or max(judge.answers, default=0) >= judge.plan.config.epochs
        if not finished or best_epoch != judge.best_epoch:
            raise JudgeRefusal(f"hospital {self.index}: asked to decrypt the model of epoch "
                               f"{best_epoch}; this hospital's judge chose epoch "
                               f"{judge.best_epoch}{'' if finished else ' and is not done'}: "
                               "refused")
        requests = tuple(request_id_of(ct) for ct in ciphertexts)
        if self.shared_model not in (None, requests):
            raise JudgeRefusal(f"hospital {self.index}: the model was already decrypted; a "
                               "second, different one is refused")
        self.shared_model = requests
        self._save_shared()
        return [self.post_shares(ct) for ct in ciphertexts]

    # ---- what this hospital learns: all n shares fused here ----------------------------------
    def decrypt(self, ciphertext: ofhe.Ciphertext, length: int | None = None) -> np.ndarray:
        """Fuse this hospital's share with the others' sealed ones (refused unless all n)."""
        data = ciphertext_to_bytes(ciphertext)
        request = request_id_of(data)
        shares = [self.party.decryption_share(request, data)]
        for envelope in self.mailbox.fetch(self.roster.job_id, request, self.index):
            shares.append(open_share(self.sealing_key, self.roster, self.index, request,
                                     envelope)[1])
        return fuse_decryption_shares(self.party.context, shares, self.roster.job_id, request,
                                      self.party.n_parties, length or ciphertext.GetSlots())

    def decrypt_model(self, ciphertexts: list[ofhe.Ciphertext]) -> np.ndarray:
        return decrypt_weights(self, self._plan(), ciphertexts)

    def _judge(self) -> HospitalJudge:
        if self.judge is None:
            raise JudgeRefusal(f"hospital {self.index} has no plan yet: nothing is decrypted")
        return self.judge

    def _plan(self) -> TrainingPlan:
        if self.plan is None:
            raise JudgeRefusal(f"hospital {self.index} has no plan yet")
        return self.plan
