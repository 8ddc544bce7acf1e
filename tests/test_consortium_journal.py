"""What a hospital keeps before it posts (`consortium.journal`) and a key ceremony kept as it
goes (`he.threshold_progress`), without a service: the kept bytes win for a message made anew
from the same content, other bytes of a deterministic message are refused, the files are the
hospital's own (0600 in 0700 folders), a resumed party answers its rounds with the same
bytes and the same share, and a restarted `refresh` role posts its ledger's last share
again."""

from __future__ import annotations

import stat

import httpx
import pytest

from medblindtuner.consortium.journal import (
    JournaledClient,
    JournalError,
    PostJournal,
    kind_of,
)
from medblindtuner.consortium.relayed_training import post_last_share_again
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.he.threshold import (
    PARTY_SHARE,
    RoundError,
    RoundMessage,
    joint_context,
    joint_params,
)
from medblindtuner.he.threshold_progress import resume_party
from medblindtuner.hospital.client import ServiceError


def test_kept_bytes_win_for_remade_messages_and_others_must_match(tmp_path):
    journal = PostJournal(tmp_path / "state" / "posted")
    assert journal.keep("round-rows-0-train-0-x_dup-0", b"first", remade=True) == b"first"
    assert journal.keep("round-rows-0-train-0-x_dup-0", b"again", remade=True) == b"first"
    assert journal.keep("round-loss-1-0", b"decision", remade=False) == b"decision"
    assert journal.keep("round-loss-1-0", b"decision", remade=False) == b"decision"
    with pytest.raises(JournalError, match="other bytes"):
        journal.keep("round-loss-1-0", b"another decision", remade=False)
    with pytest.raises(JournalError, match="slot name"):
        journal.keep("../escape", b"x", remade=True)
    for folder in (tmp_path / "state", journal.directory):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for kept in journal.directory.iterdir():
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_kinds_of_rounds():
    assert [kind_of(r) for r in ("rows-1", "refresh-0-share", "relin-2", "automorphisms-3",
                                 "roster", "public-key", "loss-2", "model")] == [
        "rows", "refresh", "key_round", "key_round", "key_round", "key_round", "decision",
        "other"]


def test_a_resumed_party_answers_with_the_same_share_and_bytes(tmp_path):
    params = joint_params(params_for_mode(HOSPITAL, insecure=True))
    context = joint_context(params)
    first = resume_party(tmp_path / "ceremony", "job", 0, 2, context)
    public_key = first.public_key_round()
    relin = first.relin_share()
    assert stat.S_IMODE((tmp_path / "ceremony" / PARTY_SHARE).stat().st_mode) == 0o600
    again = resume_party(tmp_path / "ceremony", "job", 0, 2, joint_context(params))
    assert again.public_key_round() == public_key and again.relin_share() == relin
    assert again._secret_key() is not None
    with pytest.raises(RoundError, match="not party 1"):
        resume_party(tmp_path / "ceremony", "job", 1, 2, context)


class _Relay:
    """A client stub: the cloud's share request of refresh 0, what the hospital posts."""

    consortium_id, index = "job", 1

    def __init__(self, asked: bool) -> None:
        self.asked, self.posted = asked, []

    def round_message(self, topic: str, party: int, timeout_s: float) -> bytes:
        if not self.asked:
            raise ServiceError(404, "not yet")
        return RoundMessage("job", topic, party, b"request").to_bytes()

    def post_round(self, message: bytes) -> None:
        self.posted.append(message)


def test_a_restarted_refresh_role_posts_its_ledgers_last_share_again():
    answers = []

    def answer(request: bytes) -> bytes:
        answers.append(request)
        return b"kept share"

    relay = _Relay(asked=True)
    post_last_share_again(_Ledger(1, answer), relay)
    assert answers == [b"request"]
    posted = RoundMessage.from_bytes(relay.posted[0], "job", "refresh-0-share", 1)
    assert posted.payload == b"kept share"
    for finished, asked in ((0, True), (1, False)):  # nothing shared yet; not asked (404)
        relay = _Relay(asked)
        post_last_share_again(_Ledger(finished, answer), relay)
        assert relay.posted == []


class _Ledger:
    def __init__(self, finished: int, answer) -> None:  # noqa: ANN001 - a callable
        self.finished, self.answer = finished, answer

    def __call__(self, request: bytes) -> bytes:
        return self.answer(request)


def test_the_keys_journal_does_not_copy_what_the_party_keeps(tmp_path):
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json={})

    client = JournaledClient("http://relay", "job", "token", PostJournal(tmp_path / "keys"),
                             ("public-key", "relin-", "automorphisms-"),
                             transport=httpx.MockTransport(answer))
    share = RoundMessage("job", "relin-1", 1, b"share").to_bytes()
    roster = RoundMessage("job", "roster", 1, b"sealing public key").to_bytes()
    client.post_round(share)
    client.post_round(roster)
    assert seen == [share, roster]
    assert [p.name for p in (tmp_path / "keys").iterdir()] == ["round-roster-1.msg"]
