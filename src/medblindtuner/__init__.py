"""MedBlindTuner: fine-tune a classifier head on CKKS-encrypted medical image features.

`EncryptedHeadClassifier` (Python API) and `Hospital` are imported on first use, so that
`import medblindtuner` (and the CLI) stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["EncryptedHeadClassifier", "Hospital"]


def __getattr__(name: str):
    if name == "EncryptedHeadClassifier":
        from medblindtuner.api import EncryptedHeadClassifier

        return EncryptedHeadClassifier
    if name == "Hospital":
        from medblindtuner.hospital.hospital import Hospital

        return Hospital
    raise AttributeError(f"module 'medblindtuner' has no attribute {name!r}")
