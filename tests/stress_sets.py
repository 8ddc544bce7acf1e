"""Feature sets unlike the ones the recipe was built on, for the plaintext stress suite.

Each set is a `FeatureSet` the recipe has never seen: large margins, heavy imbalance,
10^2 to 10^5 training samples, 2 to 10 classes, other raw scales and widths, and features
shaped like other backbones' (ReLU-pooled CNN features: non-negative, skewed, low-rank;
transformer CLS tokens: a few dimensions with huge activations; transformer features with
heavy tails, per-dimension gains and large norms, 192 to 768 wide). Test splits are large
(1,000 samples) so that one point of ACC is ten samples; validation splits are capped at
1,000 samples so that the suite stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medblindtuner.features.backbones import BackboneInfo
from medblindtuner.features.extract import FeatureSet


@dataclass(frozen=True)
class StressCase:
    """One synthetic set: `shape` picks how the class signal is turned into features."""

    name: str
    n_train: int
    dim: int
    n_classes: int
    separation: float
    priors: tuple[float, ...] = ()
    shape: str = "gaussian"  # gaussian | relu_pooled | cls_token | transformer
    scale: float = 1.0
    shift: float = 0.0
    label_noise: float = 0.0  # fraction of labels replaced by a random class
    seed: int = 0

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": min(max(200, self.n_train // 4), 1000),
                "test": 1000}


CASES: tuple[StressCase, ...] = (
    # logits of 25+ under the probe's prior: the sigmoid ladder must reach them
    StressCase("large-margin CNN-like binary", 2000, 256, 2, 0.6, label_noise=0.02,
               shape="relu_pooled"),
    StressCase("nearly separable binary", 1500, 64, 2, 3.0),
    StressCase("heavy imbalance 97:3", 3000, 64, 2, 0.6, priors=(0.97, 0.03)),
    StressCase("100 samples", 100, 64, 2, 0.5),
    StressCase("100 samples 3 classes", 100, 32, 3, 0.7),
    StressCase("100,000 samples", 100_000, 16, 2, 0.3),
    StressCase("10 classes", 2000, 64, 10, 0.6),
    StressCase("large margin 5 classes", 800, 48, 5, 1.5),
    StressCase("raw scale 1e4, offset", 1500, 80, 2, 0.4, scale=1e4, shift=-300.0),
    StressCase("raw scale 1e-4, 4 classes", 1500, 80, 4, 0.5, scale=1e-4, shift=2.0),
    StressCase("CNN-like 2048-d", 600, 2048, 2, 0.25, shape="relu_pooled"),
    StressCase("ViT-like 768-d 3 classes", 800, 768, 3, 0.35, shape="cls_token"),
    StressCase("ViT-like 384-d imbalanced", 1000, 384, 2, 0.4, priors=(0.85, 0.15),
               shape="cls_token"),
    # transformer features as an ONNX encoder gives them (issue #25's check): heavy tails,
    # per-dimension gains, a few massive dimensions, norms in the tens to hundreds
    StressCase("ViT-Ti-like 192-d heavy-tailed 4 classes", 1500, 192, 4, 0.45,
               shape="transformer", scale=8.0),
    StressCase("ViT-S-like 384-d heavy-tailed", 3000, 384, 2, 0.3, shape="transformer",
               scale=20.0),
    StressCase("ViT-B-like 768-d heavy-tailed imbalanced", 1200, 768, 2, 0.35,
               priors=(0.8, 0.2), shape="transformer", scale=50.0),
    StressCase("5,000 strongly separated binary", 5000, 384, 2, 1.2, label_noise=0.01,
               shape="transformer", scale=20.0),
    StressCase("very imbalanced 99:1", 5000, 128, 2, 0.9, priors=(0.99, 0.01),
               shape="relu_pooled"),
    # a dermatology-like multi-class set: 7 classes, one of them two thirds of the images
    StressCase("7 classes imbalanced", 7000, 256, 7, 0.35,
               priors=(0.67, 0.11, 0.11, 0.05, 0.03, 0.02, 0.01)),
)

# Larger sets shaped like held-out MedMNIST ones (blood-, organ-, pneumonia-, path-like
# sizes and classes, 768 to 1280 wide): 30-60 s each, too slow for the fast suite;
# `python benchmarks/stress_extra.py` runs them.
EXTRA_CASES: tuple[StressCase, ...] = (
    StressCase("8 classes 12,000 CNN-like 1280-d", 12000, 1280, 8, 0.3, shape="relu_pooled"),
    StressCase("11 classes 10,000 CNN-like 1280-d", 10000, 1280, 11, 0.35,
               shape="relu_pooled", seed=3),
    StressCase("pneumonia-like 74:26 1280-d", 4700, 1280, 2, 0.35, priors=(0.26, 0.74),
               shape="relu_pooled", seed=4),
    StressCase("9 classes 20,000 ViT 768-d", 20000, 768, 9, 0.3, shape="transformer",
               scale=20.0, seed=5),
)

_INFO = BackboneInfo(name="synthetic", arch="none", feature_dim=0, weights_source="test",
                     weights_sha256="-", pretrained=False, input_size=28,
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _features(case: StressCase, latent: np.ndarray, mixing: np.ndarray,
              spikes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Backbone-shaped features of latent class signals."""
    mixed = latent @ mixing
    if case.shape == "relu_pooled":  # average of ReLUs: non-negative, skewed, mostly small
        return np.maximum(mixed + rng.normal(0, 0.5, mixed.shape) - 0.5, 0.0) ** 1.5
    if case.shape == "cls_token":  # a few "massive activation" dimensions, the rest Gaussian
        return mixed + spikes * (1.0 + 0.1 * rng.normal(size=(len(mixed), 1)))
    if case.shape == "transformer":  # Student-t (3) noise, LayerNorm-like gains, spikes
        gains = np.exp(rng.normal(0, 0.7, mixed.shape[1]))
        tails = rng.standard_t(3, mixed.shape)
        return (mixed + tails) * gains + spikes * (1.0 + 0.2 * rng.standard_t(3, (len(mixed), 1)))
    return mixed


def make_features(case: StressCase) -> FeatureSet:
    """Classes as Gaussian blobs in a low-rank latent space, seen through the case's shape."""
    rng = np.random.default_rng(case.seed)
    rank = min(case.dim, 32)
    means = rng.normal(0, case.separation, (case.n_classes, rank))
    mixing = rng.normal(0, 1 / np.sqrt(rank), (rank, case.dim)) * rng.uniform(0.3, 2.0, case.dim)
    spikes = np.zeros(case.dim)
    spikes[rng.choice(case.dim, 3, replace=False)] = 40.0
    priors = np.asarray(case.priors or [1.0] * case.n_classes)
    splits = {}
    for split, size in case.sizes.items():
        labels = rng.choice(case.n_classes, size=size, p=priors / priors.sum())
        labels[:case.n_classes] = np.arange(case.n_classes)  # every class in every split
        latent = means[labels] + rng.normal(0, 1, (size, rank))
        flipped = rng.random(size) < case.label_noise
        labels[flipped] = rng.choice(case.n_classes, size=int(flipped.sum()))
        x = _features(case, latent, mixing, spikes, rng) + rng.normal(0, 0.3, (size, case.dim))
        splits[split] = ((case.scale * x + case.shift).astype(np.float32),
                         labels.astype(np.int64))
    info = BackboneInfo(**{**_INFO.__dict__, "feature_dim": case.dim})
    return FeatureSet(dataset_name=case.name, dataset_md5="-", n_classes=case.n_classes,
                      splits=splits, backbone=info)


def binary_task(features: FeatureSet, positive: set[int], name: str) -> FeatureSet:
    """A binary task derived from a multi-class set: `positive` classes against the rest."""
    splits = {s: (x, np.isin(np.asarray(y).reshape(-1), list(positive)).astype(np.int64))
              for s, (x, y) in features.splits.items()}
    return FeatureSet(dataset_name=name, dataset_md5=features.dataset_md5, n_classes=2,
                      splits=splits, backbone=features.backbone)
