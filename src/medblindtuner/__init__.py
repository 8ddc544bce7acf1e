"""MedBlindTuner: fine-tune a classifier head on CKKS-encrypted medical image features."""

__version__ = "0.1.0"
