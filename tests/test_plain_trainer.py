"""Plaintext reference trainer and its polynomial mirror."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_he import toy_problem
from sklearn.linear_model import LogisticRegression

from medblindtuner.he.packing import PackingLayout
from medblindtuner.training.approx import (
    ActivationPlan,
    ChebyshevApprox,
    RangeError,
    chebyshev_depth,
)
from medblindtuner.training.pipeline import prepare_features, run_plain
from medblindtuner.training.plain import TrainConfig, evaluate, train_head


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
    # The degree-27 sigmoid is within 5e-4 of the exact one on [-12, 12].
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


def test_layout_simulation_matches_logits():
    layout = PackingLayout(2048, 13)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(layout.samples_per_ct - 3, 13))
    w = rng.normal(size=13)
    slots = layout.logit_slots(x, w)
    assert np.allclose(layout.decode_per_sample(slots, len(x)), x @ w)


def test_matches_sklearn_on_real_features(breast_features_small):
    """Real BreastMNIST EfficientNet features: within 1 point of sklearn's LogisticRegression.

    Trained long without early stopping, both approach the (weakly regularised) maximum
    likelihood solution, so their test accuracies must agree.
    """
    data = prepare_features(breast_features_small, pca_dims=31)
    config = TrainConfig(learning_rate=8.0, epochs=500, batch_size=64, patience=500)
    ours_run = train_head(data.x["train"], data.y["train"], data.x["val"], data.y["val"], 2,
                          config)
    ours = evaluate(ours_run.weights, data.x["test"], data.y["test"], 2)["acc"]
    reference = LogisticRegression(C=1e3, max_iter=20000).fit(data.x["train"], data.y["train"])
    theirs = reference.score(data.x["test"], data.y["test"])
    assert abs(ours - theirs) <= 0.01 + 1e-9, (ours, theirs)


def test_mirror_matches_exact_on_real_features(breast_features_small):
    data = prepare_features(breast_features_small, pca_dims=31)
    runs = run_plain(data, TrainConfig(learning_rate=4.0, epochs=20, batch_size=64, patience=5))
    assert abs(runs["mirror"]["test"]["acc"] - runs["plaintext"]["test"]["acc"]) <= 0.01 + 1e-9
