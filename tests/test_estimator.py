"""`EncryptedHeadClassifier` is a scikit-learn estimator: clone, a Pipeline with a scaler,
cross_val_score, string labels, NotFittedError, pickling, and `coef_`/`intercept_` over the
input features (PCA and scaling folded back). Insecure test ring, a few epochs each."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medblindtuner import EncryptedHeadClassifier


def blobs(n: int, n_classes: int, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centres = 2.0 * rng.normal(size=(n_classes, dims))
    return 3.0 + 5.0 * (rng.normal(size=(n, dims)) + centres[y]), y  # far from standard


def unclipped(clf: EncryptedHeadClassifier, x: np.ndarray) -> np.ndarray:
    """Rows the model's scaler leaves within the norm ball (it clips the others)."""
    scaler = clf.hospital_.scaler
    norms = np.linalg.norm(scaler.project(x) * scaler.scale_, axis=1)
    return norms <= scaler.max_norm * (1 - 1e-5)


def estimator(**params) -> EncryptedHeadClassifier:
    return EncryptedHeadClassifier(epochs=2, insecure_test_params=True, **params)


def test_clone_and_params_by_introspection():
    clf = estimator(seed=3, validation_fraction=0.3)
    copy = clone(clf)
    assert copy is not clf and copy.get_params() == clf.get_params()
    assert {"seed", "validation_fraction", "cloud", "insecure_test_params"} <= set(
        clf.get_params())
    with pytest.raises(NotFittedError):
        clf.decision_function(np.zeros((2, 3)))


@pytest.fixture(scope="module")
def string_pipeline():
    x, y = blobs(120, 2, 4)
    labels = np.array(["benign", "malignant"])[y]
    pipeline = make_pipeline(StandardScaler(), estimator()).fit(x, labels)
    return pipeline, x, labels


def test_pipeline_with_a_scaler_and_string_labels(string_pipeline):
    pipeline, x, labels = string_pipeline
    clf = pipeline[-1]
    assert list(clf.classes_) == ["benign", "malignant"] and clf.n_features_in_ == 4
    assert set(pipeline.predict(x)) <= set(clf.classes_)
    assert pipeline.score(x, labels) >= 0.8
    assert pipeline.predict_proba(x).shape == (len(x), 2)
    assert clf.coef_.shape == (1, 4) and clf.intercept_.shape == (1,)


def test_coef_is_the_head_over_the_input_features(string_pipeline):
    pipeline, x, _ = string_pipeline
    clf, scaled = pipeline[-1], pipeline[0].transform(x)
    inside = unclipped(clf, scaled)
    assert inside.mean() > 0.5
    linear = scaled @ clf.coef_.T + clf.intercept_
    assert np.allclose(linear[inside, 0], clf.decision_function(scaled)[inside], atol=1e-5)


def test_pickled_estimator_predicts_the_same(string_pipeline):
    pipeline, x, _ = string_pipeline
    again = pickle.loads(pickle.dumps(pipeline))
    assert np.allclose(again.predict_proba(x), pipeline.predict_proba(x))


def test_softmax_head_with_pca_folds_back_to_the_inputs():
    x, y = blobs(150, 3, 6, seed=1)
    clf = estimator(pca_dims=4).fit(x, y)
    assert clf.coef_.shape == (3, 6) and clf.intercept_.shape == (3,)
    assert clf.decision_function(x).shape == (len(x), 3)
    # exact on rows within the training rows' norm (the scaler clips the others)
    inside = unclipped(clf, x)
    assert inside.mean() > 0.5
    assert np.allclose((x @ clf.coef_.T + clf.intercept_)[inside],
                       clf.decision_function(x)[inside], atol=1e-5)
    assert clf.score(x, y) >= 0.8


def test_cross_val_score():
    x, y = blobs(120, 2, 4, seed=2)
    scores = cross_val_score(estimator(), x, y, cv=3)
    assert scores.shape == (3,) and scores.min() >= 0.7
