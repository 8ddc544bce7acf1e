"""The key holder's side of refresh mode: answer exactly the planned refreshes, in order.

Each answer is a masked share (`he.refresh.masked_share`): the cloud learns no plaintext from
it, but every answer is work done with the secret key, so like the early-stopping judge it is a
state machine persisted after every answer:

* a request names this job (`TrainingPlan.job_tag`) and refresh index `k`;
* `k` must be the next one (0, 1, 2, ...) and below the plan's `max_refreshes`, and none is
  answered once the judge has stopped training;
* a request asked again (a re-run after a crash) with the same bytes gets the same answer,
  recorded, without new work; the same index with other bytes is refused;
* the answer's bytes are written before the ledger (both atomically), so a crash never leaves
  an answer the ledger does not know.

Refusals name only the index, the job and the rule: nothing here decrypts or decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.formats import atomic_write_bytes
from medblindtuner.he.ciphertexts import atomic_write_json
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.refresh import (
    RefreshError,
    RefreshRequest,
    masked_share,
    message_bound,
    request_levels,
)
from medblindtuner.he.untrusted import PrewarmedChecker
from medblindtuner.training.plan import TrainingPlan

# Answers kept for a repeated request: the cloud journals every answer it received, so only
# the latest few can be asked again (an answer lost between the hospital and the cloud).
KEPT_ANSWERS = 4


class RefreshRefusal(MedBlindTunerError):
    """The cloud asked for a refresh outside the plan: not answered."""


class HospitalRefresher:
    """Answers the cloud's refresh requests for one job, strictly by plan.

    `stopped`: tells whether the judge has stopped training (no refresh after a stop).
    `state_dir`: the ledger (`ledger.json`) and the latest answers; None keeps them in memory.
    """

    def __init__(self, keys: HospitalKeys, plan: TrainingPlan, state_dir: Path | None = None,
                 stopped=lambda: False) -> None:
        if not keys.params.refreshed_by_hospital:
            raise RefreshRefusal("this job's parameters bootstrap on the cloud: the hospital "
                                 "answers no refresh")
        self.keys = keys
        self.plan = plan
        self.job = plan.job_tag(keys.params)
        self.stopped = stopped
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.digests: dict[int, str] = {}
        self.answers: dict[int, bytes] = {}
        self._levels: range | None = None
        self._parser: PrewarmedChecker | None = None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self._ledger.exists():
                saved = json.loads(self._ledger.read_text())
                self.digests = {int(k): str(v) for k, v in saved["digests"].items()}

    @property
    def _ledger(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "ledger.json"

    def _answer_path(self, index: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"answer_{index:07d}.bin"

    @property
    def answered(self) -> int:
        """How many refreshes this job has had."""
        return len(self.digests)

    def __call__(self, request_bytes: bytes) -> bytes:
        """Answer bytes for one request's bytes from a trusted, in-process cloud, or
        RefreshRefusal / RefreshError."""
        request = self._planned(request_bytes)
        if request.index in self.digests:
            return self._again(request)
        return self._answer_new(request)

    def answer_cloud(self, request_bytes: bytes, index_text: str | None = None) -> bytes:
        """A request exactly as a cloud sent it over the service (and its `X-Refresh-Index`
        header, which must agree): size and framing checked, the plan's rules applied, and
        only then its `c1` parsed in the limited child (`he.untrusted`) before this process
        (which holds the secret key) reads it. Every refusal is a RefreshRefusal."""
        bound = message_bound(self.keys.params)
        if not isinstance(request_bytes, bytes) or len(request_bytes) > bound:
            raise RefreshRefusal(f"a refresh request of these parameters is at most {bound} "
                                 "bytes: refused")
        try:
            request = self._planned(request_bytes)
        except RefreshError as exc:
            raise RefreshRefusal(f"malformed refresh request from the cloud: {exc}") from exc
        if index_text is not None and index_text != str(request.index):
            raise RefreshRefusal(f"the cloud labelled refresh request {request.index} as "
                                 f"{index_text[:20]!r}: refused")
        if request.index in self.digests:
            return self._again(request)
        self._check_next(request.index)
        verdict = self._checker().check(request_bytes, f"refresh request {request.index}")
        if not verdict.ok:
            raise RefreshRefusal(f"refresh request {request.index} is refused: "
                                 f"{verdict.error}")
        try:
            return self._answer_new(request)
        except RefreshError as exc:
            raise RefreshRefusal(str(exc)) from exc

    def _checker(self) -> PrewarmedChecker:
        """The limited children that parse the cloud's requests (the next one started while
        the cloud computes its next request)."""
        if self._parser is None:
            self._parser = PrewarmedChecker("refresh_request", self.keys.params.ring_dim)
        return self._parser

    def close(self) -> None:
        """Stop the spare parsing child (it also ends with this process)."""
        if self._parser is not None:
            self._parser.close()

    def _planned(self, request_bytes: bytes) -> RefreshRequest:
        request = RefreshRequest.from_bytes(request_bytes)
        if request.job != self.job:
            raise RefreshRefusal(f"refresh request {request.index} names job {request.job!r}; "
                                 f"this hospital refreshes job {self.job!r} only: refused")
        return request

    def _answer_new(self, request: RefreshRequest) -> bytes:
        self._check_next(request.index)
        answer = masked_share(self.keys.context, self.keys.secret_key, self.keys.public_key,
                              request, self._request_levels()).to_bytes()
        self._record(request, answer)
        return answer

    def _again(self, request: RefreshRequest) -> bytes:
        if self.digests[request.index] != request.digest:
            raise RefreshRefusal(f"refresh {request.index} was already answered for another "
                                 "ciphertext: a refresh is answered once; refused")
        kept = self.answers.get(request.index)
        stored = None if self.state_dir is None else self._answer_path(request.index)
        if kept is None and stored is not None and stored.exists():
            kept = stored.read_bytes()
        if kept is None:
            raise RefreshRefusal(f"refresh {request.index} was answered long ago (the answer "
                                 "is no longer kept): only the latest can be asked again")
        return kept

    def _check_next(self, index: int) -> None:
        expected = self.answered
        if self.stopped():
            raise RefreshRefusal(f"refresh {index} asked after the hospital stopped training: "
                                 "refused")
        if index >= self.plan.max_refreshes:
            raise RefreshRefusal(f"refresh {index} is beyond the plan's "
                                 f"{self.plan.max_refreshes} refreshes: refused")
        if index != expected:
            raise RefreshRefusal(f"refresh {index} asked; the plan allows only refresh "
                                 f"{expected} next: refused")

    def _request_levels(self) -> range:
        if self._levels is None:
            self._levels = request_levels(self.keys.context, self.keys.public_key,
                                          self.keys.params)
        return self._levels

    def _record(self, request: RefreshRequest, answer: bytes) -> None:
        self.digests[request.index] = request.digest
        self.answers[request.index] = answer
        for old in [k for k in self.answers if k <= request.index - KEPT_ANSWERS]:
            del self.answers[old]
        if self.state_dir is None:
            return
        atomic_write_bytes(self._answer_path(request.index), answer)
        atomic_write_json(self._ledger, {"job": self.job, "digests": {
            str(k): v for k, v in self.digests.items()}})
        self._answer_path(request.index - KEPT_ANSWERS).unlink(missing_ok=True)


__all__ = ["HospitalRefresher", "RefreshError", "RefreshRefusal"]
