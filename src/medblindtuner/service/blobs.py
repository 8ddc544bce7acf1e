"""Content-addressed blob store and crash-safe file helpers.

Uploaded files are stored once under `blobs/<sha[:2]>/<sha>` (so a hospital re-submitting the
same multi-GB bundle for a second job costs no disk) and *hard-linked* into per-job directories,
because OpenFHE reads keys and ciphertexts by path. Every write goes to a temporary name, is
fsynced and then renamed, so a crash leaves either nothing or a complete file.

A blob is shared by every job that uploads the same bytes, so one wrong blob would poison jobs
of other hospitals: a file is renamed into place only after the bytes *at the temporary name*
hashed to the blob's name, under the blob's lock (two jobs committing one digest serialise),
and an existing blob is hashed again before it is reused; a wrong one is replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from medblindtuner.formats import fsync_dir, sha256_file
from medblindtuner.service.locks import file_lock

log = logging.getLogger("medblindtuner.service")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_safe_name(name: str) -> bool:
    """A plain file name: no separators, no leading dot, no `..` (blocks path traversal)."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value or ""))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



def write_at(path: Path, offset: int, data: bytes) -> None:
    """Write one verified chunk in place in a sparse staging file and fsync it.

    The chunk is recorded as received in the DB only after this returns, so a crash in between
    merely makes the client resend it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        written = os.pwrite(fd, data, offset)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)



class BlobStore:
    """`root/<sha[:2]>/<sha>`: immutable files named by their SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def _lock(self, sha256: str):  # noqa: ANN202 - a context manager
        """The lock of the blob's shard directory: commits, relinks and collection of one
        digest never interleave."""
        return file_lock(self.path_for(sha256).parent / ".lock")

    def verified(self, sha256: str) -> bool:
        """True if the blob exists and its bytes hash to its name."""
        try:
            return sha256_file(self.path_for(sha256)) == sha256
        except OSError:
            return False

    def commit(self, source: Path, sha256: str, destination: Path) -> None:
        """Move `source` into the store and expose the blob at `destination`.

        `source` must be a private, complete file that the caller has checked hashes to
        `sha256` and that cannot change while the caller holds its lock (finalize: hashed
        under the upload lock every chunk write takes). Under the blob's lock an existing blob
        is reused only if it still hashes to its name; a wrong one (disk fault, stray write,
        planted file) is replaced by `source`.
        """
        source = Path(source)
        target = self.path_for(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(source, 0o400)  # blobs are immutable: a stray write would corrupt many jobs
        with self._lock(sha256):
            if target.exists() and sha256_file(target) == sha256:
                source.unlink(missing_ok=True)
            else:
                if target.exists():
                    log.warning("blob %s did not match its name: replaced", sha256[:16])
                os.replace(source, target)
                fsync_dir(target.parent)
            self._link(target, destination)

    def relink(self, sha256: str, destination: Path) -> bool:
        """Expose an existing blob at `destination` if it still hashes to its name (the retry
        of a finalize that stored the blob but failed before recording it)."""
        with self._lock(sha256):
            if not self.verified(sha256):
                return False
            self._link(self.path_for(sha256), destination)
        return True

    @staticmethod
    def _link(source: Path, destination: Path) -> None:
        """Hard link (copy when on another file system), renamed into place.

        Already linked (the retry of a finalize killed after its link): nothing to do, and
        nothing may be tried, because rename(2) of one hard link onto another of the same
        file does nothing and would leave the temporary name behind in the job's folder."""
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        for stale in destination.parent.glob(f".{destination.name}.*.link"):
            stale.unlink(missing_ok=True)  # of a process killed between link and rename
        if destination.exists() and os.path.samefile(source, destination):
            return
        tmp = destination.with_name(f".{destination.name}.{os.getpid()}.link")
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, destination)
        fsync_dir(destination.parent)

    def collect(self, digests: set[str]) -> int:
        """Delete blobs no job directory links to any more (link count 1). Returns the count."""
        removed = 0
        for digest in digests:
            try:
                path = self.path_for(digest)
                with self._lock(digest):
                    if path.exists() and path.stat().st_nlink <= 1:
                        path.unlink()
                        removed += 1
            except (OSError, ValueError):
                continue
        return removed
