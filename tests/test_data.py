"""Data layer: MedMNIST .npz validation, look-up/download, image-folder loading."""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medblindtuner.data import DatasetError, load_image_folder, load_medmnist
from medblindtuner.data import medmnist as mm

SHARED = Path(mm.__file__).resolve().parents[4] / "shared" / "data" / "medmnist"


def _arrays(rgb: bool = False, label_shape: str = "(N,)", n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for s, k in (("train", n), ("val", 3), ("test", 4)):
        shape = (k, 28, 28, 3) if rgb else (k, 28, 28)
        out[f"{s}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        y = np.arange(k, dtype=np.uint8) % 3
        out[f"{s}_labels"] = y[:, None] if label_shape == "(N,1)" else y
    return out


def _write(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "toymnist") -> Path:
    p = tmp_path / f"{name}.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("label_shape", ["(N,)", "(N,1)"])
@pytest.mark.parametrize("rgb", [False, True])
def test_load_both_label_shapes_and_channels(tmp_path: Path, label_shape: str, rgb: bool) -> None:
    p = _write(tmp_path, _arrays(rgb, label_shape))
    ds = load_medmnist(p)
    assert ds.n_classes == 3
    assert ds.sizes() == {"train": 6, "val": 3, "test": 4}
    x, y = ds.splits["train"]
    assert x.dtype == np.uint8 and x.shape == (6, 28, 28, 3 if rgb else 1)
    assert y.dtype == np.int64 and y.shape == (6,)
    assert ds.md5 == hashlib.md5(p.read_bytes()).hexdigest()


def test_name_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir, opt_dir = tmp_path / "env", tmp_path / "opt"
    env_dir.mkdir()
    opt_dir.mkdir()
    _write(env_dir, _arrays(), "toymnist")
    a = _arrays()
    a["train_labels"] = np.zeros(6, np.uint8)
    a["train_labels"][0] = 1
    _write(opt_dir, a, "toymnist")
    monkeypatch.setenv(mm.ENV_DATA_DIR, str(env_dir))
    assert load_medmnist("toymnist", download=False).source == str(env_dir / "toymnist.npz")
    got = load_medmnist("ToyMNIST", data_dir=opt_dir, download=False)
    assert got.source == str(opt_dir / "toymnist.npz")


def _bad(kind: str) -> tuple[dict[str, np.ndarray], str]:
    a = _arrays()
    if kind == "missing":
        del a["val_labels"]
        return a, "missing key"
    if kind == "shape":
        a["train_images"] = np.zeros((6, 28), np.uint8)
        return a, "shape"
    if kind == "empty":
        a["test_images"] = np.zeros((0, 28, 28), np.uint8)
        a["test_labels"] = np.zeros((0,), np.uint8)
        return a, "empty"
    if kind == "count":
        a["val_labels"] = np.zeros(2, np.uint8)
        return a, "3 images but 2 labels"
    if kind == "nonint":
        a["train_labels"] = np.full(6, 0.5)
        return a, "non-integer"
    if kind == "negative":
        a["train_labels"] = np.full(6, -1)
        return a, "negative"
    if kind == "multilabel":
        a["train_labels"] = np.zeros((6, 3), np.uint8)
        return a, "multi-label"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing", "shape", "empty", "count", "nonint", "negative", "multilabel"]
)
def test_bad_files_raise_clear_errors(tmp_path: Path, kind: str) -> None:
    arrays, fragment = _bad(kind)
    p = _write(tmp_path, arrays)
    with pytest.raises(DatasetError, match=fragment) as info:
        load_medmnist(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_label_out_of_range_for_known_flag(tmp_path: Path) -> None:
    a = _arrays()  # labels 0..2, but BreastMNIST has 2 classes
    p = _write(tmp_path, a, "breastmnist")
    with pytest.raises(DatasetError, match="out of range"):
        load_medmnist(p)


def test_not_an_npz(tmp_path: Path) -> None:
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="junk.npz"):
        load_medmnist(p)


def test_missing_file_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm, "candidate_dirs", lambda data_dir=None: [tmp_path])
    with pytest.raises(DatasetError, match="download is disabled"):
        load_medmnist("breastmnist", download=False)


def test_download_failure_says_where_to_put_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, timeout: float = 0) -> None:
        raise urllib.error.URLError("no network")

    with pytest.raises(DatasetError) as info:
        mm.download_medmnist("breastmnist", tmp_path, opener=offline)
    msg = str(info.value)
    assert "zenodo.org/records/10519652/files/breastmnist.npz" in msg
    assert str(tmp_path / "breastmnist.npz") in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_checksum_mismatch_rejected(tmp_path: Path) -> None:
    def fake(url: str, timeout: float = 0) -> io.BytesIO:
        return io.BytesIO(b"tampered content")

    with pytest.raises(DatasetError, match="MD5"):
        mm.download_medmnist("retinamnist", tmp_path, opener=fake)
    assert not (tmp_path / "retinamnist.npz").exists()


def test_download_success_with_matching_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = io.BytesIO()
    np.savez(payload, **_arrays())
    data = payload.getvalue()
    monkeypatch.setitem(mm.OFFICIAL_MD5, "toymnist", hashlib.md5(data).hexdigest())
    opener = lambda url, timeout=0: io.BytesIO(data)  # noqa: E731
    path = mm.download_medmnist("toymnist", tmp_path, opener=opener)
    assert path == tmp_path / "toymnist.npz" and path.read_bytes() == data


def test_unpinned_flag_is_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no verified checksum"):
        mm.download_medmnist("pathmnist", tmp_path, opener=lambda *a, **k: None)


def test_shared_dir_is_not_hard_coded() -> None:
    src = Path(mm.__file__).read_text()
    assert "/work/shared" not in src


@pytest.mark.skipif(not (SHARED / "breastmnist.npz").is_file(), reason="shared data absent")
def test_real_breastmnist() -> None:
    ds = load_medmnist("breastmnist", data_dir=SHARED, download=False)
    assert ds.sizes() == {"train": 546, "val": 78, "test": 156}
    assert ds.image_shape == (28, 28, 1) and ds.n_classes == 2
    assert set(np.unique(ds.splits["train"][1])) == {0, 1}
    assert ds.class_names == ["malignant", "normal, benign"]


@pytest.mark.skipif(not (SHARED / "retinamnist.npz").is_file(), reason="shared data absent")
def test_real_retinamnist_official_md5() -> None:
    ds = load_medmnist(SHARED / "retinamnist.npz")
    assert ds.image_shape == (28, 28, 3) and ds.n_classes == 5
    assert ds.extra["matches_official"] is True


def _make_folder(root: Path, per_class: int = 10, rgb: bool = False) -> None:
    rng = np.random.default_rng(1)
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            shape = (32, 40, 3) if rgb else (32, 40)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{i}.{'jpg' if i % 2 else 'png'}")


def test_image_folder_stratified_deterministic(tmp_path: Path) -> None:
    _make_folder(tmp_path / "imgs")
    a = load_image_folder(tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2, seed=3)
    b = load_image_folder(tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2, seed=3)
    c = load_image_folder(tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2, seed=4)
    assert a.sizes() == {"train": 12, "val": 4, "test": 4}
    assert a.class_names == ["benign", "malignant"] and a.n_classes == 2
    for s in ("train", "val", "test"):
        assert np.bincount(a.splits[s][1]).tolist() == [a.sizes()[s] // 2] * 2
        np.testing.assert_array_equal(a.splits[s][0], b.splits[s][0])
    assert a.md5 == b.md5 != c.md5
    assert a.image_shape == (28, 28, 1)


def test_image_folder_rgb_and_size(tmp_path: Path) -> None:
    _make_folder(tmp_path / "imgs", per_class=5, rgb=True)
    ds = load_image_folder(tmp_path / "imgs", image_size=16)
    assert ds.image_shape == (16, 16, 3)


def test_image_folder_unreadable_image(tmp_path: Path) -> None:
    _make_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "benign" / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image_folder(tmp_path / "imgs")


def test_image_folder_empty_class(tmp_path: Path) -> None:
    _make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        load_image_folder(tmp_path / "imgs")
