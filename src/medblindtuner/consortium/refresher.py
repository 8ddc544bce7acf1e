"""A consortium member's side of the joint refresh: the planned refreshes only, in order,
each once, persisted (the n-party counterpart of `hospital.refresher`).

Every refresh has three phases (`he.joint_refresh`); the member keeps a ledger entry per
refresh index and answers by these rules:

* the request names this job (`TrainingPlan.job_tag`) and its c1 matches its digest;
* a new index starts only with "commit", only as the next one (0, 1, 2, ...) after the
  previous refresh was shared, below the plan's `max_refreshes` and before its judge stopped;
  the member draws its a_i then and keeps it (the same commitment when asked again);
* "reveal" only once the request carries all n commitments, its own among them; the set is
  recorded the first time and a different set later is refused (a cloud that shows parties
  different commitments cannot get a second reveal under another set);
* "share" only once all n reveals match the recorded commitments; the answer is computed
  once and given again for the same request (a lost answer), never for other bytes;
* files (a_i, the share) are written before the ledger, atomically, so a crash never leaves
  an answer the ledger does not know.

Refusals name only the index, the job and the rule: nothing here decrypts or decodes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openfhe as ofhe

from medblindtuner.formats import atomic_write_bytes
from medblindtuner.he.ciphertexts import atomic_write_json, ciphertext_to_bytes
from medblindtuner.he.joint_refresh import (
    CLOUD,
    JointMessage,
    by_party,
    check_reveals,
    commitment,
    common_element,
)
from medblindtuner.he.params import CkksParams
from medblindtuner.he.refresh import RefreshError, _ciphertext, request_levels
from medblindtuner.he.threshold import ThresholdParty
from medblindtuner.hospital.refresher import KEPT_ANSWERS, RefreshRefusal
from medblindtuner.training.plan import TrainingPlan


class MemberRefresher:
    """Answers one job's joint refresh messages for one member (`__call__`: bytes in, bytes
    out). `state_dir`: ledger and kept files (None: in memory); `stopped`: whether this
    member's judge has stopped training (no new refresh after a stop)."""

    def __init__(self, party: ThresholdParty, params: CkksParams, plan: TrainingPlan,
                 state_dir: Path | None = None,
                 stopped: Callable[[], bool] = lambda: False) -> None:
        if not params.refreshed_by_hospital:
            raise RefreshRefusal("this job's parameters bootstrap on the cloud: the members "
                                 "answer no refresh")
        self.party, self.params, self.plan = party, params, plan
        self.job = plan.job_tag(params)
        self.stopped = stopped
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.finished = 0  # refreshes shared so far (the next index)
        self.records: dict[int, dict] = {}  # index -> {digest, commits, shared}
        self.files: dict[str, bytes] = {}  # in memory when there is no state_dir
        self._levels: range | None = None
        # in memory only, to spare parsing and hashing (a restart reads the files again):
        # own a_i of the refreshes not yet shared (bytes, element, commitment) and the last
        # request's parsed c1
        self._own: dict[int, tuple[bytes, ofhe.Ciphertext, bytes]] = {}
        self._request: tuple[str, ofhe.Ciphertext] | None = None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self._ledger.exists():
                saved = json.loads(self._ledger.read_text())
                if saved.get("job") != self.job or saved.get("party") != party.index:
                    raise RefreshRefusal(f"{self._ledger} belongs to another job or member")
                self.finished = int(saved["finished"])
                self.records = {int(k): v for k, v in saved["records"].items()}

    @property
    def index(self) -> int:
        return self.party.index

    @property
    def _ledger(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "ledger.json"

    def __call__(self, message_bytes: bytes) -> bytes:
        message = JointMessage.from_bytes(message_bytes)
        if message.party != CLOUD:
            raise RefreshRefusal(f"member {self.index}: a refresh request comes from the cloud "
                                 f"(party {CLOUD}), not party {message.party}: refused")
        if message.job != self.job:
            raise RefreshRefusal(f"member {self.index}: refresh {message.index} names job "
                                 f"{message.job!r}; this member refreshes job {self.job!r} "
                                 "only: refused")
        message.c1  # noqa: B018 - checks c1 against the request's digest
        record = self.records.get(message.index)
        if record is None:
            record = self._start(message)
        elif record["digest"] != message.request_digest:
            raise RefreshRefusal(f"member {self.index}: refresh {message.index} was already "
                                 "asked for another ciphertext: a refresh is answered once; "
                                 "refused")
        if message.phase == "commit":
            return self._reply(message, [self._own_element(message)[2]])
        if message.phase == "reveal":
            return self._reveal(message, record)
        return self._share(message, record)

    # ---- phases -------------------------------------------------------------------------
    def _start(self, message: JointMessage) -> dict:
        index = message.index
        if message.phase != "commit":
            raise RefreshRefusal(f"member {self.index}: {message.phase!r} asked for refresh "
                                 f"{index}, which this member has not committed to: refused")
        if index < self.finished:
            raise RefreshRefusal(f"member {self.index}: refresh {index} was answered long ago "
                                 "(no longer kept): refused")
        if self.stopped():
            raise RefreshRefusal(f"member {self.index}: refresh {index} asked after this "
                                 "member's judge stopped training: refused")
        if index >= self.plan.max_refreshes:
            raise RefreshRefusal(f"member {self.index}: refresh {index} is beyond the plan's "
                                 f"{self.plan.max_refreshes} refreshes: refused")
        if index != self.finished:
            raise RefreshRefusal(f"member {self.index}: refresh {index} asked; the plan allows "
                                 f"only refresh {self.finished} next: refused")
        self._check_shape(message)
        record = {"digest": message.request_digest, "commits": None, "shared": False}
        element = self.party.random_element()
        data = ciphertext_to_bytes(element)
        self._write(index, "a", data)
        self._own[index] = (data, element, commitment(self.job, index, self.index,
                                                      message.request_digest, data))
        self.records[index] = record
        self._save()
        return record

    def _reveal(self, message: JointMessage, record: dict) -> bytes:
        n = self.party.n_parties
        commits = by_party(message.parts[1:], "commit", message.index, self.job,
                           message.request_digest, n)
        values = [c.parts[0].decode("ascii", "replace") if len(c.parts) == 1 else ""
                  for c in commits]
        own, _element, mine_bytes = self._own_element(message)
        mine = mine_bytes.decode()
        if values[self.index] != mine:
            raise RefreshRefusal(f"member {self.index}: the commitments of refresh "
                                 f"{message.index} do not hold this member's own: refused")
        if record["commits"] is None:
            record["commits"] = values
            self._save()
        elif record["commits"] != values:
            raise RefreshRefusal(f"member {self.index}: refresh {message.index} was revealed "
                                 "against other commitments: refused")
        return self._reply(message, [own])

    def _share(self, message: JointMessage, record: dict) -> bytes:
        index = message.index
        if record["commits"] is None:
            raise RefreshRefusal(f"member {self.index}: refresh {index} has no recorded "
                                 "commitments (reveal comes first): refused")
        if record["shared"]:
            return self._read(index, "share")
        reveals = by_party(message.parts[1:], "reveal", index, self.job,
                           message.request_digest, self.party.n_parties)
        recorded = [JointMessage("commit", index, self.job, i, message.request_digest,
                                 (c.encode(),)) for i, c in enumerate(record["commits"])]
        try:
            check_reveals(reveals, recorded)
        except RefreshError as exc:
            raise RefreshRefusal(f"member {self.index}: {exc}") from exc
        a = common_element(self.party.context, reveals,
                           {self.index: self._own_element(message)[1]})
        h0, h1 = self.party.refresh_share(self._check_shape(message), a)
        answer = self._reply(message, [ciphertext_to_bytes(h0), ciphertext_to_bytes(h1)])
        self._write(index, "share", answer)
        record["shared"] = True
        self.finished = index + 1
        self._own.pop(index, None)  # a reveal asked again reads the kept file
        for old in [k for k in self.records if k <= index - KEPT_ANSWERS]:
            del self.records[old]
            for kind in ("a", "share"):
                self._delete(old, kind)
        self._save()
        return answer

    # ---- helpers ------------------------------------------------------------------------
    def _own_element(self, message: JointMessage) -> tuple[bytes, ofhe.Ciphertext, bytes]:
        """This member's a_i of the message's refresh: its bytes, the element and its
        commitment (from memory, or after a restart from the kept file)."""
        index = message.index
        if index not in self._own:
            data = self._read(index, "a")
            self._own[index] = (data, _ciphertext(data, "this member's kept random element"),
                                commitment(self.job, index, self.index,
                                           message.request_digest, data))
        return self._own[index]

    def _check_shape(self, message: JointMessage):
        if self._request is not None and self._request[0] == message.request_digest:
            return self._request[1]  # checked when this refresh began
        c1 = _ciphertext(message.c1, "the refresh request")
        if self._levels is None:
            self._levels = request_levels(self.party.context, self.party.joint_public_key,
                                          self.params)
        if c1.NumberCiphertextElements() != 1 or c1.GetLevel() not in self._levels:
            raise RefreshRefusal(f"member {self.index}: refresh request {message.index} holds "
                                 f"{c1.NumberCiphertextElements()} element(s) at level "
                                 f"{c1.GetLevel()}; a request is c1 alone at level "
                                 f"{self._levels.start} to {self._levels.stop - 1}: refused")
        self._request = (message.request_digest, c1)
        return c1

    def _reply(self, message: JointMessage, parts: list[bytes]) -> bytes:
        return JointMessage(message.phase, message.index, self.job, self.index,
                            message.request_digest, tuple(parts)).to_bytes()

    def _name(self, index: int, kind: str) -> str:
        return f"{kind}_{index:07d}.bin"

    def _write(self, index: int, kind: str, data: bytes) -> None:
        if self.state_dir is None:
            self.files[self._name(index, kind)] = data
        else:
            atomic_write_bytes(self.state_dir / self._name(index, kind), data)

    def _read(self, index: int, kind: str) -> bytes:
        if self.state_dir is None:
            return self.files[self._name(index, kind)]
        return (self.state_dir / self._name(index, kind)).read_bytes()

    def _delete(self, index: int, kind: str) -> None:
        self.files.pop(self._name(index, kind), None)
        if self.state_dir is not None:
            (self.state_dir / self._name(index, kind)).unlink(missing_ok=True)

    def _save(self) -> None:
        if self.state_dir is not None:
            atomic_write_json(self._ledger, {"job": self.job, "party": self.index,
                                             "finished": self.finished, "records": {
                                                 str(k): v for k, v in self.records.items()}})
