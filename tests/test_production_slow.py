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
