"""Consortium jobs over the service: the relay of n hospitals' key rounds and sealed shares.

A consortium (n >= 2 hospitals, n-of-n threshold CKKS, `consortium/`) needs a relay between
its members; the in-process version is `consortium.ceremony` and `sealing.SealedMailbox`.
Here the relay is the service, with one bearer token per hospital (shown once, stored as
its SHA-256): the token decides the hospital's index, never the URL or the body.

    channel "rounds"  topic = round name   sender = the poster's index (or the cloud, -1)
                      recipient -1 (broadcast): every member of the consortium may read it
    channel "sealed"  topic = request id   sender = the poster's index, recipient = another
                      hospital: only that hospital may read it

A slot (consortium, channel, topic, sender, recipient) holds one message: the same bytes
again are accepted (a retry), other bytes are a 409. The web process reads only each
message's JSON header (`RoundMessage` / sealed routing: job, round or request, party) to
check it names this consortium, the slot and the poster's own index; it never parses OpenFHE
bytes, and a sealed envelope is opaque to it (PyNaCl box: docs/security.md). Bytes are files
in the consortium's folder (written before their row, atomically, under the consortium's
lock), rows hold slots, sizes and SHA-256s only.

The cloud's side (a worker) uses the store directly: `publish` (a round message of the cloud,
e.g. a ciphertext the members are to decrypt) and `read` (every party's message of a round).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from medblindtuner.formats import atomic_write_bytes, fsync_dir, sha256_file
from medblindtuner.protocol import (
    CLOUD_PARTY,
    CONSORTIUM_CHANNELS,
    ROUND_FORMAT,
    ROUNDS_CHANNEL,
    SEALED_CHANNEL,
    SEALED_FORMAT,
    consortium_message_path,
)
from medblindtuner.service.errors import (
    Conflict,
    Forbidden,
    NotFound,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    out_of_space_is_507,
)
from medblindtuner.service.limits import ServiceConfig
from medblindtuner.service.locks import file_lock
from medblindtuner.service.quotas import RateLimiter
from medblindtuner.service.store import (
    C_ACTIVE_STATES,
    Consortium,
    ConsortiumJob,
    ConsortiumMessage,
    ConsortiumToken,
    Store,
    aware,
    bytes_held,
    hash_token,
    new_job_id,
    new_token,
    token_matches,
    utcnow,
)

log = logging.getLogger("medblindtuner.service")

_TOPIC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_HEADER_BYTES = 4096
BROADCAST = -1  # the recipient of a round message


def waiting_for(missing: list[int]) -> str:
    """"waiting for hospitals 1, 2" (or "complete")."""
    if not missing:
        return "complete"
    return "waiting for hospital" + ("s " if len(missing) > 1 else " ") + ", ".join(
        str(i) for i in missing)


def check_topic(topic: str) -> str:
    if not _TOPIC.match(topic or "") or ".." in topic:
        raise NotFound(f"{topic[:64]!r} is not a round or request name")
    return topic


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a relayed message (4-byte length, JSON) and where its payload
    starts; 422 when it has none."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(4), "big")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise Unprocessable("not a consortium message: no header of 1 to "
                                f"{MAX_HEADER_BYTES} bytes")
        raw = handle.read(size)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unprocessable(f"not a consortium message: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise Unprocessable("not a consortium message: its header is not a JSON object")
    return header, 4 + size


class ConsortiumRelay:
    """The consortia of one data directory: tokens, slots, files (see the module docstring).

    `auth_failures`, `token_rate` and `creation_rate` are the service's own rate limiters
    (`quotas.RateLimiter`), shared with single-holder jobs."""

    def __init__(self, config: ServiceConfig, store: Store,
                 auth_failures: RateLimiter | None = None,
                 token_rate: RateLimiter | None = None,
                 creation_rate: RateLimiter | None = None) -> None:
        self.config = config
        self.store = store
        self.limits = config.limits
        self.auth_failures = auth_failures
        self.token_rate = token_rate
        self.creation_rate = creation_rate

    def folder(self, consortium_id: str) -> Path:
        return self.config.job_dir(consortium_id)

    # ---- access ------------------------------------------------------------------------------
    def create(self, n_parties: int, client: str = "local") -> dict[str, Any]:
        """A consortium of `n_parties` hospitals: one token each, returned once (index i is
        `tokens[i]`), stored as SHA-256s."""
        limit = self.limits.max_consortium_hospitals
        if not 2 <= n_parties <= limit:
            raise Unprocessable(f"a consortium has 2 to {limit} hospitals, not {n_parties}")
        if self.creation_rate is not None:
            self.creation_rate.charge(client)
        self.expire_idle()
        with self.store.session() as session:
            live = session.scalar(select(func.count()).select_from(Consortium)) or 0
            held = session.scalar(select(func.count()).select_from(Consortium).where(
                Consortium.client == client[:64])) or 0
        if live >= self.limits.max_live_jobs:
            raise TooManyRequests(f"the service holds {live} consortia, its limit",
                                  retry_after_s=60)
        if held >= self.limits.max_jobs_per_client:
            raise TooManyRequests(f"this address holds {held} consortia, the per-client "
                                  "limit; delete some first", retry_after_s=60)
        consortium_id = new_job_id()
        tokens = [new_token() for _ in range(n_parties)]
        with out_of_space_is_507("creating the consortium"), self.store.session() as session:
            session.add(Consortium(id=consortium_id, n_parties=n_parties, client=client[:64]))
            session.flush()
            session.add_all(ConsortiumToken(consortium_id=consortium_id, index=i,
                                            token_hash=hash_token(t))
                            for i, t in enumerate(tokens))
            self.folder(consortium_id).mkdir(parents=True)
        log.info("consortium %s created (%d hospitals)", consortium_id, n_parties)
        return {"consortium_id": consortium_id, "n_hospitals": n_parties, "tokens": tokens,
                "max_message_bytes": self.limits.max_consortium_message_bytes}

    def authorise(self, consortium_id: str, token: str | None, client: str = "local") -> int:
        """The hospital index `token` stands for: 401 without a token, 404 for an unknown
        consortium, 403 for a token of no member (another job's); guesses are charged to
        the caller's address as for jobs (429 beyond)."""
        failures = self.auth_failures
        if failures is not None and failures.exhausted(client):
            raise TooManyRequests("too many failed authentications from this address; retry "
                                  "later", retry_after_s=failures.retry_after_s())
        try:
            index = self._index_of(consortium_id, token)
        except (Forbidden, NotFound):
            if failures is not None and not failures.exhausted(client):
                failures.charge(client)
            raise
        if self.token_rate is not None:
            self.token_rate.charge(f"{consortium_id}/{index}")
        return index

    def _index_of(self, consortium_id: str, token: str | None) -> int:
        if not token:
            raise Unauthorized("missing bearer token")
        with self.store.session() as session:
            if session.get(Consortium, consortium_id) is None:
                raise NotFound("no such consortium")
            rows = session.scalars(select(ConsortiumToken).where(
                ConsortiumToken.consortium_id == consortium_id)).all()
        matches = [row.index for row in rows if token_matches(token, row.token_hash)]
        if not matches:
            raise Forbidden("this token does not grant access to this consortium")
        return matches[0]

    def n_parties(self, consortium_id: str) -> int:
        with self.store.session() as session:
            row = session.get(Consortium, consortium_id)
            if row is None:
                raise NotFound("the consortium was deleted")
            return row.n_parties

    def status(self, consortium_id: str, index: int) -> dict[str, Any]:
        """What a member sees: its own index, the size, the rounds relayed so far, and
        `awaiting`: the cloud's latest request while hospitals have not answered it (the
        pause state: `{"round", "missing", "detail"}`), else None."""
        with self.store.session() as session:
            row = session.get(Consortium, consortium_id)
            if row is None:
                raise NotFound("the consortium was deleted")
            rounds = session.scalars(select(ConsortiumMessage.topic).where(
                ConsortiumMessage.consortium_id == consortium_id,
                ConsortiumMessage.channel == ROUNDS_CHANNEL).distinct()).all()
            latest = session.scalars(select(ConsortiumMessage.topic).where(
                ConsortiumMessage.consortium_id == consortium_id,
                ConsortiumMessage.channel == ROUNDS_CHANNEL,
                ConsortiumMessage.sender == CLOUD_PARTY, ConsortiumMessage.awaits_answers)
                .order_by(ConsortiumMessage.created_at.desc()).limit(1)).first()
            status = {"consortium_id": row.id, "n_hospitals": row.n_parties, "you": index,
                      "messages": row.messages, "bytes": row.bytes_stored,
                      "rounds": sorted(rounds)}
        awaiting = None
        if latest is not None:
            listing = self.listing(consortium_id, index, ROUNDS_CHANNEL, latest)
            if listing["missing"]:
                awaiting = {"round": latest, "missing": listing["missing"],
                            "detail": listing["detail"]}
        return {**status, "awaiting": awaiting}

    def expire_idle(self, limit: int = 100) -> int:
        """Delete consortia that relayed nothing for `idle_job_ttl_s` (as idle jobs are),
        except those whose training is queued, running or paused."""
        cutoff = utcnow() - timedelta(seconds=self.limits.idle_job_ttl_s)
        with self.store.session() as session:
            rows = session.execute(select(Consortium.id, Consortium.updated_at)).all()
            training = set(session.scalars(select(ConsortiumJob.consortium_id).where(
                ConsortiumJob.state.in_(C_ACTIVE_STATES))).all())
        idle = [cid for cid, seen in rows if aware(seen) < cutoff and cid not in training][:limit]
        for consortium_id in idle:
            self.delete(consortium_id)
        return len(idle)

    def delete(self, consortium_id: str) -> None:
        """Drop the consortium's rows and files (any member may end it: n-of-n needs all)."""
        with self.store.session() as session:
            for table in (ConsortiumMessage, ConsortiumToken, ConsortiumJob):
                session.execute(delete(table).where(table.consortium_id == consortium_id))
            session.execute(delete(Consortium).where(Consortium.id == consortium_id))
        shutil.rmtree(self.folder(consortium_id), ignore_errors=True)
        log.info("consortium %s deleted", consortium_id)

    # ---- hospitals: post, list, fetch ----------------------------------------------------------
    def staging_file(self, consortium_id: str) -> Path:
        """A private file to stream an incoming message into (moved by `post`)."""
        staging = self.config.staging_dir / consortium_id
        staging.mkdir(parents=True, exist_ok=True)
        return staging / f"message-{secrets.token_hex(8)}.part"

    def post(self, consortium_id: str, index: int, channel: str, topic: str, recipient: int,
             staged: Path, sha256: str, awaits_answers: bool = False) -> dict[str, Any]:
        """Store hospital `index`'s message (a staged file, its SHA-256) in its slot; the
        staged file is moved or removed. 422: not a message of this consortium, slot and
        poster; 409: the slot holds other bytes; 413: over the consortium's limits."""
        try:
            check_topic(topic)
            n = self.n_parties(consortium_id)
            sender = self._check_message(consortium_id, index, n, channel, topic, recipient,
                                         staged)
            return self._store(consortium_id, channel, topic, sender, recipient, staged, sha256,
                               awaits_answers)
        finally:
            staged.unlink(missing_ok=True)

    def _check_message(self, consortium_id: str, index: int, n: int, channel: str,
                       topic: str, recipient: int, staged: Path) -> int:
        """The poster's index once the header names this consortium, slot and poster."""
        header, start = read_header(staged)
        if channel == ROUNDS_CHANNEL:
            fields = ("format", ROUND_FORMAT), ("job_id", consortium_id), ("round", topic), (
                "party", index)
            if recipient != BROADCAST:
                raise Unprocessable("a round message is for every member (recipient -1)")
        elif channel == SEALED_CHANNEL:
            if not 0 <= recipient < n or recipient == index:
                raise Unprocessable(f"hospital {index} cannot seal a share for {recipient}: "
                                    f"the recipient is another of hospitals 0..{n - 1}")
            fields = (("format", SEALED_FORMAT), ("job_id", consortium_id), ("request", topic),
                      ("sender", index), ("recipient", recipient))
        else:
            raise NotFound(f"unknown channel {channel!r}; use one of {CONSORTIUM_CHANNELS}")
        for name, expected in fields:
            if header.get(name) != expected:
                raise Unprocessable(self._mismatch(name, header.get(name), expected, index))
        if channel == ROUNDS_CHANNEL and _payload_sha(staged, start) != header.get("sha256"):
            raise Unprocessable(f"round {topic!r}: the payload does not match its checksum")
        return index

    @staticmethod
    def _mismatch(name: str, got: object, expected: object, index: int) -> str:
        shown = repr(got)[:80]
        if name in ("party", "sender"):
            return (f"hospital {index} may post only as itself; the message is hospital "
                    f"{shown}'s: refused")
        if name == "job_id":
            return f"a message of job {shown} was posted to consortium {expected!r}: refused"
        if name == "format":
            return f"not a {expected} message (format {shown})"
        return f"the message's {name} is {shown}, its address says {expected!r}"

    def _store(self, consortium_id: str, channel: str, topic: str, sender: int,
               recipient: int, staged: Path, sha256: str,
               awaits_answers: bool = False) -> dict[str, Any]:
        """First writer wins the slot; the same bytes again are a retry (`again`)."""
        size = staged.stat().st_size
        path = consortium_message_path(self.folder(consortium_id), channel, topic, sender,
                                       recipient)
        key = (consortium_id, channel, topic, sender, recipient)
        with file_lock(self.folder(consortium_id) / ".lock"):
            with self.store.session() as session:
                row = session.get(ConsortiumMessage, key)
                consortium = session.get(Consortium, consortium_id)
                if consortium is None:
                    raise NotFound("the consortium was deleted")
                if row is not None:
                    if row.sha256 == sha256:
                        return {"stored": True, "again": True, "sha256": sha256}
                    raise Conflict(f"{_who(sender)} already posted a different message for "
                                   f"{_slot_name(channel, topic, recipient)}: a second, "
                                   "different one is refused")
                self._check_room(session, consortium, size)
            with out_of_space_is_507("storing the message"):
                path.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(staged, 0o400)  # a relayed message never changes
                os.replace(staged, path)
                fsync_dir(path.parent)
                with self.store.session() as session:
                    session.add(ConsortiumMessage(
                        consortium_id=consortium_id, channel=channel, topic=topic,
                        sender=sender, recipient=recipient, sha256=sha256, size=size,
                        awaits_answers=awaits_answers))
                    consortium = session.get(Consortium, consortium_id)
                    consortium.messages += 1
                    consortium.bytes_stored += size
                    consortium.updated_at = utcnow()
        log.info("consortium %s: %s %s from %s stored (%d bytes, sha256 %s)", consortium_id,
                 channel, topic, sender, size, sha256[:16])
        return {"stored": True, "again": False, "sha256": sha256}

    def _check_room(self, session: Session, consortium: Consortium, size: int) -> None:
        """413 beyond the consortium's own bounds or the service's disk bound
        (`max_total_bytes`, shared with every job's uploads: `store.bytes_held`)."""
        if consortium.messages >= self.limits.max_consortium_messages:
            raise TooLarge(f"the consortium holds {consortium.messages} messages, its limit")
        if consortium.bytes_stored + size > self.limits.max_consortium_bytes:
            raise TooLarge(f"the consortium's messages would exceed "
                           f"{self.limits.max_consortium_bytes} bytes")
        cutoff = utcnow() - timedelta(seconds=self.limits.upload_reservation_ttl_s)
        held = bytes_held(session, cutoff)
        if held + size > self.limits.max_total_bytes:
            raise TooLarge(f"the service holds {held} bytes (uploads, consortia); {size} more "
                           f"would pass its disk bound of {self.limits.max_total_bytes} "
                           "bytes: try again later")

    def listing(self, consortium_id: str, index: int, channel: str,
                topic: str) -> dict[str, Any]:
        """Who posted so far: a round's messages (every member's, the cloud's), or the
        envelopes of a request addressed to hospital `index`; `missing` and `detail`
        ("waiting for hospitals 1, 2") say who has not."""
        check_topic(topic)
        n = self.n_parties(consortium_id)
        recipient = BROADCAST if channel == ROUNDS_CHANNEL else index
        if channel not in CONSORTIUM_CHANNELS:
            raise NotFound(f"unknown channel {channel!r}")
        with self.store.session() as session:
            rows = session.execute(select(ConsortiumMessage.sender, ConsortiumMessage.sha256,
                                          ConsortiumMessage.size).where(
                ConsortiumMessage.consortium_id == consortium_id,
                ConsortiumMessage.channel == channel, ConsortiumMessage.topic == topic,
                ConsortiumMessage.recipient == recipient)).all()
        posted = {sender: {"sha256": sha, "bytes": size} for sender, sha, size in rows}
        expected = [i for i in range(n) if channel == ROUNDS_CHANNEL or i != index]
        missing = [i for i in expected if i not in posted]
        return {"channel": channel, "topic": topic, "complete": not missing,
                "posted": {str(k): v for k, v in sorted(posted.items())},
                "missing": missing, "detail": waiting_for(missing)}

    def message(self, consortium_id: str, index: int, channel: str, topic: str,
                sender: int) -> tuple[Path, str]:
        """(file, SHA-256) of one message hospital `index` may read: any round message of
        its consortium, or an envelope addressed to it; 404 with who is missing if not yet
        posted."""
        check_topic(topic)
        if channel not in CONSORTIUM_CHANNELS:
            raise NotFound(f"unknown channel {channel!r}")
        recipient = BROADCAST if channel == ROUNDS_CHANNEL else index
        key = (consortium_id, channel, topic, sender, recipient)
        with self.store.session() as session:
            row = session.get(ConsortiumMessage, key)
            digest = None if row is None else row.sha256
        if digest is None:
            missing = self.listing(consortium_id, index, channel, topic)["missing"]
            raise NotFound(f"{_who(sender)} has not posted {_slot_name(channel, topic, recipient)}"
                           f" yet ({waiting_for(missing)})")
        path = consortium_message_path(self.folder(consortium_id), channel, topic, sender,
                                       recipient)
        return path, digest

    # ---- the cloud (a worker process): through the store, not over HTTP -------------------------
    def publish(self, consortium_id: str, topic: str, message: bytes,
                awaits_answers: bool = False) -> dict[str, Any]:
        """A round message of the cloud (party -1, e.g. a ciphertext to decrypt), checked and
        slotted like a hospital's. `awaits_answers`: every hospital answers it in the same
        round (a refresh phase); until all have, the status shows it as `awaiting`."""
        staged = self.staging_file(consortium_id)
        atomic_write_bytes(staged, message)
        return self.post(consortium_id, CLOUD_PARTY, ROUNDS_CHANNEL, topic, BROADCAST, staged,
                         sha256_file(staged), awaits_answers)

    def read(self, consortium_id: str, topic: str) -> dict[int, bytes]:
        """Every message of round `topic` posted so far, by party (SHA-256s checked)."""
        check_topic(topic)
        with self.store.session() as session:
            rows = session.execute(select(ConsortiumMessage.sender, ConsortiumMessage.sha256)
                                   .where(ConsortiumMessage.consortium_id == consortium_id,
                                          ConsortiumMessage.channel == ROUNDS_CHANNEL,
                                          ConsortiumMessage.topic == topic)).all()
        found = {}
        for sender, digest in rows:
            path = consortium_message_path(self.folder(consortium_id), ROUNDS_CHANNEL, topic,
                                           sender, BROADCAST)
            data = path.read_bytes()
            if _sha(data) != digest:
                raise Conflict(f"round {topic!r}: the stored message of party {sender} does not "
                               "match its SHA-256")
            found[sender] = data
        return found


def _who(sender: int) -> str:
    return "the cloud" if sender == CLOUD_PARTY else f"hospital {sender}"


def _slot_name(channel: str, topic: str, recipient: int) -> str:
    if channel == ROUNDS_CHANNEL:
        return f"round {topic!r}"
    return f"its share of request {topic!r} to hospital {recipient}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload_sha(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
