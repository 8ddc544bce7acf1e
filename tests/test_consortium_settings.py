"""Settings a consortium derives from pooled sums (no HE): they equal what the same formulas
give on the union's rows, so every hospital can compute them without seeing the rows."""

from __future__ import annotations

import numpy as np
import pytest

from medblindtuner.consortium.agreement import agree_settings
from medblindtuner.consortium.choice import (
    DECAY_GRID,
    candidate_widths,
    class_sums,
    newton_models,
    sample_losses,
)
from medblindtuner.consortium.run import HospitalShard
from medblindtuner.consortium.sealing import Roster, SealedMailbox, new_sealing_key
from medblindtuner.consortium.settings import PooledStatistics
from medblindtuner.he.params import HOSPITAL, params_for_mode
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


def test_the_widest_affordable_width_and_the_pooled_validations_best_decay():
    rng = np.random.default_rng(2)
    shards = []
    for n, mix in ((160, 0.8), (120, 0.5), (90, 0.2)):  # skewed class mixes
        rows = []
        for size in (n, n // 2):
            y = (rng.random(size) > mix).astype(int)
            x = rng.normal(size=(size, 90)) + 0.4 * y[:, None] * (np.arange(90) < 30)
            rows += [x, y]
        shards.append(HospitalShard(*rows))
    keys = [new_sealing_key() for _ in shards]
    roster = Roster("choice", tuple(bytes(k.public_key) for k in keys))
    params = params_for_mode(HOSPITAL, insecure=True)
    agreed = agree_settings(shards, roster, keys, 2, params, None, None, None,
                            SealedMailbox())
    union = [np.concatenate([getattr(s, f) for s in shards])
             for f in ("x_train", "y_train", "x_val", "y_val")]
    widths = candidate_widths(90, len(union[1]), len(union[3]), 2, params.slots,
                              params.refresh)
    assert agreed.why["width"] == widths[-1] == 63
    # the decay the hospitals' aggregated sums chose is the one the union's rows would
    pooled = pooled_of(union[0], union[1], 2)
    models = newton_models(agreed.scaler, len(union[0]), pooled.feature_sum,
                           pooled.outer_sum, pooled.class_sums, 2, DECAY_GRID)
    z_val = agreed.scaler.augment(union[2])
    losses = [sample_losses(w, z_val, union[3], 2).mean() for w in models]
    assert agreed.why["weight_decay"] == DECAY_GRID[int(np.argmin(losses))]
