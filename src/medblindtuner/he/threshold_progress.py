"""A threshold party's key ceremony, kept as it goes (`ThresholdParty.keep_progress`), so a
hospital killed mid-ceremony resumes with the same secret share and posts the same bytes.

    directory/secret_share.bin   the share, once the public-key round drew it (0600; written
                                 before that round's answer is returned, so before it leaves)
    directory/<round>.msg        each key round's answer (public bytes)
    directory/progress.json      the rounds answered and the digest of their inputs (written
                                 last: a file it does not name is never used)

A resumed party answers a round it answered with the kept bytes (the same inputs) and refuses
other inputs, exactly as the party before the crash (`ThresholdParty._answer`). The folder is
this hospital's own (0700); its owner deletes it once the share is saved (`save`).
"""

from __future__ import annotations

import json
from pathlib import Path

import openfhe as ofhe

from medblindtuner.formats import atomic_write_bytes

from .threshold import PARTY_FORMAT, PARTY_SHARE, RoundError, ThresholdParty, round_of_decryption

PROGRESS = "progress.json"
KEY_DRAWN = "public-key"  # the round that draws the share


def keep_answer(party: ThresholdParty, directory: Path, round_name: str) -> None:
    """Keep `party`'s new answer of `round_name` (and the share, if this round drew it)."""
    if round_name == KEY_DRAWN:
        tmp = directory / f".{PARTY_SHARE}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.touch(mode=0o600)
        if not ofhe.SerializeToFile(str(tmp), party._secret_key(), ofhe.BINARY):
            raise RoundError(f"OpenFHE could not keep party {party.index}'s share")
        tmp.replace(directory / PARTY_SHARE)
    answered = {r: out for r, out in party._answered.items()
                if not r.startswith(round_of_decryption(""))}
    atomic_write_bytes(directory / f"{round_name}.msg", answered[round_name][1])
    atomic_write_bytes(directory / PROGRESS, json.dumps({
        "format": PARTY_FORMAT, "job_id": party.job_id, "index": party.index,
        "n_parties": party.n_parties,
        "answered": {r: digest for r, (digest, _out) in answered.items()}}).encode())


def resume_party(directory: Path, job_id: str, index: int, n_parties: int,
                 context: ofhe.CryptoContext) -> ThresholdParty:
    """The party whose ceremony was kept in `directory` (a new one if nothing is kept yet),
    keeping on there. Refused if the folder keeps another party or an unreadable share."""
    directory = Path(directory)
    party = ThresholdParty(job_id, index, n_parties, context)
    try:
        saved = json.loads((directory / PROGRESS).read_text())
    except FileNotFoundError:
        saved = {"job_id": job_id, "index": index, "n_parties": n_parties, "answered": {}}
    if (saved.get("job_id"), saved.get("index"), saved.get("n_parties")) != (
            job_id, index, n_parties):
        raise RoundError(f"{directory} keeps party {saved.get('index')} of "
                         f"{saved.get('job_id')!r}, not party {index} of {job_id!r}: refused")
    if KEY_DRAWN in saved["answered"]:
        secret, ok = ofhe.DeserializePrivateKey(str(directory / PARTY_SHARE), ofhe.BINARY)
        if not ok:
            raise RoundError(f"{directory}: the kept secret share is unreadable")
        party._secret = secret
    party._answered = {r: (str(d), (directory / f"{r}.msg").read_bytes())
                       for r, d in saved["answered"].items()}
    party.keep_progress(directory)
    return party
