"""How large a joint refresh's answers are at 128 bits, and what journaling them costs.

    python benchmarks/joint_refresh_answer.py

Three parties (chained `MultipartyKeyGen`) on the consortium's refresh-mode parameters
(`joint_params(params_for_mode("hospital"))`: ring 2^15, depth 13): one request at the
step's last level, each party's random element and (h0, h1) share serialised as the members
send them; the cloud journals 3 random elements and 3 shares a refresh
(`JointCloudRefresher`), written here with `atomic_write_bytes` (fsync) 5 times.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from medblindtuner.formats import atomic_write_bytes
from medblindtuner.he.ciphertexts import ciphertext_to_bytes
from medblindtuner.he.params import build_context, params_for_mode
from medblindtuner.he.threshold import joint_params

PARTIES, REQUEST_LEVEL, WRITES = 3, 9, 5


def main() -> None:
    params = joint_params(params_for_mode("hospital"))
    context = build_context(params)
    pairs = [context.KeyGen()]
    for _ in range(PARTIES - 1):
        pairs.append(context.MultipartyKeyGen(pairs[-1].publicKey))
    public_key = pairs[-1].publicKey
    plaintext = context.MakeCKKSPackedPlaintext([0.5] * 8, 1, REQUEST_LEVEL, None,
                                                params.slots)
    adjusted = context.IntMPBootAdjustScale(context.Encrypt(public_key, plaintext))
    c1 = adjusted.Clone()
    c1.RemoveElement(0)
    elements = [context.IntMPBootRandomElementGen(public_key) for _ in pairs]
    a = context.IntMPBootAdd([[e, e] for e in elements])[0]
    h0, h1 = context.IntMPBootDecrypt(pairs[0].secretKey, c1, a)
    sizes = {name: len(ciphertext_to_bytes(ct)) for name, ct in
             (("request c1", c1), ("random element", elements[0]), ("h0", h0), ("h1", h1))}
    answers = PARTIES * (sizes["random element"] + sizes["h0"] + sizes["h1"])
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        for i in range(WRITES):
            atomic_write_bytes(Path(folder) / f"answer-{i}", bytes(answers))
        write_ms = (time.perf_counter() - start) / WRITES * 1000
    print(f"ring {context.GetRingDimension()}, depth {params.depth}, {PARTIES} parties")
    for name, size in sizes.items():
        print(f"  {name}: {size / 2**20:.2f} MiB")
    print(f"  journaled answers a refresh: {answers / 2**20:.1f} MiB, {write_ms:.0f} ms to "
          "write (fsync)")


if __name__ == "__main__":
    main()
