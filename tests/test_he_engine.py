"""CKKS engine: parameters, key roles, bundles, packed products vs numpy (insecure test ring)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import openfhe as ofhe
import pytest

from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import (
    BundleError,
    CloudCrypto,
    HospitalKeys,
    ShardKeys,
    verify_public_bundle,
)
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import INSECURE_TEST, PRODUCTION, ParameterError, require_secure
from medblindtuner.training.approx import ChebyshevApprox

# Tolerances: CKKS at 50-bit scale gives ~1e-9 relative error per operation; after a sparse
# bootstrap the error is ~1e-5 (measured); products below stay well under these bounds.
PRODUCT_TOL = 1e-6
BOOTSTRAP_TOL = 1e-3

FEATURE_COUNTS = [5, 8, 13, 33]  # includes non-powers of two (padding)
SHARD_ROTATIONS = [1, 2, 4]  # a step kernel's rotations at 8 features (its logit strides)


@pytest.fixture(scope="module")
def keys():
    blocks = sorted({PackingLayout(INSECURE_TEST.slots, n).block for n in FEATURE_COUNTS})
    params = INSECURE_TEST.with_bootstrap_slots(tuple(blocks))
    rotations = sorted({r for n in FEATURE_COUNTS
                        for r in PackingLayout(params.slots, n).rotation_indices})
    return HospitalKeys.generate(params, rotations, allow_insecure=True,
                                 shard_rotation_indices=SHARD_ROTATIONS)


def test_insecure_parameters_need_explicit_opt_in():
    with pytest.raises(ParameterError, match="not 128-bit secure"):
        require_secure(INSECURE_TEST)
    require_secure(INSECURE_TEST, allow_insecure=True)
    assert PRODUCTION.is_secure and PRODUCTION.ring_dim == 1 << 16
    with pytest.raises(ParameterError):
        HospitalKeys.generate(INSECURE_TEST, [1])


def test_parameter_mismatch_is_refused():
    other = INSECURE_TEST.with_bootstrap_slots((8,))
    with pytest.raises(ParameterError, match="refusing to mix"):
        INSECURE_TEST.check_matches(other, "this ciphertext")


@pytest.mark.parametrize("n_features", FEATURE_COUNTS)
def test_logits_and_gradient_products_match_numpy(keys, n_features):
    """A @ B^T (logits) and A^T @ B (gradient) in the packed layout vs numpy."""
    layout = PackingLayout(keys.params.slots, n_features)
    rng = np.random.default_rng(n_features)
    n = layout.samples_per_ct - 1  # a partial batch: padding must not leak in
    x = rng.uniform(-1, 1, (n, n_features)) / np.sqrt(n_features)
    w = rng.uniform(-1, 1, n_features)
    e = rng.uniform(-1, 1, n)
    ev = Evaluator(keys.context, keys.params)
    x_dup = keys.encrypt(layout.encode_x_dup(x))
    x_grad = keys.encrypt(layout.encode_x_grad(x))
    logits = ev.rotate_and_sum(ev.mul(x_dup, keys.encrypt(layout.encode_weights(w))),
                               layout.logit_strides)
    z = layout.decode_per_sample(keys.decrypt(logits), n)
    assert np.max(np.abs(z - x @ w)) < PRODUCT_TOL
    grad = ev.rotate_and_sum(ev.mul(keys.encrypt(layout.encode_per_sample(e)), x_grad),
                             layout.gradient_strides)
    g_slots = keys.decrypt(grad)
    assert np.max(np.abs(layout.decode_weights(g_slots) - e @ x)) < PRODUCT_TOL
    # the gradient comes out in the weight layout (replicated with period d)
    assert np.max(np.abs(g_slots - layout.encode_weights(e @ x))) < PRODUCT_TOL
    assert ev.ops["rotations"] == len(layout.logit_strides) + len(layout.gradient_strides)


def test_chebyshev_series_matches_plaintext_mirror(keys):
    approx = ChebyshevApprox("sigmoid", -12, 12, 27).scaled(0.25)
    x = np.linspace(-11.9, 11.9, keys.params.slots)
    ev = Evaluator(keys.context, keys.params)
    out = ev.chebyshev(keys.encrypt(x), approx.coefficients, approx.a, approx.b)
    assert np.max(np.abs(keys.decrypt(out) - approx(x))) < PRODUCT_TOL


def test_series_on_the_unit_interval_costs_one_level_less(keys):
    """The exp and the inverse are evaluated on inputs already mapped onto [-1, 1]
    (`ChebyshevApprox.unit_map`): same values, and OpenFHE skips its own linear map."""
    approx = ChebyshevApprox("exp", -5, 5, 9)
    x = np.linspace(-4.9, 4.9, keys.params.slots)
    alpha, beta = approx.unit_map
    ev = Evaluator(keys.context, keys.params)
    ct = keys.encrypt(x)
    mapped = ev.add_scalar(ev.mul_scalar(ct, alpha), beta)
    plain = ev.chebyshev(ct, approx.coefficients, approx.a, approx.b)
    unit = ev.chebyshev_unit(mapped, approx.coefficients)
    assert np.max(np.abs(keys.decrypt(unit) - approx(x))) < PRODUCT_TOL * 150
    # the mapped input spent the level the plain series spends inside itself, so the series
    # on [-1, 1] is one level shallower than OpenFHE's own (degree 9: 4 levels against 5)
    assert ev.effective_level(unit) - ev.effective_level(mapped) == \
        ev.effective_level(plain) - ev.effective_level(ct) - 1 == approx.depth - 1


def test_sparse_bootstrap_refreshes_levels_and_keeps_values(keys):
    layout = PackingLayout(keys.params.slots, 13)
    w = np.random.default_rng(1).uniform(-1, 1, 13)
    ev = Evaluator(keys.context, keys.params)
    ct = keys.encrypt(layout.encode_weights(w))
    while ev.levels_left(ct) > 1:
        ct = ev.mul_scalar(ct, 1.0)
    assert ev.ensure_levels(ct, 1) is ct  # enough levels: no bootstrap
    fresh = ev.ensure_levels(ct, 8, period=layout.block)
    assert ev.ops["bootstraps"] == 1
    # levels between bootstraps with the sparse (2, 2) level budget (fixes the step's design)
    assert ev.levels_left(fresh) == 9
    assert np.max(np.abs(keys.decrypt(fresh) - layout.encode_weights(w))) < BOOTSTRAP_TOL


def test_public_bundle_has_no_secret_and_is_verified(keys, tmp_path):
    manifest = keys.save_public_bundle(tmp_path / "bundle")
    keys.save_secret_key(tmp_path / "home" / "secret_key.bin")
    assert set(manifest["files"]) == {"context.bin", "public_key.bin", "mult_key.bin",
                                      "rotation_keys.bin", "shard_keys.bin"}
    # no file of the bundle contains the secret key's serialized polynomial
    secret = ofhe.Serialize(keys.secret_key, ofhe.BINARY)
    probe = secret[len(secret) // 2 : len(secret) // 2 + 64]
    for path in (tmp_path / "bundle").iterdir():
        assert probe not in path.read_bytes(), path
    verify_public_bundle(tmp_path / "bundle", allow_insecure=True)
    with pytest.raises(ParameterError):
        verify_public_bundle(tmp_path / "bundle")  # insecure params refused by default


def test_shard_keys_are_the_kernel_rotations_alone(keys, tmp_path):
    """The shard file holds the kernel's rotation keys only (a fraction of the bundle's
    rotation and bootstrapping keys); its bytes are checked against the manifest."""
    manifest = keys.save_public_bundle(tmp_path / "bundle")
    assert manifest["shard_rotation_indices"] == SHARD_ROTATIONS
    shard = ShardKeys.read(tmp_path / "bundle", allow_insecure=True)
    assert shard.rotation_indices == tuple(SHARD_ROTATIONS)
    assert set(shard.blobs) == {"context", "public_key", "mult_key", "shard_keys"}
    sizes = {name: info["bytes"] for name, info in manifest["files"].items()}
    assert sizes["shard_keys.bin"] < sizes["rotation_keys.bin"] / 4
    tampered = ShardKeys(shard.params, shard.rotation_indices,
                         {**shard.blobs, "shard_keys": shard.blobs["shard_keys"][:-1] + b"x"},
                         shard.checksums)
    with pytest.raises(BundleError, match="checksum"):
        tampered.check()


def test_bundle_with_secret_or_tampering_is_refused(keys, tmp_path):
    bundle = tmp_path / "bundle"
    keys.save_public_bundle(bundle)
    keys.save_secret_key(tmp_path / "sk.bin")
    (bundle / "public_key.bin").write_bytes((tmp_path / "sk.bin").read_bytes())
    with pytest.raises(BundleError):
        verify_public_bundle(bundle, allow_insecure=True)
    keys.save_public_bundle(bundle)
    with open(bundle / "mult_key.bin", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="checksum"):
        verify_public_bundle(bundle, allow_insecure=True)


def test_cloud_process_evaluates_but_cannot_decrypt(keys, tmp_path):
    """A separate process loads only the public bundle: it computes, and holds no secret."""
    keys.save_public_bundle(tmp_path / "bundle")
    layout = PackingLayout(keys.params.slots, 8)
    w = np.arange(8) / 10.0
    ofhe.SerializeToFile(str(tmp_path / "w.bin"), keys.encrypt(layout.encode_weights(w)),
                         ofhe.BINARY)
    script = textwrap.dedent(f"""
        import openfhe as ofhe
        from medblindtuner.he.keys import CloudCrypto
        from medblindtuner.he.engine import Evaluator
        cloud = CloudCrypto.load({str(tmp_path / 'bundle')!r}, allow_insecure=True)
        assert not hasattr(cloud, "secret_key") and not hasattr(cloud, "decrypt")
        ct, ok = ofhe.DeserializeCiphertext({str(tmp_path / 'w.bin')!r}, ofhe.BINARY)
        ev = Evaluator(cloud.context, cloud.params)
        out = ev.bootstrap(ev.mul_scalar(ct, 2.0), period=8)
        ofhe.SerializeToFile({str(tmp_path / 'out.bin')!r}, out, ofhe.BINARY)
        print("cloud ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    out, ok = ofhe.DeserializeCiphertext(str(tmp_path / "out.bin"), ofhe.BINARY)
    assert ok
    assert np.max(np.abs(layout.decode_weights(keys.decrypt(out)) - 2 * w)) < BOOTSTRAP_TOL
    assert CloudCrypto.__dataclass_fields__.keys().isdisjoint({"secret_key"})
