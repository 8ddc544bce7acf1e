"""The class-rotation softmax layout, simulated slot by slot in numpy (no CKKS).

Every rotation, mask and rotate-and-sum of the encrypted softmax step is replayed on plain slot
vectors (np.roll plays EvalRotate) and must give exactly the plaintext mirror's gradient: this
checks the layout's bookkeeping independently of CKKS noise. The encrypted step itself is
checked against the mirror in tests/test_encrypted_training.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from medblindtuner.he.packing import PackingLayout, SoftmaxLayout
from medblindtuner.training.approx import ActivationPlan
from medblindtuner.training.plain import one_hot


def rot(v: np.ndarray, k: int) -> np.ndarray:
    """EvalRotate(ct, k): slot t receives slot t + k."""
    return np.roll(v, -k)


def rotsum(v: np.ndarray, strides: list[int]) -> np.ndarray:
    for s in strides:
        v = v + rot(v, s)
    return v


def simulate_step(softmax: SoftmaxLayout, act: ActivationPlan, x, targets, weights, scale):
    """Slot-level replay of EncryptedTrainer.scaled_probabilities + the softmax gradient."""
    layout = softmax.layout
    model = softmax.encode_model(weights)
    x_dup, x_grad = layout.encode_x_dup(x), layout.encode_x_grad(x)
    labels = softmax.encode_labels(targets)
    exps = [act.exp(rotsum(x_dup * rot(model, s), layout.logit_strides))
            for s in softmax.class_shifts]
    total = sum(exps) - (softmax.class_slots - softmax.n_classes) * act.exp(np.zeros(1))[0]
    compact = rotsum(total * softmax.select_mask(), softmax.fold_strides)
    period = softmax.compact_period
    assert np.allclose(compact, np.tile(compact[:period], layout.slots // period))
    inv = act.inverse.scaled(scale)(rot(compact, -layout.block))
    spread = rotsum(inv * softmax.unfold_mask(), softmax.spread_strides)
    probs = [e * spread * softmax.valid_mask(k) for k, e in enumerate(exps)]
    terms = [(a - scale * y) * x_grad for a, y in zip(probs, labels, strict=True)]
    back = sum(rot(t, softmax.class_shifts[-k]) if k else t for k, t in enumerate(terms))
    half = rotsum(back, softmax.period_sum_strides)
    gradient = half + rot(half, -layout.block)
    return softmax.decode_model(gradient), gradient, probs


@pytest.mark.parametrize(("slots", "n_features", "n_classes", "n_samples"),
                         [(2048, 8, 5, 64), (2048, 16, 3, 50), (4096, 16, 8, 100),
                          (32768, 64, 5, 256)])
def test_layout_reproduces_the_mirror_gradient(slots, n_features, n_classes, n_samples):
    rng = np.random.default_rng(n_classes)
    layout = PackingLayout(slots, n_features)
    softmax = SoftmaxLayout(layout, n_classes)
    act = ActivationPlan.default(n_classes)
    x = rng.normal(size=(n_samples, n_features))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, n_samples)
    targets = one_hot(y, n_classes)
    weights = rng.normal(scale=0.8, size=(n_classes, n_features))
    scale = 0.7 / n_samples

    got, gradient, probs = simulate_step(softmax, act, x, targets, weights, scale)

    expected = (scale * act.probabilities(x @ weights.T) - scale * targets).T @ x
    assert np.max(np.abs(got - expected)) < 1e-12
    # the update is already in the model layout: Q-periodic, padding rows zero
    assert np.max(np.abs(gradient - softmax.encode_model(expected))) < 1e-12
    # every sample sees each real class exactly once over the rotations
    seen = np.zeros((n_samples, n_classes))
    for k, p in enumerate(probs):
        classes = softmax.class_of(np.arange(n_samples), k)
        values = layout.decode_per_sample(p, n_samples)
        real = classes < n_classes
        seen[np.arange(n_samples)[real], classes[real]] += values[real]
        assert np.all(values[~real] == 0)
    assert np.allclose(seen, scale * act.probabilities(x @ weights.T))


def test_compact_offsets_are_distinct_and_inside_the_first_half():
    softmax = SoftmaxLayout(PackingLayout(32768, 64), 5)
    period = softmax.compact_period
    slots = [(i * softmax.layout.stride + softmax.compact_offset(i)) % period
             for i in range(softmax.layout.samples_per_ct)]
    assert len(set(slots)) == softmax.layout.samples_per_ct
    assert max(softmax.compact_offset(i) for i in range(256)) < softmax.layout.block
    assert (softmax.model_period, period) == (1024, 512)


def test_row_extraction_gives_the_d_periodic_weight_layout():
    layout = PackingLayout(2048, 12)
    softmax = SoftmaxLayout(layout, 5)
    weights = np.arange(5 * 12, dtype=float).reshape(5, 12)
    model = softmax.encode_model(weights)
    for j in range(5):
        row = rotsum(model * softmax.row_mask(j), softmax.row_strides)
        assert np.array_equal(row, layout.encode_weights(weights[j]))


def test_layout_refuses_binary_heads_and_too_wide_models():
    with pytest.raises(ValueError, match="binary"):
        SoftmaxLayout(PackingLayout(2048, 8), 2)
    with pytest.raises(ValueError, match="reduce the feature width"):
        SoftmaxLayout(PackingLayout(2048, 128), 5)
