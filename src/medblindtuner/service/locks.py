"""File locks: the `flock` a worker holds for its whole life (and the supervisor's probe of
it), and short exclusive locks that serialise writers of one staged upload or one blob.

A lock (not a PID) is how the web process tells a live worker from a dead one: it is released by
the kernel when the worker dies, however it dies, and it works for workers started by an earlier
run of the web service, which are not its children.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from medblindtuner.protocol import WORKER_LOCK


def worker_alive(directory: Path, lock_name: str = WORKER_LOCK) -> bool:
    """True while some process holds the lock in `directory` (works for non-child processes)."""
    lock_path = Path(directory) / lock_name
    if not lock_path.exists():
        return False
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def acquire_lock(directory: Path, wait_s: float = 15.0,
                 lock_name: str = WORKER_LOCK) -> IO[str] | None:
    """Take the lock, waiting briefly (the web process probes it for a split second).

    Returns the open handle (keep it open for the process lifetime), or None if another
    worker holds it.
    """
    handle = open(Path(directory) / lock_name, "a+")  # noqa: SIM115 - held for the process lifetime
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                return None
            time.sleep(0.2)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive, blocking `flock` on `path` (created if missing) for the `with` body.

    Serialises writers of one staged upload (chunk writes vs. its finalize) and of one blob
    (two jobs committing the same digest), across threads and processes alike: flock locks
    belong to the open file description, so two opens in one process exclude each other too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
