"""Shared test fixtures: real BreastMNIST features (small subset, cached per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


SMALL_SUBSET = 160  # images per split used by the real-data tests


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory) -> Path:
    """One feature cache per test session, so real features are extracted once."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def breast_features_small(feature_cache_dir):
    """EfficientNet-Lite0 features of the first 160 images per BreastMNIST split (real data)."""
    if not (SHARED_DATA / "breastmnist.npz").exists():
        pytest.skip("BreastMNIST not available in ../shared/data/medmnist")
    from medblindtuner.data import load_medmnist
    from medblindtuner.features import extract_features

    dataset = load_medmnist("breastmnist", data_dir=SHARED_DATA, download=False)
    return extract_features(dataset.subset(SMALL_SUBSET), backbone="efficientnet_lite0",
                            cache_dir=feature_cache_dir, progress=False)
