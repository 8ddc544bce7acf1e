"""How many towers an interactive refresh needs under a joint key (docs/design.md, "Joint
refresh by a consortium"), and which ring OpenFHE picks for the joint refresh depth.

    python benchmarks/joint_refresh_towers.py

For n = 1 (one key holder), 2, 3 and 5 parties (chained `MultipartyKeyGen`), encrypts random
values in [-4, 4] at a level where `IntMPBootAdjustScale` keeps 3 or 4 towers, refreshes with
every party's `IntMPBootDecrypt` share (one common random element), decrypts with all n
shares and prints the largest error ("garbage" when OpenFHE refuses to decode). Insecure
ring 2^12 with the refresh mode's moduli; then the smallest 128-bit ring for depth 12 and 13.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medblindtuner.he.params import (
    HOSPITAL,
    build_context,
    params_for_mode,
    smallest_openfhe_ring,
)


def trial(n: int, depth: int, level: int, reps: int = 3) -> tuple[int, list[float]]:
    params = replace(params_for_mode(HOSPITAL, insecure=True), depth=depth)
    cc = build_context(params)
    pairs = [cc.KeyGen()]
    for _ in range(n - 1):
        pairs.append(cc.MultipartyKeyGen(pairs[-1].publicKey))
    pk = pairs[-1].publicKey
    errors = []
    for seed in range(reps):
        x = np.random.default_rng(seed).uniform(-4, 4, params.slots)
        ct = cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(list(x), 1, level, None, params.slots))
        adjusted = cc.IntMPBootAdjustScale(ct)
        c1 = adjusted.Clone()
        c1.RemoveElement(0)
        a = cc.IntMPBootRandomElementGen(pk)
        shares = [cc.IntMPBootDecrypt(p.secretKey, c1, a) for p in pairs]
        fresh = cc.IntMPBootEncrypt(pk, cc.IntMPBootAdd(shares), a, adjusted)
        parts = [cc.MultipartyDecryptLead([fresh], pairs[0].secretKey)[0]]
        parts += [cc.MultipartyDecryptMain([fresh], p.secretKey)[0] for p in pairs[1:]]
        try:
            plain = cc.MultipartyDecryptFusion(parts)
            plain.SetLength(params.slots)
            errors.append(float(np.max(np.abs(np.asarray(plain.GetRealPackedValue()) - x))))
        except RuntimeError:
            errors.append(float("inf"))
    return depth + 1 - adjusted.GetLevel(), errors


def main() -> None:
    for n in (1, 2, 3, 5):
        for depth, level in ((12, 9), (13, 9)):
            towers, errors = trial(n, depth, level)
            shown = ", ".join("garbage" if e == float("inf") else f"{e:.2g}" for e in errors)
            print(f"n={n} depth={depth} input level {level}: {towers} towers -> {shown}")
    for depth in (12, 13):
        probe = replace(params_for_mode(HOSPITAL, insecure=True), ring_dim=1 << 16,
                        security="HEStd_128_classic", depth=depth)
        print(f"depth {depth}, {probe.scaling_bits}-bit scaling, Q = {probe.modulus_bits} "
              f"bits: OpenFHE's smallest 128-bit ring {smallest_openfhe_ring(probe)}")


if __name__ == "__main__":
    main()
