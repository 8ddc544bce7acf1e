"""Load a hospital's own images from `root/<class>/*.{png,jpg,jpeg}` into a `Dataset`.

The split is stratified and deterministic (seeded) so the same folder always gives the same
train/val/test partition; the dataset md5 covers file contents and split parameters, which
keeps the feature cache correct when either changes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .dataset import Dataset
from .errors import DatasetError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})


def _read_image(path: Path, image_size: int, mode: str) -> np.ndarray:
    """Decode, convert and resize one image; any decoding failure names the file."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from exc
    return arr[..., None] if arr.ndim == 2 else arr


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Per-class (n_val, n_test): rounded, at least 1 when the fraction is positive."""
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if test_fraction > 0:
        n_test = max(n_test, 1)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    return n_val, n_test


def load_image_folder(
    root: str | os.PathLike[str],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int = 28,
    grayscale: bool | None = None,
) -> Dataset:
    """Read `root/<class>/*.png|jpg|jpeg`, resize to image_size, split stratified by class.

    Class indices follow the sorted folder names. `grayscale=None` keeps 1 channel only if every
    image is single-channel, otherwise converts all to RGB.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(
            f"{root}: invalid split fractions val={val_fraction} test={test_fraction}"
        )
    files = _class_files(root)
    if grayscale is None:
        grayscale = _all_single_channel(files)
    mode = "L" if grayscale else "RGB"

    h = hashlib.md5()
    h.update(f"folder|{val_fraction}|{test_fraction}|{seed}|{image_size}|{mode}".encode())
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[np.ndarray], list[int]]] = {
        s: ([], []) for s in ("train", "val", "test")
    }
    for label, (cls, imgs) in enumerate(files.items()):
        n_val, n_test = _split_counts(len(imgs), val_fraction, test_fraction)
        if len(imgs) - n_val - n_test < 1:
            raise DatasetError(
                f"{root / cls}: only {len(imgs)} image(s); too few to split into "
                f"train/val/test with fractions val={val_fraction} test={test_fraction}"
            )
        order = rng.permutation(len(imgs))
        assign = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(imgs) - n_val - n_test)
        for idx, split in zip(order, assign, strict=True):
            p = imgs[idx]
            parts[split][0].append(_read_image(p, image_size, mode))
            parts[split][1].append(label)
        for p in imgs:
            h.update(f"{cls}/{p.name}".encode())
            h.update(hashlib.md5(p.read_bytes()).digest())

    splits = _stacked(parts, image_size, 1 if grayscale else 3)
    if splits["train"][1].size == 0:
        raise DatasetError(f"{root}: training split is empty")
    return Dataset(
        name=root.name,
        splits=splits,
        n_classes=len(files),
        class_names=list(files),
        source=str(root),
        md5=h.hexdigest(),
        extra={"split_seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction},
    )


def _class_files(root: Path) -> dict[str, list[Path]]:
    """Class folder name -> its sorted image files (at least two classes, none empty)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DatasetError(f"{root}: need at least 2 class sub-folders, found {len(class_dirs)}")
    files: dict[str, list[Path]] = {}
    for d in class_dirs:
        imgs = sorted(
            p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not imgs:
            raise DatasetError(f"{d}: class folder contains no .png/.jpg/.jpeg images")
        files[d.name] = imgs
    return files


def _all_single_channel(files: dict[str, list[Path]]) -> bool:
    """Whether every image is single-channel (then the dataset stays grayscale)."""
    for imgs in files.values():
        for p in imgs:
            try:
                with Image.open(p) as im:
                    if im.mode not in ("L", "1", "I", "I;16", "F"):
                        return False
            except (UnidentifiedImageError, OSError) as exc:
                raise DatasetError(f"{p}: unreadable image ({exc})") from exc
    return True


def _stacked(parts: dict[str, tuple[list[np.ndarray], list[int]]], image_size: int,
             channels: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's images as one uint8 array (an empty split: shape (0, s, s, channels))."""
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s, (xs, ys) in parts.items():
        x = (
            np.stack(xs).astype(np.uint8)
            if xs
            else np.zeros((0, image_size, image_size, channels), np.uint8)
        )
        splits[s] = (x, np.asarray(ys, dtype=np.int64))
    return splits
