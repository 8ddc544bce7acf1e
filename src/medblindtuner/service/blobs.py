"""Content-addressed blob store and crash-safe file helpers.

Uploaded files are stored once under `blobs/<sha[:2]>/<sha>` (so a hospital re-submitting the
same multi-GB bundle for a second job costs no disk) and *hard-linked* into per-job directories,
because OpenFHE reads keys and ciphertexts by path. Every write goes to a temporary name, is
fsynced and then renamed, so a crash leaves either nothing or a complete file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_safe_name(name: str) -> bool:
    """A plain file name: no separators, no leading dot, no `..` (blocks path traversal)."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value or ""))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry, not only the file data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class BlobStore:
    """`root/<sha[:2]>/<sha>`: immutable files named by their SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def ingest(self, source: Path, sha256: str) -> Path:
        """Move an already verified file into the store (dropping it if the blob exists)."""
        target = self.path_for(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            Path(source).unlink(missing_ok=True)
        else:
            os.chmod(source, 0o400)  # blobs are immutable: a stray write would corrupt many jobs
            os.replace(source, target)
            fsync_dir(target.parent)
        return target

    def link_into(self, sha256: str, destination: Path) -> None:
        """Expose a blob at `destination` (hard link; copy when on another file system)."""
        source = self.path_for(sha256)
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
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
                if path.exists() and path.stat().st_nlink <= 1:
                    path.unlink()
                    removed += 1
            except (OSError, ValueError):
                continue
        return removed
