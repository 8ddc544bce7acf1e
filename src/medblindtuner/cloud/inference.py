"""Encrypted inference: the cloud scores encrypted feature vectors with the encrypted model.

The hospital encrypts query rows in the `x_dup` layout (`hospital.crypto.encrypt_queries`);
the cloud (here) returns one encrypted logit ciphertext per (query ciphertext, weight row);
only the hospital can decrypt the scores. Cost per query ciphertext and row: 1 ct x ct
product, log2(d) rotations, 1 level.
"""

from __future__ import annotations

import openfhe as ofhe

from medblindtuner.he.engine import Evaluator
from medblindtuner.training.artifacts import EncryptedQueries
from medblindtuner.training.plan import TrainingPlan


def score_queries(evaluator: Evaluator, plan: TrainingPlan, weights: list[ofhe.Ciphertext],
                  queries: EncryptedQueries) -> list[list[ofhe.Ciphertext]]:
    """Cloud: encrypted logits, [query ciphertext][weight row]. No key beyond rotations."""
    strides = plan.layout.logit_strides
    weights = [evaluator.adopt(w) for w in weights]
    cts = [evaluator.adopt(q) for q in queries.cts]
    return [[evaluator.rotate_and_sum(evaluator.mul(q, w), strides) for w in weights]
            for q in cts]
