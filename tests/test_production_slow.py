"""Production parameters (ring 2^16, 128-bit): one sparse bootstrap of a model ciphertext.

Slow (keys take about a minute and ~5 GB of RAM): run with `bash run.sh test -m slow`.
"""

from __future__ import annotations

import numpy as np
import pytest

from medblindtuner.he.engine import Evaluator
from medblindtuner.he.keys import HospitalKeys
from medblindtuner.he.packing import PackingLayout
from medblindtuner.he.params import PRODUCTION


@pytest.mark.slow
def test_production_sparse_bootstrap_and_products():
    layout = PackingLayout(PRODUCTION.slots, 64)
    params = PRODUCTION.with_bootstrap_slots((layout.block,))
    keys = HospitalKeys.generate(params, layout.rotation_indices)
    assert params.is_secure
    ev = Evaluator(keys.context, params)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (layout.samples_per_ct, 64)) / 8
    w = rng.uniform(-1, 1, 64)
    logits = ev.rotate_and_sum(ev.mul(keys.encrypt(layout.encode_x_dup(x), 13),
                                      keys.encrypt(layout.encode_weights(w), 13)),
                               layout.logit_strides)
    assert np.max(np.abs(layout.decode_per_sample(keys.decrypt(logits), len(x)) - x @ w)) < 1e-6
    ct = keys.encrypt(layout.encode_weights(w), 13)
    while ev.levels_left(ct) > 1:
        ct = ev.mul_scalar(ct, 1.0)
    fresh = ev.bootstrap(ct, period=layout.block)
    assert ev.levels_left(fresh) == 9
    assert np.max(np.abs(layout.decode_weights(keys.decrypt(fresh)) - w)) < 1e-3


@pytest.mark.slow
def test_production_hospital_refresh_of_a_spent_model(tmp_path):
    """Refresh mode "hospital" at its production parameters (ring 2^15, 128-bit, depth 12):
    a model ciphertext spent down to the last refreshable level comes back at level 0 with 9
    usable levels and within 1e-4; the key holder reloads its secret key from disk as
    `hospital fetch` does (a deserialised context)."""
    from medblindtuner.he.params import HOSPITAL, params_for_mode
    from medblindtuner.he.refresh import CloudRefresher, masked_share, request_levels

    params = params_for_mode(HOSPITAL)
    layout = PackingLayout(params.slots, 64)
    keys = HospitalKeys.generate(params, layout.rotation_indices)
    assert params.is_secure and params.ring_dim == 1 << 15 and params.bootstrap_slots == ()
    keys.save_public_bundle(tmp_path / "bundle")
    keys.save_secret_key(tmp_path / "secret_key.bin")
    holder = HospitalKeys.load(tmp_path / "bundle", tmp_path / "secret_key.bin",
                               with_eval_keys=False)
    levels = request_levels(holder.context, holder.public_key, params)

    def key_holder(request: bytes) -> bytes:
        from medblindtuner.he.refresh import RefreshRequest
        return masked_share(holder.context, holder.secret_key, holder.public_key,
                            RefreshRequest.from_bytes(request), levels).to_bytes()

    ev = Evaluator(keys.context, params, keys.public_key,
                   CloudRefresher(keys.context, params, keys.public_key, key_holder, "job"))
    w = np.random.default_rng(0).uniform(-1, 1, 64)
    ct = keys.encrypt(layout.encode_weights(w), 0)
    while ev.levels_left(ct) > 0:
        ct = ev.mul_scalar(ct, 1.0)
    fresh = ev.bootstrap(ct, period=layout.block)
    assert fresh.GetLevel() == 0 and ev.levels_left(fresh) == 9
    assert np.max(np.abs(layout.decode_weights(keys.decrypt(fresh)) - w)) < 1e-4
