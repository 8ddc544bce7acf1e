"""Ciphertext files: OpenFHE binary serialization plus a manifest with checksums."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import openfhe as ofhe

from medblindtuner.formats import sha256_file
from medblindtuner.he.keys import BundleError


def save_ciphertext(path: Path, ct: ofhe.Ciphertext) -> dict:
    path = Path(path)
    if not ofhe.SerializeToFile(str(path), ct, ofhe.BINARY):
        raise BundleError(f"OpenFHE failed to write ciphertext {path}")
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "level": ct.GetLevel()}


def load_ciphertext(path: Path, expected: dict | None = None) -> ofhe.Ciphertext:
    """Read one ciphertext; with `expected` (manifest entry) its checksum must match first."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"missing ciphertext file {path}")
    if expected is not None and sha256_file(path) != expected["sha256"]:
        raise BundleError(f"{path} does not match its checksum (tampered or truncated)")
    try:
        ct, ok = ofhe.DeserializeCiphertext(str(path), ofhe.BINARY)
    except Exception as exc:  # noqa: BLE001 - OpenFHE raises RuntimeError with C++ text
        raise BundleError(f"{path} is not a ciphertext: {exc}") from exc
    if not ok:
        raise BundleError(f"{path} is not a ciphertext")
    return ct


def ciphertext_to_bytes(ct: ofhe.Ciphertext) -> bytes:
    """A ciphertext as OpenFHE binary bytes: what crosses the wire to a cluster's workers."""
    return ofhe.Serialize(ct, ofhe.BINARY)


def ciphertext_from_bytes(data: bytes) -> ofhe.Ciphertext:
    """Inverse of `ciphertext_to_bytes`; needs this process's context of the same parameters."""
    try:
        return ofhe.DeserializeCiphertextString(data, ofhe.BINARY)
    except Exception as exc:  # noqa: BLE001 - OpenFHE raises RuntimeError with C++ text
        raise BundleError(f"{len(data)} bytes are not a ciphertext: {exc}") from exc


def read_artifact_manifest(directory: Path, fmt: str, params_fingerprint: str) -> dict:
    """Manifest of a ciphertext artifact, refused unless its format and parameters match."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise BundleError(f"{directory} has no manifest.json: not a {fmt} artifact")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != fmt:
        raise BundleError(f"{path}: expected format {fmt}, got {manifest.get('format')!r}")
    if manifest.get("params_fingerprint") != params_fingerprint:
        raise BundleError(
            f"{path} was made with other CKKS parameters "
            f"({manifest.get('params_fingerprint')} vs {params_fingerprint})"
        )
    return manifest


def atomic_write_json(path: Path, data: dict) -> None:
    """Write JSON so a crash leaves either the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)



def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place (old one removed only after)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
