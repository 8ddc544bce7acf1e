"""In-memory dataset container shared by the MedMNIST and image-folder loaders."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class Dataset:
    """Images and labels of the three splits, in one canonical layout.

    Images are always uint8 (N, H, W, C) (C = 1 or 3) and labels int64 (N,), so downstream code
    never has to branch on the on-disk format. `md5` identifies the exact content (it keys the
    feature cache), `source` says where it came from.
    """

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    n_classes: int
    class_names: list[str] | None = None
    source: str = ""
    md5: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.splits["train"][0].shape[1:])  # type: ignore[return-value]

    def sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {s: int(self.splits[s][1].shape[0]) for s in self.splits}

    def subset(self, limit: int) -> Dataset:
        """First `limit` images of each split (quick runs/tests); the md5 records the cut."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        splits = {s: (x[:limit], y[:limit]) for s, (x, y) in self.splits.items()}
        return Dataset(
            name=self.name,
            splits=splits,
            n_classes=self.n_classes,
            class_names=self.class_names,
            source=self.source,
            md5=f"{self.md5}:first{limit}",
            extra=dict(self.extra),
        )
