"""Named crash points for the crash-safety tests: a process killed exactly where it hurts.

Timing a kill from outside cannot hit "between the checkpoint's files and its state" or
"between the blob rename and the database update"; a failpoint can. Unless the environment
names one, `failpoint()` is a dictionary lookup and nothing else; the product never sets it.

    MEDBLINDTUNER_FAILPOINT=checkpoint.moved@2     SIGKILL this process at the 2nd hit
    MEDBLINDTUNER_FAILPOINT_MARKER=/some/file      written just before the kill; while it
                                                   exists the failpoint never fires again
                                                   (a restarted worker inherits the variables)
    MEDBLINDTUNER_FAILPOINT=disk.chunk@2:enospc,disk.job@1:enospc
                                                   raise OSError(ENOSPC) ("disk full") at
                                                   those hits instead of a kill (several
                                                   points, comma-separated)
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

FAILPOINT_ENV = "MEDBLINDTUNER_FAILPOINT"
MARKER_ENV = "MEDBLINDTUNER_FAILPOINT_MARKER"

# Every name a test may arm, with where it sits (so a typo in a test fails loudly).
FAILPOINTS = {
    "train.mid_step": "a step's chunks computed, the model not yet bootstrapped",
    "checkpoint.written": "an epoch's model files written to the temporary folder",
    "checkpoint.moved": "an epoch's folder in place, state.json not yet updated",
    "decision.published": "the encrypted validation loss on disk, the database not told",
    "refresh.published": "a refresh request offered to the hospital, no answer yet",
    "refresh.answer_stored": "the hospital's refresh answer on disk, the database not told",
    "refresh.received": "a refresh answer read by the worker, not yet in its journal",
    "result.staged": "the result's files written to the temporary folder",
    "result.written": "the result in place, the job not yet marked finished",
    "upload.blob_committed": "an uploaded file renamed into the blob store, not yet recorded",
    "disk.chunk": "an upload chunk about to be written into its staging file",
    "disk.finalize": "a verified upload about to be committed into the blob store",
    "disk.job": "a new job's folder about to be created",
    "hospital.rows_saved": "a consortium hospital's row ciphertext kept, not yet posted",
    "hospital.refresh_saved": "a consortium hospital's refresh answer kept, not yet posted",
    "hospital.key_round_saved": "a consortium hospital's key-round message kept, not posted",
    "hospital.decision_saved": "a consortium hospital's decision of an epoch kept, not posted",
}

_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """SIGKILL this process here (or raise ENOSPC) if the environment arms `name` for this
    hit."""
    armed = os.environ.get(FAILPOINT_ENV)
    if not armed:
        return
    for item in armed.split(","):
        spec, _, action = item.partition(":")
        target, _, count = spec.partition("@")
        if target not in FAILPOINTS:
            raise ValueError(f"{FAILPOINT_ENV}={armed!r}: unknown failpoint {target!r}")
        if target == name:
            _fire(name, int(count or 1), action)


def _fire(name: str, count: int, action: str) -> None:
    _hits[name] = _hits.get(name, 0) + 1
    marker = os.environ.get(MARKER_ENV)
    if _hits[name] != count or (marker and Path(marker).exists()):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")
    if marker:
        Path(marker).write_text(f"{name}@{_hits[name]} pid {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
