"""Assemble a ~5,000-image binary MedMNIST-style set for the main-job timing (issue #24).

No binary set of that size is on this machine, so one is built from RetinaMNIST: the task
"any retinopathy" (labels 1-4 against 0), each split holding its images, their left-right
and top-bottom flips, and the first 6 % of them rotated by 90 degrees (copies stay in their
original's split: 3,305 / 367 / 1,224 images). A set of augmented copies: its size and its
timing are the point, its accuracy says little.

    python benchmarks/assemble_binary_set.py ../shared/data/medmnist/retinamnist.npz \
        /tmp/lead/retina5k.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROTATED_FRACTION = 0.06


def augmented(images: np.ndarray) -> np.ndarray:
    """The images, their two flips and the first ROTATED_FRACTION of them turned by 90°."""
    turned = images[: round(ROTATED_FRACTION * len(images))]
    return np.concatenate([images, images[:, :, ::-1], images[:, ::-1, :],
                           np.rot90(turned, axes=(1, 2))])


def assemble(source: Path, target: Path) -> dict[str, int]:
    data = np.load(source)
    out, sizes = {}, {}
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        positive = (labels > 0).astype(np.uint8)
        turned = positive[: round(ROTATED_FRACTION * len(positive))]
        out[f"{split}_images"] = augmented(images)
        out[f"{split}_labels"] = np.concatenate([positive] * 3 + [turned])[:, None]
        sizes[split] = len(out[f"{split}_images"])
    np.savez_compressed(target, **out)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="retinamnist.npz")
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    print(assemble(args.source, args.target))


if __name__ == "__main__":
    main()
