"""Shared fixtures' building blocks for the encrypted tests (insecure test parameters only)."""

from __future__ import annotations

import numpy as np

from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.params import INSECURE_TEST, CkksParams
from medblindtuner.training.approx import ActivationPlan
from medblindtuner.training.plain import TrainConfig, add_bias
from medblindtuner.training.plan import TrainingPlan


def toy_problem(
    n_classes: int, n_train: int = 120, n_val: int = 40, dim: int = 7, seed: int = 0,
    separation: float = 1.5,
):
    """Gaussian blobs, rows scaled to norm <= 1, bias appended (what the hospital sends)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * separation

    def split(n: int):
        y = rng.integers(0, n_classes, n)
        x = centers[y] + rng.normal(size=(n, dim))
        return x, y

    x_train, y_train = split(n_train)
    x_val, y_val = split(n_val)
    scale = np.linalg.norm(x_train, axis=1).max()
    return (add_bias(x_train / scale), y_train, add_bias(np.clip(x_val / scale, -1, 1)), y_val)


def plan_and_keys(n_classes: int, config: TrainConfig, data,
                  denominator_chunks: int | None = None, base: CkksParams = INSECURE_TEST,
                  activation: ActivationPlan | None = None):
    """`base`: the insecure set of a refresh mode (`params_for_mode(mode, insecure=True)`)."""
    x_train, _, x_val, _ = data
    plan = TrainingPlan.create(base, x_train, x_val, n_classes, config, activation,
                               denominator_chunks=denominator_chunks)
    params = base.with_bootstrap_slots(plan.bootstrap_slots)
    keys = HospitalKeys.generate(params, plan.rotation_indices, allow_insecure=True,
                                 shard_rotation_indices=plan.kernel_rotation_indices)
    return plan, keys
