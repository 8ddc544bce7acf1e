"""Plaintext reference trainer and its polynomial mirror."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_he import toy_problem
from sklearn.linear_model import LogisticRegression

from medblindtuner.experiment import run_plain
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import PRODUCTION
from medblindtuner.hospital.recipe import Overrides, derive_recipe, prepare_features
from medblindtuner.training.approx import (
    ActivationPlan,
    ChebyshevApprox,
    RangeError,
    chebyshev_depth,
    unit_degree_for,
)
from medblindtuner.training.plain import (
    TrainConfig,
    evaluate,
    jacobi_preconditioner,
    step_bounds,
    train_head,
)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_converges_on_separable_toy_problem(n_classes):
    x_train, y_train, x_val, y_val = toy_problem(
        n_classes, n_train=300, n_val=100, seed=1, separation=5.0)
    config = TrainConfig(learning_rate=4.0, epochs=30, batch_size=64, patience=30)
    result = train_head(x_train, y_train, x_val, y_val, n_classes, config)
    untrained_loss = 0.25 if n_classes == 2 else 1 - 1 / n_classes  # Brier at zero weights
    assert result.history[-1]["val_loss"] < 0.4 * untrained_loss
    assert evaluate(result.weights, x_val, y_val, n_classes)["acc"] >= 0.9


def test_mirror_follows_exact_head_closely():
    data = toy_problem(2, n_train=300, n_val=100, seed=2)
    config = TrainConfig(learning_rate=1.0, epochs=10, batch_size=64, patience=10)
    exact = train_head(*data, 2, config)
    mirror = train_head(*data, 2, config, activation=ActivationPlan.default(2))
    # The default sigmoid (degree 59) is within 1e-6 of the exact one on [-12, 12].
    assert np.max(np.abs(exact.weights - mirror.weights)) < 5e-3


def test_mirror_refuses_logits_outside_the_interval():
    data = toy_problem(2, n_train=300, n_val=100, seed=2, separation=5.0)
    config = TrainConfig(learning_rate=200.0, epochs=10, batch_size=64, patience=10)
    with pytest.raises(RangeError, match="outside the approximation interval"):
        train_head(*data, 2, config, activation=ActivationPlan.default(2))


def test_early_stopping_keeps_best_epoch():
    data = toy_problem(2, n_train=200, n_val=60, seed=3)
    config = TrainConfig(learning_rate=50.0, epochs=40, batch_size=64, patience=2)
    result = train_head(*data, 2, config)
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"]
    assert result.epochs_run < 40 or result.best_epoch == 40


def test_chebyshev_approximations_and_depths():
    sig = ChebyshevApprox("sigmoid", -12, 12, 27)
    assert sig.max_error() < 1e-3
    assert ChebyshevApprox("exp", -3, 3, 13).max_error() < 1e-5
    assert chebyshev_depth(27) == 6 and chebyshev_depth(13) == 5 and chebyshev_depth(5) == 4
    scaled = sig.scaled(0.5)
    x = np.linspace(-12, 12, 101)
    assert np.allclose(scaled(x), 0.5 * sig(x))


def test_head_degrees_follow_the_levels_and_reach_wide_intervals():
    """Each approximation's level cost is a property of the plan (inputs on the unit
    interval): 6 levels buy the sigmoid degree 59, 4 levels the exp degree 13, 5 the
    saturating exp and the inverse degree 27. Degree 59 keeps sigma accurate near the
    boundary and bounded far from it on the wide rungs a weak prior needs (logits of
    well-separated data); the saturating exp does the same for softmax beyond [-7, 7]."""
    assert unit_degree_for(6) == 59 and unit_degree_for(4) == 13 and unit_degree_for(3) == 5
    binary = ActivationPlan(2, logit_bound=48.0)
    softmax, wide_softmax = (ActivationPlan.softmax_for(5, 7.0),
                             ActivationPlan.softmax_for(5, 24.0))
    assert binary.levels == {"sigmoid": 6} and binary.sigmoid.degree == 59
    assert softmax.levels == {"exp": 4, "inverse": 5} and not softmax.exp_saturated
    assert wide_softmax.levels == {"exp": 5, "inverse": 5} and wide_softmax.exp_saturated
    restored = ActivationPlan.from_dict(wide_softmax.to_dict())  # the plan the cloud reads
    assert (restored.exp, restored.inverse) == (wide_softmax.exp, wide_softmax.inverse)
    saturated = wide_softmax.exp
    x = np.linspace(-24, 24, 20001)
    assert np.max(np.abs(saturated(x) - saturated.exact(x))) < 0.2  # values up to e^6
    near = np.abs(x) <= 1
    assert np.max(np.abs(saturated.exact(x[near]) / np.exp(x[near]) - 1)) < 0.01
    assert saturated.exact(np.array([24.0]))[0] < np.exp(6.0)  # saturates
    assert binary.to_dict()["sigmoid"]["unit_depth"] == 6
    assert binary.sigmoid.max_error() < 1.5e-2
    assert ChebyshevApprox("exp", -7, 7, 13).max_error() < 5e-3
    wide = ActivationPlan(2, logit_bound=96.0).sigmoid
    x = np.linspace(-96, 96, 20001)
    assert -0.1 < wide(x).min() and wide(x).max() < 1.1  # bounded (saturating) far out
    near = np.abs(x) <= 4
    assert np.max(np.abs(wide(x[near]) - wide.exact(x[near]))) < 0.1


def test_layout_simulation_matches_logits():
    layout = PackingLayout(2048, 13)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(layout.samples_per_ct - 3, 13))
    w = rng.normal(size=13)
    slots = layout.logit_slots(x, w)
    assert np.allclose(layout.decode_per_sample(slots, len(x)), x @ w)


def test_weight_decay_converges_to_sklearn_on_real_features(breast_features_small):
    """Real BreastMNIST EfficientNet features: full-batch Nesterov with weight decay wd reaches
    the minimiser scikit-learn finds for the same objective (mean log-loss + wd/2 ||w||^2,
    i.e. C = 1 / (wd n) with the bias column as an ordinary feature)."""
    data = prepare_features(breast_features_small, pca_dims=31)
    x, y, n = data.x["train"], data.y["train"], len(data.y["train"])
    smoothness = 0.25 * np.linalg.norm(x, ord=2) ** 2 / n
    wd = 0.01 * smoothness
    config = TrainConfig(learning_rate=0.5 / smoothness, momentum=0.8, epochs=600,
                         batch_size=n, patience=600, weight_decay=wd)
    ours = train_head(x, y, data.x["val"], data.y["val"], 2, config)
    reference = LogisticRegression(C=1 / (wd * n), fit_intercept=False, tol=1e-10,
                                   max_iter=20000).fit(x, y)
    final = ours.final_weights
    assert np.max(np.abs(final[0] - reference.coef_[0])) < 1e-3 * np.max(
        np.abs(reference.coef_)), (final[0][:5], reference.coef_[0][:5])
    ours_acc = evaluate(final, data.x["test"], data.y["test"], 2)["acc"]
    assert ours_acc == reference.score(data.x["test"], data.y["test"])


def test_preconditioned_steps_reach_the_same_minimiser_sooner(breast_features_small):
    """Each column stepping by lr p_j (with the decay 1 - lr wd p_j) keeps the minimiser of
    the same objective, and reaches it in far fewer full-batch steps than one step size."""
    data = prepare_features(breast_features_small, pca_dims=31)
    x, y, n = data.x["train"], data.y["train"], len(data.y["train"])
    wd = 0.01 * 0.25 * np.linalg.norm(x, ord=2) ** 2 / n
    reference = LogisticRegression(C=1 / (wd * n), fit_intercept=False, tol=1e-10,
                                   max_iter=20000).fit(x, y).coef_[0]

    def error_after(epochs: int, preconditioned: bool) -> float:
        smoothness, strong = step_bounds(x, 2, wd, preconditioned)
        q = np.sqrt(strong / smoothness)
        config = TrainConfig(learning_rate=0.5 / smoothness, momentum=(1 - q) / (1 + q),
                             epochs=epochs, batch_size=n, patience=epochs, weight_decay=wd,
                             preconditioned=preconditioned)
        final = train_head(x, y, data.x["val"], data.y["val"], 2, config).final_weights[0]
        return float(np.max(np.abs(final - reference)) / np.max(np.abs(reference)))

    assert error_after(600, True) < 1e-3
    assert error_after(40, True) < 0.5 * error_after(40, False)  # 0.011 against 0.036


def test_preconditioner_is_finite_on_a_constant_column_without_a_penalty():
    x = np.hstack([np.random.default_rng(0).normal(size=(50, 3)), np.zeros((50, 1))])
    p = jacobi_preconditioner(x, 2, 0.0)
    assert np.all(np.isfinite(p)) and np.all(p > 0)
    assert p[3] == pytest.approx(1e6 * p[:3].min(), rel=0.5)


def test_mirror_matches_exact_on_real_features(breast_features_small):
    data, recipe = derive_recipe(breast_features_small, PRODUCTION, Overrides(pca_dims=31))
    runs = run_plain(data, recipe.config, recipe.activation)
    assert abs(runs["mirror"]["test"]["acc"] - runs["plaintext"]["test"]["acc"]) <= 0.01 + 1e-9
