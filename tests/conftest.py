"""Shared test fixtures: real BreastMNIST features (small subset, cached per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


@pytest.fixture(scope="session")
def breast_features_small(tmp_path_factory):
    """EfficientNet-Lite0 features of the first 160 images per BreastMNIST split (real data)."""
    if not (SHARED_DATA / "breastmnist.npz").exists():
        pytest.skip("BreastMNIST not available in ../shared/data/medmnist")
    from medblindtuner.data import load_medmnist
    from medblindtuner.features import extract_features

    dataset = load_medmnist("breastmnist", data_dir=SHARED_DATA, download=False).subset(160)
    cache = tmp_path_factory.mktemp("feature-cache")
    return extract_features(dataset, backbone="efficientnet_lite0", cache_dir=cache,
                            progress=False)
