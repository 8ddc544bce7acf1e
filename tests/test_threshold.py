"""Threshold CKKS key rounds (insecure test ring, 3 parties): the joint keys evaluate, only all
n shares decrypt, rounds are refused when replayed or from another job.

Tolerances: threshold decryption adds OpenFHE's 20-bit flooding noise (measured ~2e-7 here);
a sparse bootstrap under a uniform-ternary joint key ~2e-4 at this ring (measured).
"""

from __future__ import annotations

import numpy as np
import openfhe as ofhe
import pytest

from medblindtuner.consortium.ceremony import make_parties, run_key_ceremony
from medblindtuner.he.keys import verify_public_bundle
from medblindtuner.he.params import INSECURE_TEST
from medblindtuner.he.threshold import (
    RoundError,
    RoundMessage,
    collect,
    fuse_decryption_shares,
    joint_data_level,
    joint_params,
    request_id_of,
)

PARAMS = joint_params(INSECURE_TEST.with_bootstrap_slots((8,)))
ROTATIONS = [1, 2, -4, 16]
KERNEL_ROTATIONS = [1, 2]


@pytest.fixture(scope="module")
def ceremony():
    context, parties, bootstrap = make_parties("job-a", PARAMS, 3)
    keys = run_key_ceremony(context, PARAMS, parties, ROTATIONS, KERNEL_ROTATIONS, bootstrap,
                            chunk_size=4)
    return context, parties, keys, bootstrap


def threshold_decrypt(context, parties, ct, length):
    data = ofhe.Serialize(ct, ofhe.BINARY)
    request = request_id_of(data)
    shares = [p.decryption_share(request, data) for p in parties]
    return fuse_decryption_shares(context, shares, "job-a", request, len(parties), length)


def test_joint_keys_relinearise_rotate_and_bootstrap(ceremony):
    context, parties, keys, bootstrap = ceremony
    assert len(bootstrap) > 0 and keys.message_bytes > 0
    x = np.linspace(-0.5, 0.5, 8)
    ct = keys.encrypt(np.tile(x, PARAMS.slots // 8))
    assert np.max(np.abs(threshold_decrypt(context, parties, ct, 8) - x)) < 1e-5
    squared = context.EvalMult(ct, ct)
    assert np.max(np.abs(threshold_decrypt(context, parties, squared, 8) - x * x)) < 1e-5
    for r in ROTATIONS:
        rotated = context.EvalRotate(ct, r)
        expected = np.roll(np.tile(x, PARAMS.slots // 8), -r)[:8]
        assert np.max(np.abs(threshold_decrypt(context, parties, rotated, 8) - expected)) < 1e-5
    sparse = context.MakeCKKSPackedPlaintext(x, 1, joint_data_level(PARAMS) + 6, None, 8)
    refreshed = context.EvalBootstrap(context.Encrypt(keys.public_key, sparse))
    assert np.max(np.abs(threshold_decrypt(context, parties, refreshed, 8) - x)) < 1e-3


def test_public_bundle_has_the_joint_keys_and_no_secret(ceremony, tmp_path):
    _context, _parties, keys, bootstrap = ceremony
    manifest = keys.save_public_bundle(tmp_path / "bundle")
    assert verify_public_bundle(tmp_path / "bundle", allow_insecure=True) == manifest
    assert manifest["shard_rotation_indices"] == KERNEL_ROTATIONS
    assert manifest["files"]["shard_keys.bin"]["bytes"] > 0
    # the driver's file holds the joint keys of the other rotations and of bootstrapping
    # only: not the shard keys again, nor keys of other tags (it held 40 keys' worth, now 18)
    per_key = manifest["files"]["shard_keys.bin"]["bytes"] / len(KERNEL_ROTATIONS)
    others = len(set(keys.rotation_indices) - set(KERNEL_ROTATIONS)) + len(bootstrap)
    assert manifest["files"]["rotation_keys.bin"]["bytes"] < (others + 0.5) * per_key


def test_fewer_than_all_shares_do_not_decrypt(ceremony):
    context, parties, keys, _ = ceremony
    x = np.linspace(-0.5, 0.5, 8)
    ct = keys.encrypt(np.tile(x, PARAMS.slots // 8))
    data = ofhe.Serialize(ct, ofhe.BINARY)
    shares = [p.decryption_share("q", data) for p in parties]
    with pytest.raises(RoundError, match="one message from each of 3"):
        fuse_decryption_shares(context, shares[:2], "job-a", "q", 3, 8)

    def far_from_x(values) -> bool:
        values = np.asarray(values)
        return not np.all(np.isfinite(values)) or np.max(np.abs(values - x)) > 1.0

    two = [ofhe.DeserializeCiphertextString(RoundMessage.from_bytes(
        s, "job-a", "decrypt-q").payload, ofhe.BINARY) for s in shares[:2]]
    fused = context.MultipartyDecryptFusion(two)
    fused.SetLength(8)
    assert far_from_x(fused.GetRealPackedValue())
    for party in parties:  # one share's secret alone, as an ordinary decryption
        try:
            plain = context.Decrypt(party._secret_key(), ct)
            plain.SetLength(8)
            assert far_from_x(plain.GetRealPackedValue())
        except RuntimeError:
            pass  # OpenFHE refusing to decode is also "cannot decrypt"


def test_rounds_refuse_replays_other_jobs_and_other_rounds(ceremony):
    context, parties, keys, _ = ceremony
    lead = parties[0].relin_share()
    assert parties[0].relin_share() == lead  # asked again: the same answer, no new share
    assert parties[1].relin_share(lead) == parties[1].relin_share(lead)
    foreign = RoundMessage("job-b", "relin-1", 0,
                           RoundMessage.from_bytes(lead, "job-a", "relin-1").payload).to_bytes()
    with pytest.raises(RoundError, match="job 'job-b' was sent to job 'job-a'"):
        parties[2].automorphism_share(99, [5], foreign)
    with pytest.raises(RoundError, match="round 'relin-1' was sent to round .automorphisms-99."):
        parties[2].automorphism_share(99, [5], lead)
    with pytest.raises(RoundError, match="already answered round 'relin-1'"):
        parties[1].relin_share(foreign)
    one, another = (ofhe.Serialize(keys.encrypt(np.full(PARAMS.slots, v)), ofhe.BINARY)
                    for v in (0.1, 0.2))
    parties[1].decryption_share("z", one)
    with pytest.raises(RoundError, match="already answered round 'decrypt-z'"):
        parties[1].decryption_share("z", another)
    with pytest.raises(RoundError, match="one message from each"):
        collect([lead, lead], "job-a", "relin-1", 2)
    tampered = bytearray(lead)
    tampered[-1] ^= 1
    with pytest.raises(RoundError, match="checksum"):
        RoundMessage.from_bytes(bytes(tampered), "job-a", "relin-1")


def test_joint_bundle_evaluates_in_a_separate_cloud_process(ceremony, tmp_path):
    """The cloud opens the joint public bundle like a one-key one (`Cloud`) and relinearises,
    rotates and bootstraps in its own process; all shares decrypt its output."""
    import json
    import subprocess
    import sys
    import textwrap

    from medblindtuner.he.ciphertexts import load_ciphertext, save_ciphertext

    context, parties, keys, _ = ceremony
    keys.save_public_bundle(tmp_path / "bundle")
    x = np.linspace(-0.5, 0.5, 8)
    save_ciphertext(tmp_path / "full.ct", keys.encrypt(np.tile(x, PARAMS.slots // 8)))
    sparse = context.MakeCKKSPackedPlaintext(x, 1, joint_data_level(PARAMS) + 6, None, 8)
    save_ciphertext(tmp_path / "sparse.ct", context.Encrypt(keys.public_key, sparse))
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from medblindtuner.he.ciphertexts import load_ciphertext, save_ciphertext
        from medblindtuner.cloud.cloud import Cloud
        root = Path({str(tmp_path)!r})
        cloud = Cloud(root / "bundle", allow_insecure=True)
        cc = cloud.crypto.context
        full = load_ciphertext(root / "full.ct")
        save_ciphertext(root / "square.ct", cc.EvalMult(full, full))
        save_ciphertext(root / "rotated.ct", cc.EvalRotate(full, 2))
        sparse = load_ciphertext(root / "sparse.ct")
        save_ciphertext(root / "refreshed.ct", cc.EvalBootstrap(sparse))
        print(json.dumps(sorted(cloud.crypto.manifest["files"])))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "secret_key.bin" not in json.loads(done.stdout.strip().splitlines()[-1])
    tiled = np.tile(x, PARAMS.slots // 8)
    for name, expected, tolerance in (("square", x * x, 1e-5),
                                      ("rotated", np.roll(tiled, -2)[:8], 1e-5),
                                      ("refreshed", x, 1e-3)):
        got = threshold_decrypt(context, parties, load_ciphertext(tmp_path / f"{name}.ct"), 8)
        assert np.max(np.abs(got - expected)) < tolerance, name
