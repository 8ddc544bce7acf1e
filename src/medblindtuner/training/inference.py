"""Encrypted inference: the cloud scores encrypted feature vectors with the encrypted model.

The hospital encrypts query rows in the `x_dup` layout (`he.packing`); the cloud returns one
encrypted logit ciphertext per (query ciphertext, weight row); only the hospital can decrypt
the scores. Cost per query ciphertext and row: 1 ct x ct product, log2(d) rotations, 1 level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.he.ciphertexts import (
    atomic_write_json,
    load_ciphertext,
    read_artifact_manifest,
    save_ciphertext,
)
from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import CkksParams, data_level
from medblindtuner.training.approx import exact_probabilities
from medblindtuner.training.encrypted import TrainingPlan

QUERIES_FORMAT = "medblindtuner-encrypted-queries/1"
SCORES_FORMAT = "medblindtuner-encrypted-scores/1"


@dataclass
class EncryptedQueries:
    """Query rows packed `samples_per_ct` to a ciphertext; `sizes` says how many are real."""

    sizes: tuple[int, ...]
    cts: list[ofhe.Ciphertext]

    def save(self, directory: Path, params: CkksParams) -> dict:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {f"query_{i:04d}.bin": save_ciphertext(directory / f"query_{i:04d}.bin", ct)
                 for i, ct in enumerate(self.cts)}
        manifest = {"format": QUERIES_FORMAT, "params_fingerprint": params.fingerprint(),
                    "sizes": list(self.sizes), "files": files}
        atomic_write_json(directory / "manifest.json", manifest)
        return manifest

    @classmethod
    def load(cls, directory: Path, params: CkksParams) -> EncryptedQueries:
        directory = Path(directory)
        manifest = _read_manifest(directory, QUERIES_FORMAT, params)
        cts = [load_ciphertext(directory / f"query_{i:04d}.bin",
                               manifest["files"][f"query_{i:04d}.bin"])
               for i in range(len(manifest["sizes"]))]
        return cls(tuple(manifest["sizes"]), cts)


def _read_manifest(directory: Path, fmt: str, params: CkksParams) -> dict:
    return read_artifact_manifest(directory, fmt, params.fingerprint())


def encrypt_queries(keys: HospitalKeys, plan: TrainingPlan, x: np.ndarray) -> EncryptedQueries:
    """Hospital: encrypt bias-augmented, scaled feature rows for scoring."""
    layout = plan.layout
    step = layout.samples_per_ct
    chunks = [x[i : i + step] for i in range(0, len(x), step)]
    cts = [keys.encrypt(layout.encode_x_dup(c), data_level(keys.params)) for c in chunks]
    return EncryptedQueries(tuple(len(c) for c in chunks), cts)


def score_queries(evaluator: Evaluator, plan: TrainingPlan, weights: list[ofhe.Ciphertext],
                  queries: EncryptedQueries) -> list[list[ofhe.Ciphertext]]:
    """Cloud: encrypted logits, [query ciphertext][weight row]. No key beyond rotations."""
    strides = plan.layout.logit_strides
    weights = [evaluator.adopt(w) for w in weights]
    cts = [evaluator.adopt(q) for q in queries.cts]
    return [[evaluator.rotate_and_sum(evaluator.mul(q, w), strides) for w in weights]
            for q in cts]


def save_scores(directory: Path, scores: list[list[ofhe.Ciphertext]], sizes, params) -> dict:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, row in enumerate(scores):
        for j, ct in enumerate(row):
            files[f"score_{i:04d}_{j}.bin"] = save_ciphertext(
                directory / f"score_{i:04d}_{j}.bin", ct)
    manifest = {"format": SCORES_FORMAT, "params_fingerprint": params.fingerprint(),
                "sizes": list(sizes), "rows": len(scores[0]) if scores else 0, "files": files}
    atomic_write_json(directory / "manifest.json", manifest)
    return manifest


def load_scores(directory: Path, params: CkksParams) -> tuple[list[list[ofhe.Ciphertext]], list]:
    directory = Path(directory)
    manifest = _read_manifest(directory, SCORES_FORMAT, params)
    scores = [[load_ciphertext(directory / f"score_{i:04d}_{j}.bin",
                               manifest["files"][f"score_{i:04d}_{j}.bin"])
               for j in range(manifest["rows"])] for i in range(len(manifest["sizes"]))]
    return scores, manifest["sizes"]


def decrypt_scores(keys: HospitalKeys, plan: TrainingPlan, scores, sizes) -> np.ndarray:
    """Hospital: (n, c) class probabilities from the encrypted logits (exact softmax/sigmoid)."""
    layout = plan.layout
    logits = np.vstack([
        np.column_stack([layout.decode_per_sample(keys.decrypt(ct), n) for ct in row])
        for row, n in zip(scores, sizes, strict=True)
    ])
    probs = exact_probabilities(logits, plan.n_classes)
    if plan.n_classes == 2:
        probs = np.hstack([1.0 - probs, probs])
    return probs
