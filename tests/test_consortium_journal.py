"""What a hospital keeps before it posts (`consortium.journal`) and a key ceremony kept as it
goes (`he.threshold_progress`), without a service: the kept bytes win for a message made anew
from the same content, other bytes of a deterministic message are refused, the files are the
hospital's own (0600 in 0700 folders), and a resumed party answers its rounds with the same
bytes and the same share."""

from __future__ import annotations

import stat

import pytest

from medblindtuner.consortium.journal import JournalError, PostJournal, kind_of
from medblindtuner.he.params import HOSPITAL, params_for_mode
from medblindtuner.he.threshold import PARTY_SHARE, RoundError, joint_context, joint_params
from medblindtuner.he.threshold_progress import resume_party


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
