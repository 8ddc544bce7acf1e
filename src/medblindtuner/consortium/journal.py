"""What a hospital posts to the relay, kept in its own state folder before it is posted, so a
hospital killed midway and started again with the same command posts exactly the same bytes
(the service takes the same bytes again for a slot; other bytes are a 409).

    journal = PostJournal(state / "posted")                  # 0700, files 0600
    client = JournaledClient(url, consortium_id, token, journal)
    client.post_round(message)      # kept (atomic write), then posted; a message already
    client.post_sealed(envelope)    # kept for that slot: the kept bytes are posted instead

One file per slot: `round-<round>-<party>.msg` (a `RoundMessage`) or `sealed-<request>-to-
<recipient>.msg` (an envelope). The rule for a slot that already holds a kept message:

* a message that is made anew each time from the same content (the encryption of this
  hospital's rows, `rows-*`; a sealed envelope: a fresh nonce, or a fresh decryption share of
  the same ciphertext) is replaced by the kept bytes: the new ones never leave;
* any other message (key rounds, refresh answers, decisions) must be the same bytes: a
  restored party, ledger and judge make them again exactly; other bytes mean the state was
  not restored, and are refused (`JournalError`) rather than posted.

Failpoints (tests only): `hospital.rows_saved`, `hospital.refresh_saved`,
`hospital.key_round_saved`, `hospital.decision_saved` fire after a new message of that kind is
kept, before it is posted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.failpoints import failpoint
from medblindtuner.formats import fsync_dir

from .client import ConsortiumClient, round_of
from .sealing import read_routing

SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
KEY_ROUNDS = ("roster", "public-key", "relin-", "automorphisms-")


class JournalError(MedBlindTunerError, RuntimeError):
    """A restarted hospital would post other bytes than it posted before: refused."""


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` (mode 0600) so a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def private_dir(path: Path) -> Path:
    """`path` and its missing parents, each created 0700 (this hospital's own folders)."""
    for folder in [*reversed(Path(path).parents), Path(path)]:
        if not folder.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
    return Path(path)


def kind_of(round_name: str) -> str:
    """The failpoint kind of a round: rows, refresh, key_round, decision or other."""
    if round_name.startswith("rows-"):
        return "rows"
    if round_name.startswith("refresh-"):
        return "refresh"
    if round_name.startswith(KEY_ROUNDS):
        return "key_round"
    if round_name.startswith("loss-"):
        return "decision"
    return "other"


class PostJournal:
    """The messages one hospital posted (or is about to post), one file per slot."""

    def __init__(self, directory: Path) -> None:
        self.directory = private_dir(Path(directory))

    def _path(self, slot: str) -> Path:
        if not SAFE.match(slot):
            raise JournalError(f"{slot!r} is not a slot name this journal keeps")
        return self.directory / f"{slot}.msg"

    def kept(self, slot: str) -> bytes | None:
        """The bytes kept for `slot`, None if none."""
        path = self._path(slot)
        return path.read_bytes() if path.exists() else None

    def keep(self, slot: str, data: bytes, remade: bool, kind: str = "other") -> bytes:
        """The bytes to post for `slot`: the kept ones if any (`remade`: made anew from the
        same content, so the new `data` is dropped; else `data` must equal them), else
        `data`, kept first."""
        saved = self.kept(slot)
        if saved is None:
            write_private(self._path(slot), data)
            if kind != "other":
                failpoint(f"hospital.{kind}_saved")
            return data
        if saved != data and not remade:
            raise JournalError(f"{slot}: this hospital posted other bytes before it was "
                               "restarted, and its saved state does not make them again: "
                               "refused (is the state folder the one it ran with?)")
        return saved


def round_slot(message: bytes) -> str:
    size = int.from_bytes(message[:4], "big")
    party = json.loads(message[4 : 4 + size])["party"]
    return f"round-{round_of(message)}-{party}"


class JournaledClient(ConsortiumClient):
    """A `ConsortiumClient` whose every post is kept in `journal` first (see the module)."""

    def __init__(self, base_url: str, consortium_id: str, token: str,
                 journal: PostJournal, kept_elsewhere: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(base_url, consortium_id, token, **kwargs)
        self.journal = journal
        self.kept_elsewhere = kept_elsewhere  # rounds whose maker keeps them before they leave

    def post_round(self, message: bytes) -> dict[str, Any]:
        """Post a round message as kept (see the module); a round of `kept_elsewhere` (a
        key round, kept by `ThresholdParty.keep_progress`) is posted as made, not copied."""
        name = round_of(message)
        if name.startswith(self.kept_elsewhere) and self.kept_elsewhere:
            failpoint(f"hospital.{kind_of(name)}_saved")
            return super().post_round(message)
        kept = self.journal.keep(round_slot(message), message, name.startswith("rows-"),
                                 kind_of(name))
        return super().post_round(kept)

    def post_sealed(self, envelope: bytes) -> dict[str, Any]:
        routing = read_routing(envelope)
        slot = f"sealed-{routing['request']}-to-{routing['recipient']}"
        return super().post_sealed(self.journal.keep(slot, envelope, remade=True))

    def repost(self, slot: str) -> bool:
        """Post the message kept for a round slot again (True), or nothing if none (False)."""
        kept = self.journal.kept(slot)
        if kept is not None:
            super().post_round(kept)
        return kept is not None
