"""The Python API: the README example runs as written (insecure test ring), and the hospital
folder it leaves behind can be reopened and refuses a foreign result."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python example"
    return match.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Run the README's example exactly as written (it uses the insecure test ring)."""
    namespace: dict = {}
    code = readme_example()
    assert "insecure_test_params=True" in code
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def test_readme_example_trains_under_encryption(example):
    clf, x_test, y_test = example["clf"], example["x_test"], example["y_test"]
    assert clf.score(x_test, y_test) >= 0.8  # well-separated blobs
    probs = clf.predict_proba(x_test)
    assert probs.shape == (len(x_test), 2) and np.allclose(probs.sum(axis=1), 1)
    assert set(np.unique(clf.predict(x_test))) <= set(clf.classes_)
    assert clf.history_ and all(np.isfinite(h["val_loss"]) for h in clf.history_)
    # the encrypted model is the plaintext mirror's, within CKKS noise
    from medblindtuner.training.plain import train_head

    data, plan = clf.hospital_.data, clf.hospital_.plan
    mirror = train_head(data.x["train"], data.y["train"], data.x["val"], data.y["val"],
                        data.n_classes, plan.config, activation=plan.activation)
    assert np.max(np.abs(clf.weights_ - mirror.weights)) < 5e-3


def test_hospital_folder_reopens_and_refuses_a_foreign_result(example, tmp_path):
    from medblindtuner.he.keys import BundleError
    from medblindtuner.hospital.hospital import Hospital

    clf = example["clf"]
    reopened = Hospital.open(clf.hospital_.folder.root)
    assert np.allclose(reopened.decrypt_result(), clf.weights_, atol=1e-3)  # decryption noise
    assert reopened.recipe is None and reopened.plan.to_dict() == clf.hospital_.plan.to_dict()
    forged = tmp_path / "result"
    shutil.copytree(clf.hospital_.folder.result, forged)
    manifest = forged / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 1', '"rows": 2'))
    with pytest.raises(BundleError, match="weight rows"):
        reopened.decrypt_result(forged)
    # a cloud that returns another epoch's weights than the one the hospital chose
    from medblindtuner.hospital.crypto import JudgeRefusal

    manifest.write_text((clf.hospital_.folder.result / "manifest.json").read_text().replace(
        f'"best_epoch": {reopened.judge().best_epoch}', '"best_epoch": 99'))
    with pytest.raises(JudgeRefusal, match="epoch 99"):
        reopened.decrypt_result(forged)


def test_estimator_conventions():
    from medblindtuner import EncryptedHeadClassifier

    clf = EncryptedHeadClassifier(epochs=3)
    assert clf.get_params()["epochs"] == 3
    assert clf.set_params(patience=2) is clf and clf.patience == 2
    with pytest.raises(ValueError, match="colour"):  # scikit-learn's "Invalid parameter"
        clf.set_params(colour="red")
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted"):
        clf.predict(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="two classes"):
        clf.fit(np.zeros((4, 2)), np.zeros(4), np.zeros((2, 2)), np.zeros(2))


def test_folder_holding_the_secret_key_goes_with_the_estimator(example):
    """Without a workdir, the hospital folder (secret key included) is not left behind."""
    import gc

    clf = example.pop("clf")
    folder = Path(clf.scratch_.name)
    assert (folder / "hospital").is_dir()
    assert clf.hospital_.folder.root.is_relative_to(folder)
    del clf
    gc.collect()
    assert not folder.exists()
