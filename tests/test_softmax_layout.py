"""The class-diagonal softmax layout, simulated slot by slot in numpy (no CKKS).

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


def unit_series(approx, u: np.ndarray) -> np.ndarray:
    """EvalChebyshevSeries on [-1, 1]: the series of `approx` at an input already mapped."""
    coeffs = np.array(approx.coefficients)
    return np.polynomial.chebyshev.chebval(u, coeffs) - 0.5 * coeffs[0]


def diagonals_of(softmax: SoftmaxLayout, act: ActivationPlan, model: list[np.ndarray],
                 weights: list[float]) -> list[np.ndarray]:
    """StepKernel.diagonals: masked shifts of the model pair, the exp's unit scale folded in."""
    alpha, stride = act.exp.unit_map[0], softmax.layout.stride
    return [sum(softmax.diagonal_mask(k, s) * alpha
                * sum(c * rot(m, stride * s) for m, c in zip(model, weights, strict=True))
                for s in softmax.diagonal_shifts(k))
            for k in range(softmax.n_classes)]


def gather(softmax: SoftmaxLayout, terms: list[np.ndarray]) -> np.ndarray:
    """StepKernel.gather: per-diagonal terms back into the model layout (before the period
    sum)."""
    stride, width = softmax.layout.stride, softmax.class_slots
    return sum(rot(sum(softmax.diagonal_mask(k, s) * t for k, t in enumerate(terms)
                       if s in softmax.diagonal_shifts(k)), stride * (width - s))
               for s in softmax.model_shifts)


def simulate_step(softmax: SoftmaxLayout, act: ActivationPlan, x, targets, weights, scale,
                  x_val=None, weights_val=None):
    """Slot-level replay of StepKernel's softmax phases and the driver's fold, refresh and
    period sum; `x` is split into the step's chunks (consecutive full ciphertexts); with
    `x_val`, a validation chunk (model `weights_val`) rides in the same compact vector."""
    layout, d = softmax.layout, softmax.layout.block
    per_ct = layout.samples_per_ct
    model = softmax.encode_model(weights)
    alpha_inv, beta_inv = act.inverse.unit_map

    def exps_of(xs, m):
        x_dup = layout.encode_x_dup(xs)
        beta = act.exp.unit_map[1]
        return [unit_series(act.exp, rotsum(x_dup * w, layout.logit_strides) + beta)
                for w in diagonals_of(softmax, act, [m], [1.0])]

    def picked(exps):
        return sum(exps) * (alpha_inv * softmax.select_mask())

    starts = list(range(0, len(x), per_ct))
    chunk_exps = [exps_of(x[i : i + per_ct], model) for i in starts]
    compacts: dict[int, np.ndarray] = {}
    for j, e in enumerate(chunk_exps):  # each denominator group of chunks has its own vector
        group = softmax.group_of(j)
        compacts[group] = compacts.get(group, 0) + rot(picked(e), -softmax.chunk_shift(j))
    last = softmax.group_of(len(starts) - 1)
    rides = softmax.validation_rides(len(starts) - last * softmax.chunks)
    val_shift = softmax.place_shift(softmax.validation_place)
    if x_val is not None:
        val_exps = exps_of(x_val, softmax.encode_model(weights_val))
        if rides:  # the last group's last place; otherwise a compact vector of its own
            compacts[last] = compacts[last] + rot(picked(val_exps), -val_shift)
        else:
            compacts["validation"] = picked(val_exps)

    def refresh(compact):
        compact = rotsum(compact, softmax.fold_strides)
        period = softmax.group_compact_period
        assert np.allclose(compact, np.tile(compact[:period], layout.slots // period))
        assert softmax.bootstrap_period % period == 0  # bootstrapped at the common slot count
        return unit_series(act.inverse, compact + beta_inv)

    inverses = {group: refresh(compact) for group, compact in compacts.items()}

    def spread(inv, rotation, s, exps):
        own = rot(inv, rotation)
        values = rotsum(own * (s * softmax.unfold_mask()), softmax.spread_strides)
        return [e * values for e in exps]

    probs, back = [], 0
    for j, (i, exps) in enumerate(zip(starts, chunk_exps, strict=True)):
        inv = inverses[softmax.group_of(j)]
        probs.append(spread(inv, softmax.chunk_shift(j) - d, scale, exps))
        labels = softmax.encode_labels(targets[i : i + per_ct])
        x_grad = layout.encode_x_grad(x[i : i + per_ct])
        terms = [(a - scale * y) * x_grad for a, y in zip(probs[-1], labels, strict=True)]
        back = back + gather(softmax, terms)
    half = rotsum(back, softmax.period_sum_strides)
    gradient = half + rot(half, -d)
    ridden = None
    if x_val is not None:
        ridden = (spread(inverses[last], val_shift - d, 1.0, val_exps) if rides
                  else spread(inverses["validation"], -d, 1.0, val_exps))
    return softmax.decode_model(gradient), gradient, probs, ridden


def per_sample_probabilities(softmax: SoftmaxLayout, probs, n_samples: int) -> np.ndarray:
    """Collect p[i, class] from the diagonal ciphertexts (first slot of each block)."""
    seen = np.zeros((n_samples, softmax.n_classes))
    for k, p in enumerate(probs):
        classes = softmax.class_of(np.arange(n_samples), k)
        seen[np.arange(n_samples), classes] += softmax.layout.decode_per_sample(p, n_samples)
    return seen


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

    got, gradient, probs, _ = simulate_step(softmax, act, x, targets, weights, scale)

    expected = (scale * act.probabilities(x @ weights.T) - scale * targets).T @ x
    assert np.max(np.abs(got - expected)) < 1e-12
    # the update is already in the model layout: Q-periodic, padding rows zero
    assert np.max(np.abs(gradient - softmax.encode_model(expected))) < 1e-12
    # every sample sees each class exactly once over the diagonals
    seen = per_sample_probabilities(softmax, probs[0], n_samples)
    assert np.allclose(seen, scale * act.probabilities(x @ weights.T))


@pytest.mark.parametrize(("slots", "n_features", "n_classes", "n_samples", "n_val"),
                         [(2048, 8, 5, 64, 64), (2048, 16, 3, 50, 7), (32768, 32, 5, 512, 120)])
def test_validation_chunk_rides_in_the_second_halves(slots, n_features, n_classes, n_samples,
                                                     n_val):
    """One compact vector carries a training batch and a validation chunk (two models): the
    step's gradient and the chunk's probabilities are both exact."""
    rng = np.random.default_rng(n_val)
    softmax = SoftmaxLayout(PackingLayout(slots, n_features), n_classes)
    act = ActivationPlan.default(n_classes)
    x, x_val = (rng.normal(size=(n, n_features)) for n in (n_samples, n_val))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x_val /= np.linalg.norm(x_val, axis=1, keepdims=True)
    targets = one_hot(rng.integers(0, n_classes, n_samples), n_classes)
    weights, weights_val = (rng.normal(scale=0.8, size=(n_classes, n_features)) for _ in "ab")
    scale = 0.7 / n_samples

    got, _, _, ridden = simulate_step(softmax, act, x, targets, weights, scale, x_val,
                                      weights_val)

    expected = (scale * act.probabilities(x @ weights.T) - scale * targets).T @ x
    assert np.max(np.abs(got - expected)) < 1e-12
    assert np.allclose(per_sample_probabilities(softmax, ridden, n_val),
                       act.probabilities(x_val @ weights_val.T))


@pytest.mark.parametrize(("slots", "n_features", "n_classes", "n_samples", "n_val", "group"),
                         [(2048, 8, 5, 300, 40, 3), (2048, 8, 3, 512, 0, 4),
                          (4096, 16, 8, 700, 90, 3), (32768, 32, 5, 3000, 400, 6),
                          (2048, 8, 5, 300, 40, 2), (2048, 8, 5, 300, 40, 1),
                          (32768, 32, 5, 3000, 400, 2)])
def test_a_step_over_several_chunks_shares_denominator_bootstraps(
        slots, n_features, n_classes, n_samples, n_val, group):
    """Chunks shifted by j P before one fold over K P per group of `group` chunks: every
    chunk's gradient and the ridden validation chunk's probabilities are exact, as for one
    chunk, whether a step is one group or several."""
    rng = np.random.default_rng(n_samples)
    layout = PackingLayout(slots, n_features)
    chunks = -(-n_samples // layout.samples_per_ct)
    softmax = SoftmaxLayout(layout, n_classes, group)
    assert chunks > 1 and softmax.group_compact_period <= slots // 2
    act = ActivationPlan.default(n_classes)
    x = rng.normal(size=(n_samples, n_features))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    targets = one_hot(rng.integers(0, n_classes, n_samples), n_classes)
    weights = rng.normal(scale=0.8, size=(n_classes, n_features))
    x_val = weights_val = None
    if n_val:
        x_val = rng.normal(size=(n_val, n_features))
        x_val /= np.linalg.norm(x_val, axis=1, keepdims=True)
        weights_val = rng.normal(scale=0.8, size=(n_classes, n_features))
    scale = 0.7 / n_samples

    got, _, probs, ridden = simulate_step(softmax, act, x, targets, weights, scale, x_val,
                                          weights_val)

    expected = (scale * act.probabilities(x @ weights.T) - scale * targets).T @ x
    assert np.max(np.abs(got - expected)) < 1e-12
    per_ct = layout.samples_per_ct
    for j, p in enumerate(probs):
        part = x[j * per_ct : (j + 1) * per_ct]
        assert np.allclose(per_sample_probabilities(softmax, p, len(part)),
                           scale * act.probabilities(part @ weights.T))
    if n_val:
        assert np.allclose(per_sample_probabilities(softmax, ridden, n_val),
                           act.probabilities(x_val @ weights_val.T))


def test_layout_refuses_more_chunks_than_one_bootstrap_holds():
    layout = PackingLayout(2048, 8)
    assert SoftmaxLayout.max_chunks(layout) == 8  # 4 compact periods, two places each
    with pytest.raises(ValueError, match="more than one denominator bootstrap holds"):
        SoftmaxLayout(layout, 5, chunks=9)


@pytest.mark.parametrize(("n_features", "chunks"), [(8, 1), (8, 2), (8, 3), (8, 8), (32, 5)])
def test_places_of_a_group_land_on_distinct_compact_slots(n_features, chunks):
    """Every sample of every place (the validation place included) has its own slot of the
    folded K P-periodic vector, and moving back by place_shift - d puts it in the second half
    of its own block."""
    softmax = SoftmaxLayout(PackingLayout(32768 if n_features == 32 else 2048, n_features),
                            5, chunks)
    layout, period = softmax.layout, softmax.group_compact_period
    seen = set()
    for place in range(softmax.places):
        for i in range(layout.samples_per_ct):
            slot = i * layout.stride + softmax.compact_offset(i)
            moved = slot + softmax.place_shift(place)
            seen.add(moved % period)
            back = (moved - (softmax.place_shift(place) - layout.block)) % layout.slots
            assert back == i * layout.stride + layout.block + softmax.compact_offset(i)
    assert len(seen) == softmax.places * layout.samples_per_ct
    assert softmax.validation_rides(chunks) == (chunks < softmax.places)


@pytest.mark.parametrize(("n_features", "step_chunks", "group", "slots"),
                         [(32, 7, 4, 2048), (32, 2, 2, 1024), (32, 1, 1, 1024),
                          (64, 14, 8, 2048), (16, 3, 2, 2048), (128, 5, 5, 2048)])
def test_production_denominator_groups_stay_within_the_bootstrap_slot_cap(
        n_features, step_chunks, group, slots):
    """However many chunks a production step has, one denominator bootstrap covers at most
    MAX_DENOMINATOR_SLOTS slots, and model and denominators share that one slot count."""
    from medblindtuner.training.plan import MAX_DENOMINATOR_SLOTS, denominator_group_chunks

    layout = PackingLayout(32768, n_features)
    assert denominator_group_chunks(layout, step_chunks) == group
    softmax = SoftmaxLayout(layout, 5, group)
    assert softmax.group_compact_period <= MAX_DENOMINATOR_SLOTS
    assert softmax.bootstrap_period == slots
    assert softmax.bootstrap_period % softmax.model_period == 0
    assert [softmax.group_of(p) for p in range(5)] == [p // group for p in range(5)]


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


@pytest.mark.parametrize("chunks", [1, 3])
def test_kernel_rotations_leave_the_drivers_to_the_driver(chunks):
    """A shard worker's rotation keys (`kernel_rotation_indices`) are part of the plan's and
    hold none of the driver's fold and period-sum strides; the cluster tests show a kernel
    computes with these keys alone."""
    layout = PackingLayout(4096, 8)
    softmax = SoftmaxLayout(layout, 5, chunks)
    kernel = set(softmax.kernel_rotation_indices)
    assert kernel <= set(softmax.rotation_indices)
    assert kernel.isdisjoint(softmax.fold_strides + softmax.period_sum_strides)
    assert chunks == 1 or -softmax.chunk_shift(chunks - 1) in kernel


@pytest.mark.parametrize("n_classes", range(3, 17))
def test_diagonals_see_every_class_once_from_at_most_three_shifts(n_classes):
    """c diagonals (not C = next_pow2(c)): each sample sees each class once, each diagonal's
    masks split the blocks between at most three model shifts, and a power of two is the
    plain rotation (one shift per diagonal, no mask)."""
    softmax = SoftmaxLayout(PackingLayout(32768, 8), n_classes)
    samples = np.arange(softmax.layout.samples_per_ct)
    seen = np.stack([softmax.class_of(samples, k) for k in range(n_classes)], axis=1)
    assert np.array_equal(np.sort(seen, axis=1), np.tile(np.arange(n_classes), (len(samples), 1)))
    for k in range(n_classes):
        shifts = softmax.diagonal_shifts(k)
        assert len(shifts) <= 3
        masks = sum(softmax.diagonal_mask(k, s) for s in shifts)
        assert np.array_equal(masks, np.ones(softmax.layout.slots))
        rows = (samples % softmax.class_slots + softmax.diagonal_shift(samples, k)) \
            % softmax.class_slots
        assert np.array_equal(rows, seen[:, k])  # the shifted model holds the sample's class
    assert softmax.cyclic == (n_classes in (4, 8, 16))
    if softmax.cyclic:
        assert all(softmax.diagonal_shifts(k) == [k] for k in range(n_classes))
