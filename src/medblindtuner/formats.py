"""Artifact format tags and file names, spelled once (standard library only).

The hospital writes and reads these folders with `training.artifacts` (OpenFHE); the cloud
service's wire protocol (`protocol`) and the hospital's HTTP client need the same
names without OpenFHE, so they live here, below both.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"  # every artifact directory (bundle, dataset, queries, result)

DATASET_FORMAT = "medblindtuner-encrypted-dataset/1"
QUERIES_FORMAT = "medblindtuner-encrypted-queries/1"
SCORES_FORMAT = "medblindtuner-encrypted-scores/1"
RESULT_FORMAT = "medblindtuner-encrypted-result/1"


def dataset_file_name(split: str, batch: int, kind: str) -> str:
    """Ciphertext `kind` (x_dup, x_grad, y<j>) of batch `batch` of `split` (train/val)."""
    return f"{split}_{batch:04d}_{kind}.bin"


# a preconditioned plan's per-feature decay of the look-ahead weights (`TrainConfig
# .preconditioned`), encrypted by the hospital: its values follow the features' spread
DECAY_FILE_NAME = "feature_decay.bin"


def query_file_name(index: int) -> str:
    """Query ciphertext `index` of a query set."""
    return f"query_{index:04d}.bin"


def score_file_name(index: int, row: int) -> str:
    """Encrypted logits of query ciphertext `index` against weight row `row`."""
    return f"score_{index:04d}_{row}.bin"


def result_weight_name(row: int) -> str:
    """Weight row `row` of the encrypted result."""
    return f"w{row}.bin"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Streamed SHA-256 of a file: key files and blobs are GBs, weights files hundreds of MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes so a crash leaves either the old or the new file, never half of one (the
    temporary name carries the process id, so concurrent writers never share it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
