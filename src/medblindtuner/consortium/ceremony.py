"""The joint key rounds run in one process, with an in-memory relay in between.

Every value handed from one party to another below is the bytes of a `RoundMessage`: what a
service would store and relay. The relay's own work (`he.threshold.combine_*`) uses public
material only; its outcome is a public bundle in the one-key format (`he.keys`), so the cloud's
trainer loads it unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.he.keys import BundleError, write_automorphism_keys, write_public_bundle
from medblindtuner.he.params import CkksParams, setup_bootstrapping
from medblindtuner.he.threshold import (
    AUTOMORPHISM_CHUNK,
    ThresholdParty,
    bootstrap_automorphism_indices,
    chunks_of,
    combine_automorphism_shares,
    combine_relin_products,
    combine_relin_shares,
    install_joint_keys,
    joint_context,
    rotation_automorphism_indices,
)

JOINT_KEYS_DIR = "joint-keys"  # in a job's folder: the joint rotation key files of its cloud


@contextmanager
def key_files_in(folder: Path) -> Iterator[Path]:
    """`folder` for a cloud's joint key files while it trains, removed when it is done (they
    are made anew from the key rounds at every start; a killed process leaves them in its
    job's folder, not in /tmp)."""
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class JointKeys:
    """The public outcome of a key ceremony, installed in this process's context."""

    params: CkksParams
    context: ofhe.CryptoContext
    public_key: ofhe.PublicKey
    rotation_indices: tuple[int, ...]
    shard_rotation_indices: tuple[int, ...]
    shard_keys_file: Path
    seconds: dict[str, float] = field(default_factory=dict)
    message_bytes: int = 0  # everything the relay carried
    _shard_dir: tempfile.TemporaryDirectory | None = None

    def encrypt(self, values, level: int = 0) -> ofhe.Ciphertext:
        """Public-key encryption under the joint key (what each hospital does with its rows)."""
        plaintext = self.context.MakeCKKSPackedPlaintext(
            np.ascontiguousarray(values, dtype=np.float64), 1, level, None, self.params.slots)
        return self.context.Encrypt(self.public_key, plaintext)

    def save_public_bundle(self, directory: Path) -> dict:
        return write_public_bundle(directory, self.params, self.context, self.public_key,
                                   self.rotation_indices, self.shard_rotation_indices,
                                   self.shard_keys_file,
                                   self.shard_keys_file.with_name("rotation_keys.bin"))


def make_parties(job_id: str, params: CkksParams, n_parties: int):
    """The bootstrapping keys' automorphism indices (public; computed first, on a throwaway
    context), the coordinator's joint context (its bytes are public) and one party per
    hospital on it. Returns (context, parties, bootstrap indices)."""
    bootstrap_indices = bootstrap_automorphism_indices(params)
    context = joint_context(params)
    setup_bootstrapping(context, params)
    parties = [ThresholdParty(job_id, i, n_parties, context) for i in range(n_parties)]
    return context, parties, bootstrap_indices


def _joint_public_and_relinearisation_keys(
        context: ofhe.CryptoContext, parties: Sequence[ThresholdParty],
        relay: Callable[[list[bytes]], list[bytes]], seconds: dict[str, float]) -> str:
    """Rounds 1-3: the chained public key, then the joint relinearisation key installed in
    `context`. Returns the joint key's tag."""
    job_id, n = parties[0].job_id, len(parties)
    start = time.perf_counter()
    chain: list[bytes] = []
    for party in parties:
        chain.append(party.public_key_round(chain[-1] if chain else None))
    relay(chain)
    for party in parties:
        party.accept_joint_public_key(chain[-1])
    tag = parties[0].joint_tag
    seconds["public_key"] = time.perf_counter() - start

    start = time.perf_counter()
    lead = parties[0].relin_share()
    shares = relay([lead] + [p.relin_share(lead) for p in parties[1:]])
    summed = combine_relin_shares(context, shares, job_id, n, tag)
    products = relay([p.relin_product(summed) for p in parties])
    relin_key = combine_relin_products(context, products, job_id, n, tag)
    install_joint_keys(context, relin_key, [], tag)
    seconds["relinearisation"] = time.perf_counter() - start
    return tag


@dataclass(frozen=True)
class KeySchedule:
    """The automorphism rounds of a ceremony, in order, as (chunk number, indices): the
    kernel's rotations (the shard workers' file), the other rotations, then the bootstrapping
    keys not already made. Public: every party and the relay compute the same one."""

    kernel: tuple[tuple[int, tuple[int, ...]], ...]
    others: tuple[tuple[int, tuple[int, ...]], ...]
    bootstrap: tuple[tuple[int, tuple[int, ...]], ...]
    rotation_indices: tuple[int, ...]  # rotations (not automorphisms), 0 mod slots dropped
    shard_rotation_indices: tuple[int, ...]

    @property
    def rounds(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        return self.kernel + self.others + self.bootstrap


def key_schedule(context: ofhe.CryptoContext, params: CkksParams,
                 rotation_indices: Sequence[int], kernel_rotation_indices: Sequence[int] = (),
                 bootstrap_indices: Sequence[int] | None = None,
                 chunk_size: int = AUTOMORPHISM_CHUNK) -> KeySchedule:
    """The chunks of `run_key_ceremony`, numbered from 0 in the order they are joined."""
    kernel = rotation_automorphism_indices(context, params, kernel_rotation_indices)
    every = rotation_automorphism_indices(context, params, list(rotation_indices)
                                          + list(kernel_rotation_indices))
    rest = [i for i in (bootstrap_indices or ()) if i not in set(every)]
    parts, number = [], 0
    for indices in (kernel, sorted(set(every) - set(kernel)), rest):
        chunks = chunks_of(indices, chunk_size)
        parts.append(tuple((number + k, tuple(c)) for k, c in enumerate(chunks)))
        number += len(chunks)

    def nonzero(values: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted({int(i) for i in values if int(i) % params.slots}))

    return KeySchedule(*parts, nonzero(list(rotation_indices) + list(kernel_rotation_indices)),
                       nonzero(kernel_rotation_indices))


def install_schedule(context: ofhe.CryptoContext, schedule: KeySchedule, tag: str,
                     join: Callable[[int, tuple[int, ...]], bytes],
                     keys_dir: Path | None = None
                     ) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """Join every chunk (`join(number, indices)`: the joint key map's bytes) into `context`;
    the kernel's keys are written first (the shard workers' file), then the others (the
    driver's file: each shard key once in the bundle, as for one key holder), into `keys_dir`
    (the caller's job folder: a killed process leaves nothing elsewhere) or else a temporary
    folder removed with the returned object. Returns (shard file, the temporary folder)."""
    for number, indices in schedule.kernel:
        install_joint_keys(context, None, [join(number, indices)], tag)
    shard_dir = None
    if keys_dir is None:
        shard_dir = tempfile.TemporaryDirectory(prefix="medblindtuner-joint-shard-keys-")
        keys_dir = Path(shard_dir.name)
    Path(keys_dir).mkdir(parents=True, exist_ok=True)
    shard_file = Path(keys_dir) / "shard_keys.bin"
    write_automorphism_keys(context, shard_file, tag, bool(schedule.kernel),
                            "the shard workers' joint rotation keys")
    context.ClearEvalAutomorphismKeys()
    for number, indices in schedule.others + schedule.bootstrap:
        install_joint_keys(context, None, [join(number, indices)], tag)
    write_automorphism_keys(context, Path(keys_dir) / "rotation_keys.bin", tag,
                            bool(schedule.others or schedule.bootstrap),
                            "the driver's joint rotation keys")
    if schedule.kernel and not context.DeserializeEvalAutomorphismKey(str(shard_file),
                                                                      ofhe.BINARY):
        raise BundleError("OpenFHE failed to reload the shard workers' joint rotation keys")
    return shard_file, shard_dir


def run_key_ceremony(context: ofhe.CryptoContext, params: CkksParams,
                     parties: Sequence[ThresholdParty], rotation_indices: Sequence[int],
                     kernel_rotation_indices: Sequence[int] = (),
                     bootstrap_indices: Sequence[int] | None = None,
                     chunk_size: int = AUTOMORPHISM_CHUNK,
                     keys_dir: Path | None = None) -> JointKeys:
    """All rounds in order; the kernel's rotation keys are joined and written first (the
    shard workers' file), then the other rotations and the bootstrapping keys (files in
    `keys_dir`, else a temporary folder: `install_schedule`).

    `bootstrap_indices`: from `bootstrap_automorphism_indices(params)`, computed before any
    joint key exists in the process (it clears OpenFHE's key maps)."""
    job_id, n = parties[0].job_id, len(parties)
    seconds: dict[str, float] = {}
    carried = 0

    def relay(messages: list[bytes]) -> list[bytes]:
        nonlocal carried
        carried += sum(len(m) for m in messages)
        return messages

    tag = _joint_public_and_relinearisation_keys(context, parties, relay, seconds)

    def join(number: int, chunk: tuple[int, ...]) -> bytes:
        lead = parties[0].automorphism_share(number, chunk)
        shares = relay([lead] + [p.automorphism_share(number, chunk, lead)
                                 for p in parties[1:]])
        return combine_automorphism_shares(context, shares, job_id, n, number, tag)

    start = time.perf_counter()
    schedule = key_schedule(context, params, rotation_indices, kernel_rotation_indices,
                            bootstrap_indices, chunk_size)
    shard_file, shard_dir = install_schedule(context, schedule, tag, join, keys_dir)
    seconds["rotations"] = time.perf_counter() - start  # with the bootstrapping keys
    return JointKeys(params, context, parties[-1].joint_public_key, schedule.rotation_indices,
                     schedule.shard_rotation_indices, shard_file, seconds, carried, shard_dir)
