"""MedMNIST (.npz) loading with local look-up, checksummed download and strict validation.

The hospital side must never feed a silently malformed file into an encrypted training run
(a mistake is expensive to discover after encryption), so every structural problem is turned
into a `DatasetError` that names the file and the problem.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .dataset import SPLITS, Dataset
from .errors import DatasetError

ZENODO_URL = "https://zenodo.org/records/10519652/files/{flag}.npz"
ENV_DATA_DIR = "MEDBLINDTUNER_DATA_DIR"

# Official MD5 of the 28x28 MedMNIST v2 files. Only checksums we could verify are pinned;
# other flags can still be loaded from a local file but are not downloaded unverified.
OFFICIAL_MD5: dict[str, str] = {
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
}

# Class names from the MedMNIST v2 metadata (used for reports; optional for other datasets).
CLASS_NAMES: dict[str, list[str]] = {
    "breastmnist": ["malignant", "normal, benign"],
    "retinamnist": ["0", "1", "2", "3", "4"],
}

# Known number of classes, so a label outside the official range is caught even when the
# file happens not to contain the highest class.
N_CLASSES: dict[str, int] = {name: len(names) for name, names in CLASS_NAMES.items()}


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file, streamed (MedMNIST publishes MD5, so that is what we compare with)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_download_dir() -> Path:
    """Where downloads go (same place the official `medmnist` package uses)."""
    return Path.home() / ".medmnist"


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories searched for `<name>.npz`, in priority order.

    Explicit option, then $MEDBLINDTUNER_DATA_DIR, then ~/.medmnist, then the `shared/` folder
    that sits next to the checkout (found relative to this package and to the cwd, never by an
    absolute path).
    """
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(default_download_dir())
    # src/medblindtuner/data/medmnist.py -> parents[3] is the checkout, parents[4] its parent.
    here = Path(__file__).resolve()
    if len(here.parents) > 4:
        dirs.append(here.parents[4] / "shared" / "data" / "medmnist")
    cwd = Path.cwd()
    dirs += [cwd / "shared" / "data" / "medmnist", cwd.parent / "shared" / "data" / "medmnist"]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".npz") or os.sep in name_or_path or "/" in name_or_path


def resolve_medmnist(
    name_or_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    opener: Callable[..., object] | None = None,
) -> Path:
    """Find (or download) the .npz file for a dataset name or explicit path."""
    text = str(name_or_path)
    direct = Path(text).expanduser()
    if direct.is_file():
        return direct
    if _looks_like_path(text) and ("/" in text or os.sep in text):
        raise DatasetError(f"{direct}: file not found")
    flag = text.lower().removesuffix(".npz")
    searched = candidate_dirs(data_dir)
    for d in searched:
        p = d / f"{flag}.npz"
        if p.is_file():
            return p
    where = ", ".join(str(d) for d in searched)
    if not download:
        raise DatasetError(
            f"{flag}.npz not found (searched: {where}) and download is disabled. "
            f"Put the file in one of those folders or pass --data-dir."
        )
    return download_medmnist(flag, default_download_dir(), opener=opener, searched=where)


def download_medmnist(
    flag: str,
    dest_dir: Path,
    opener: Callable[..., object] | None = None,
    searched: str = "",
    timeout: float = 60.0,
) -> Path:
    """Download `<flag>.npz` from Zenodo into dest_dir, verifying the official MD5.

    The file is written to a temporary name and only moved into place once the checksum
    matches, so an interrupted or tampered download never poisons the local cache.
    """
    url = ZENODO_URL.format(flag=flag)
    target = dest_dir / f"{flag}.npz"
    hint = (
        f"Download {url} manually and put it at {target}"
        + (f" (or in one of: {searched})" if searched else "")
        + ", or pass --data-dir / set $"
        + ENV_DATA_DIR
        + "."
    )
    expected = OFFICIAL_MD5.get(flag)
    if expected is None:
        raise DatasetError(
            f"{flag}.npz not found locally and no verified checksum is pinned for '{flag}', "
            f"so it is not downloaded automatically. {hint}"
        )
    open_url = opener or urllib.request.urlopen
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{flag}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with open_url(url, timeout=timeout) as resp:  # type: ignore[attr-defined]
                    shutil.copyfileobj(resp, out)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DatasetError(f"download of {url} failed ({exc}). {hint}") from exc
        got = file_md5(tmp)
        if got != expected:
            raise DatasetError(
                f"download of {url} has MD5 {got}, expected {expected} (corrupt or changed "
                f"file; not used). {hint}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _as_images(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Validate an image array and return it as uint8 (N, H, W, C)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    elif not (arr.ndim == 4 and arr.shape[-1] in (1, 3)):
        raise DatasetError(
            f"{path}: '{key}' has shape {arr.shape}; expected (N,H,W) grayscale or (N,H,W,3) RGB"
        )
    if arr.shape[0] == 0:
        raise DatasetError(f"{path}: split '{key}' is empty")
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise DatasetError(f"{path}: '{key}' has dtype {arr.dtype}; expected uint8 pixels")
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
            raise DatasetError(f"{path}: '{key}' has pixel values outside 0..255")
        if np.issubdtype(arr.dtype, np.floating) and np.any(arr != np.round(arr)):
            raise DatasetError(f"{path}: '{key}' has non-integer pixel values; expected uint8")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _as_labels(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Validate a label array and return it as int64 (N,)."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 2:
        raise DatasetError(
            f"{path}: '{key}' has shape {arr.shape}; multi-label/one-hot labels are not "
            f"supported, expected (N,) or (N,1) class indices"
        )
    elif arr.ndim != 1:
        raise DatasetError(f"{path}: '{key}' has shape {arr.shape}; expected (N,) or (N,1)")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise DatasetError(f"{path}: '{key}' contains non-integer labels")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise DatasetError(f"{path}: '{key}' has dtype {arr.dtype}; expected integer labels")
    labels = arr.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DatasetError(f"{path}: '{key}' contains negative label {labels.min()}")
    return labels


def validate_arrays(
    arrays: dict[str, np.ndarray], path: Path, n_classes: int | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Check keys, shapes, counts and label range; return canonical splits and n_classes."""
    needed = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise DatasetError(
            f"{path}: missing key(s) {missing}; found {sorted(arrays)}. Expected "
            f"train/val/test _images and _labels"
        )
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in SPLITS:
        x = _as_images(np.asarray(arrays[f"{s}_images"]), path, f"{s}_images")
        y = _as_labels(np.asarray(arrays[f"{s}_labels"]), path, f"{s}_labels")
        if y.shape[0] == 0:
            raise DatasetError(f"{path}: split '{s}_labels' is empty")
        if x.shape[0] != y.shape[0]:
            raise DatasetError(
                f"{path}: split '{s}' has {x.shape[0]} images but {y.shape[0]} labels"
            )
        splits[s] = (x, y)
    shapes = {s: splits[s][0].shape[1:] for s in SPLITS}
    if len(set(shapes.values())) != 1:
        raise DatasetError(f"{path}: image shapes differ between splits: {shapes}")
    max_label = max(int(y.max()) for _, y in splits.values())
    if n_classes is None:
        n_classes = max_label + 1
        if n_classes < 2:
            raise DatasetError(f"{path}: only one class present (label {max_label})")
    elif max_label >= n_classes:
        raise DatasetError(
            f"{path}: label {max_label} out of range for {n_classes} classes (0..{n_classes - 1})"
        )
    return splits, n_classes


def load_medmnist(
    name_or_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Dataset:
    """Load a MedMNIST-style .npz by flag name ("breastmnist") or path, validated.

    Names are looked up in `candidate_dirs(data_dir)`; if absent and `download` is true the
    official file is fetched from Zenodo into ~/.medmnist with an MD5 check.
    """
    path = resolve_medmnist(name_or_path, data_dir=data_dir, download=download)
    flag = path.name.removesuffix(".npz").lower()
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc
    splits, n_classes = validate_arrays(arrays, path, N_CLASSES.get(flag))
    md5 = file_md5(path)
    official = OFFICIAL_MD5.get(flag)
    return Dataset(
        name=flag,
        splits=splits,
        n_classes=n_classes,
        class_names=CLASS_NAMES.get(flag),
        source=str(path),
        md5=md5,
        extra={"official_md5": official, "matches_official": official == md5},
    )
