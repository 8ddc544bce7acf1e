"""A subset of `benchmarks/hostile.py` against a real service: every case handled cleanly.

The whole catalogue (over 100 cases, with training, kill -9 and restarts) is the benchmark;
this keeps one of each family in the fast suite, so a regression that turns a refusal into a
500, kills the service or touches another job fails CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hostile  # noqa: E402

SUBSET = (
    "manifest: 100k-deep nesting", "manifest: 5000-digit integer",
    "manifest: 16 MiB padded manifest", "manifest: bytes is a bool",
    "manifest: path traversal name", "manifest: zero-byte file", "manifest: epochs 10^30",
    "manifest: batches not matching files", "manifest: ring_dim not a power of two",
    "chunks: wrong SHA-256 header", "chunks: chunks out of order",
    "chunks: chunk re-sent with other bytes", "chunks: chunk after finalize",
    "chunks: 5000-digit index", "chunks: oversized decision body",
    "auth: every endpoint, foreign/forged/missing/basic",
    "artifact: bit flipped in public_key.bin at byte 24",
    "artifact: secret key disguised as the public key", "quota: request flood on one token",
)


def test_hostile_subset_is_handled(tmp_path):
    lines: list[str] = []
    report = hostile.run(quick=True, workdir=tmp_path, log=lines.append,
                         select=lambda case: case.name in SUBSET)
    assert report["tried"] == len(SUBSET), lines
    assert report["defects"] == [], report["defects"]
    assert report["summary"] == f"{len(SUBSET)} tried, {len(SUBSET)} handled, 0 defects; " \
                                "data lost: no"


def run_cases(tmp_path, prefix: str) -> tuple[dict, list[str]]:
    lines: list[str] = []
    report = hostile.run(quick=True, workdir=tmp_path, log=lines.append,
                         select=lambda case: case.name.startswith(prefix))
    return report, lines


def test_round2_no_500(tmp_path):
    """Issue 26, family 2: no 500 for odd JSON, concurrent deletes or a full disk."""
    report, lines = run_cases(tmp_path, "no500:")
    assert report["tried"] == 6, lines
    assert report["defects"] == [], report["defects"]


def test_round2_hospital_judge(tmp_path):
    """Issue 26, family 1: the judge refuses for good, within its budget, in isolation."""
    report, lines = run_cases(tmp_path, "hospital:")
    assert report["tried"] == 5, lines
    assert report["defects"] == [], report["defects"]


def test_round2_exhaustion(tmp_path):
    """Issue 26, family 4: queued validators, /healthz under 1 s, quotas that hold."""
    report, lines = run_cases(tmp_path, "exhaustion:")
    assert report["tried"] == 5, lines
    assert report["defects"] == [], report["defects"]
    assert report["measured"]["healthz_during_burst"]["max_s"] < 1.0


def test_round2_lying_contexts(tmp_path):
    """Issue 26, family 3: the context's own parameters against its manifest."""
    report, lines = run_cases(tmp_path, "context:")
    assert report["tried"] == 7, lines
    assert report["defects"] == [], report["defects"]
