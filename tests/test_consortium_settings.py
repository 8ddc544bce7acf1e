"""Settings a consortium derives from pooled sums (no HE): they equal what the same formulas
give on the union's rows, so every hospital can compute them without seeing the rows."""

from __future__ import annotations

import numpy as np
import pytest

from medblindtuner.consortium.choice import (
    Candidate,
    class_sums,
    newton_models,
    paired_sums,
    sample_losses,
    widest_tied,
)
from medblindtuner.consortium.settings import PooledStatistics
from medblindtuner.training.plain import (
    curvature_weight,
    jacobi_preconditioner,
    preconditioner_of_moments,
    step_bounds,
    step_bounds_of_moments,
)


def union(n_classes: int, n: int = 300, dim: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = rng.normal(size=(n, dim)) * rng.uniform(0.5, 4, dim) + 3.0
    x[:, 0] += 2.0 * y
    return x, y


def pooled_of(x, y, n_classes):
    return PooledStatistics(len(x), 0, x.sum(axis=0), x.T @ x, class_sums(x, y, n_classes))


@pytest.mark.parametrize("n_classes, width", [(2, None), (2, 5), (4, 5)])
def test_newton_stand_in_from_sums_equals_the_rows(n_classes, width):
    x, y = union(n_classes)
    pooled = pooled_of(x, y, n_classes)
    scaler = pooled.scaler(width)
    scaler.scale_ *= 0.1  # no row reaches the norm bound: the sums' model is exact
    z = scaler.augment(x)
    targets = (y[:, None] == 1) - 0.5 if n_classes == 2 else np.eye(n_classes)[y] - 1 / n_classes
    h, wd = curvature_weight(n_classes), 1e-3
    direct = np.linalg.solve(h * z.T @ z / len(z) + wd * np.eye(z.shape[1]),
                             z.T @ targets / len(z))
    [from_sums] = newton_models(scaler, len(x), pooled.feature_sum, pooled.outer_sum,
                                pooled.class_sums, n_classes, [wd])
    np.testing.assert_allclose(from_sums, direct, rtol=1e-6, atol=1e-9)
    # a useful stand-in: better than chance on its own rows
    assert sample_losses(from_sums, z, y, n_classes).mean() < np.log(n_classes)


@pytest.mark.parametrize("n_classes", [2, 5])
def test_preconditioner_and_step_bounds_from_moments_equal_the_rows(n_classes):
    x, _ = union(n_classes)
    z = np.hstack([x / 40.0, np.full((len(x), 1), 0.3)])
    moment = z.T @ z / len(z)
    np.testing.assert_allclose(preconditioner_of_moments(np.diag(moment), n_classes, 1e-3),
                               jacobi_preconditioner(z, n_classes, 1e-3), rtol=1e-12)
    np.testing.assert_allclose(step_bounds_of_moments(moment, n_classes, 1e-3),
                               step_bounds(z, n_classes, 1e-3, preconditioned=True),
                               rtol=1e-9)


def test_widest_tied_width_wins_and_a_worse_one_does_not():
    rng = np.random.default_rng(1)
    leader, close, far = Candidate(31, 1e-3), Candidate(63, 1e-4), Candidate(127, 1e-4)
    base = rng.uniform(0.2, 0.8, 200)
    losses = {leader: base, close: base + rng.normal(0, 0.05, 200),
              far: base + 0.2 + rng.normal(0, 0.05, 200)}
    halves = [{c: v[:120] for c, v in losses.items()}, {c: v[120:] for c, v in losses.items()}]
    finalists = [leader, close, far]
    pooled = sum(paired_sums(h, finalists, leader) for h in halves)  # the aggregation
    assert widest_tied(finalists, pooled, 200) == close
    assert widest_tied([leader, far], pooled[[0, 1, 4, 5]], 200) == leader
