"""Threshold CKKS (n-of-n): key rounds and decryption shares, each a function of public bytes
and one party's own secret share.

Roles. Every party (hospital) is a `ThresholdParty`: it holds one secret share, which never
leaves it, and answers rounds. The relay (the cloud, or a coordinator) runs the `combine_*`
functions, which take only public bytes. Every round's input and output is a `RoundMessage`
(bytes, tagged with the job, the round and the party), so a service can relay them as they are.

Rounds, in order (party 0 goes first where its output is the others' input):
  1. public key      party 0 `KeyGen`; party i `MultipartyKeyGen(pk of party i-1)` (a chain:
                     the last party's public key is the joint one; published by the relay)
  2. relin, part 1   party 0 `KeySwitchGen(s0, s0)`; party i `MultiKeySwitchGen(si, si, that)`;
                     relay `MultiAddEvalKeys` over all
  3. relin, part 2   every party `MultiMultEvalKey(si, sum)`; relay `MultiAddEvalMultKeys`
  4. automorphisms   per chunk of indices (rotations of the plan, then bootstrapping's): party 0
                     `EvalAutomorphismKeyGen(s0, chunk)`; party i `MultiEvalAutomorphismKeyGen(si,
                     that, chunk)`; relay `MultiAddEvalAutomorphismKeys`. A few indices a
                     chunk: all at once does not fit in memory at ring 2^16 (environment notes).
  5. decryption      party 0 `MultipartyDecryptLead`, party i `MultipartyDecryptMain`; whoever
                     holds all n shares runs `MultipartyDecryptFusion` (`fuse_decryption_shares`).
Secrets are `UNIFORM_TERNARY` (the sparse-encapsulated mode needs a key no multiparty call
makes). OpenFHE's CKKS threshold decryption adds its fixed 20-bit flooding noise only
(docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.he.params import (
    JOINT_REFRESH_EXTRA_LEVELS,
    CkksParams,
    ParameterError,
    build_context,
    data_level,
    level_budget_for,
)
from medblindtuner.protocol import ROUND_FORMAT

MESSAGE_FORMAT = ROUND_FORMAT  # the service reads this header (protocol)
JOINT_SECRET_DIST = "UNIFORM_TERNARY"
# Indices per automorphism round: ~90 MB a key at ring 2^16 (environment notes), so a round
# holds a few hundred MB per party instead of all keys (killed at 21 GB).
AUTOMORPHISM_CHUNK = 4


class RoundError(MedBlindTunerError, ValueError):
    """A round message is malformed, from another job or round, a replay, or out of order."""


def _bootstrap_depth(budget: Sequence[int], secret_key_dist: str) -> int:
    return int(ofhe.CryptoContext.GetBootstrapDepth(list(budget),
                                                   getattr(ofhe, secret_key_dist)))


def joint_params(params: CkksParams) -> CkksParams:
    """The same parameters with a uniform ternary secret (what a joint key needs) and the
    depth raised by the levels its bootstrap consumes beyond the given secret's (4 at level
    budgets (2, 2) and (3, 3)), so a refreshed ciphertext has as many levels left as the
    one-key plan counts on (`he.params.BOOTSTRAP_OUTPUT_LEVEL`). Refresh mode "hospital"
    (already uniform ternary, no bootstrap): the members refresh jointly (`he.joint_refresh`),
    which needs JOINT_REFRESH_EXTRA_LEVELS more headroom, so the depth grows by as much and a
    step keeps its levels (depth 13: still ring 2^15 at 128 bits)."""
    if params.refreshed_by_hospital:
        return replace(params, secret_key_dist=JOINT_SECRET_DIST, joint_key=True,
                       depth=params.depth + JOINT_REFRESH_EXTRA_LEVELS)
    extra = max(_bootstrap_depth(b, JOINT_SECRET_DIST) - _bootstrap_depth(b,
                                                                          params.secret_key_dist)
                for b in (params.level_budget, params.sparse_level_budget))
    return replace(params, secret_key_dist=JOINT_SECRET_DIST, joint_key=True,
                   depth=params.depth + extra)


def joint_data_level(params: CkksParams) -> int:
    """Level of a freshly bootstrapped ciphertext under a joint key (a sparse bootstrap's
    depth minus one: 13 for one key at (2, 2), 17 for a uniform ternary secret), where data
    is encrypted. Refresh mode "hospital": level 0, where a joint refresh leaves the model."""
    if params.refreshed_by_hospital:
        return data_level(params)
    return _bootstrap_depth(params.sparse_level_budget, params.secret_key_dist) - 1


def joint_context(params: CkksParams) -> ofhe.CryptoContext:
    """A context with the multiparty feature enabled (the coordinator publishes its bytes).

    At ring 2^16 and 128 bits, depth 24 is the most OpenFHE allows with these moduli, so the
    4 extra levels of `joint_params` do not fit (docs/security.md, "Limits")."""
    if params.secret_key_dist != JOINT_SECRET_DIST:
        raise RoundError(f"a joint key needs {JOINT_SECRET_DIST} secrets, not "
                         f"{params.secret_key_dist}: use joint_params()")
    try:
        context = build_context(params)
    except RuntimeError as exc:
        raise ParameterError(f"OpenFHE refuses a joint-key context of depth {params.depth} at "
                             f"ring {params.ring_dim} ({params.security}): {exc}") from exc
    context.Enable(ofhe.MULTIPARTY)
    return context


def bootstrap_automorphism_indices(params: CkksParams) -> list[int]:
    """Automorphism indices of the bootstrapping keys for `params.bootstrap_slots`.

    Read from a throwaway single-key context of the same ring, slots and level budget but
    only the bootstrap's depth (seconds, small keys). Public. Run it before any joint key is
    in this process: it clears OpenFHE's key maps afterwards.
    """
    indices: set[int] = set()
    for slots in params.bootstrap_slots:
        budget = list(level_budget_for(params, slots))
        depth = ofhe.CryptoContext.GetBootstrapDepth(budget, getattr(ofhe, JOINT_SECRET_DIST))
        context = build_context(replace(params, depth=depth + 1))
        context.EvalBootstrapSetup(budget, [0, 0], slots)
        pair = context.KeyGen()
        context.EvalBootstrapKeyGen(pair.secretKey, slots)
        indices.update(int(i) for i in
                       context.GetExistingEvalAutomorphismKeyIndices(pair.secretKey.GetKeyTag()))
        ofhe.ClearEvalMultKeys()
        ofhe.CryptoContext.ClearEvalAutomorphismKeys()
    return sorted(indices)


def rotation_automorphism_indices(context: ofhe.CryptoContext, params: CkksParams,
                                  rotations: Sequence[int]) -> list[int]:
    """Automorphism indices of the rotations a plan needs (rotations by 0 mod slots dropped)."""
    kept = sorted({int(r) for r in rotations if int(r) % params.slots})
    return sorted({int(i) for i in context.FindAutomorphismIndices(kept)}) if kept else []


def chunks_of(indices: Sequence[int], size: int = AUTOMORPHISM_CHUNK) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


# ---- messages --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundMessage:
    """One party's (or the relay's, party -1) public output of one round of one job."""

    job_id: str
    round: str
    party: int
    payload: bytes

    def to_bytes(self) -> bytes:
        header = json.dumps({"format": MESSAGE_FORMAT, "job_id": self.job_id,
                             "round": self.round, "party": self.party,
                             "sha256": hashlib.sha256(self.payload).hexdigest()}).encode()
        return len(header).to_bytes(4, "big") + header + self.payload

    @classmethod
    def from_bytes(cls, data: bytes, job_id: str, round_name: str,
                   party: int | None = None) -> RoundMessage:
        """Parse and check: refused unless it is of this job and round (and party, if given)."""
        try:
            size = int.from_bytes(data[:4], "big")
            header = json.loads(data[4 : 4 + size])
            payload = bytes(data[4 + size :])
        except (ValueError, TypeError) as exc:
            raise RoundError(f"not a round message: {exc}") from exc
        if not isinstance(header, dict) or header.get("format") != MESSAGE_FORMAT:
            raise RoundError("not a threshold round message")
        if header.get("job_id") != job_id:
            raise RoundError(f"a message of job {header.get('job_id')!r} was sent to job "
                             f"{job_id!r}: refused")
        if header.get("round") != round_name:
            raise RoundError(f"a message of round {header.get('round')!r} was sent to round "
                             f"{round_name!r} (a replay?): refused")
        if party is not None and header.get("party") != party:
            raise RoundError(f"round {round_name!r} expected party {party}, got "
                             f"{header.get('party')}: refused")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise RoundError(f"round {round_name!r}: payload does not match its checksum")
        return cls(job_id, round_name, int(header["party"]), payload)


def collect(messages: Sequence[bytes], job_id: str, round_name: str,
            n_parties: int) -> list[bytes]:
    """Payloads of one round by party, refused unless each party 0..n-1 sent exactly one."""
    parsed = [RoundMessage.from_bytes(m, job_id, round_name) for m in messages]
    parties = sorted(m.party for m in parsed)
    if parties != list(range(n_parties)):
        raise RoundError(f"round {round_name!r} needs one message from each of {n_parties} "
                         f"parties; got parties {parties}")
    return [m.payload for m in sorted(parsed, key=lambda m: m.party)]


def _load(kind: str, data: bytes):
    loaders = {"public_key": ofhe.DeserializePublicKeyString,
               "eval_key": ofhe.DeserializeEvalKeyString,
               "key_map": ofhe.DeserializeEvalKeyMapString,
               "ciphertext": ofhe.DeserializeCiphertextString}
    try:
        return loaders[kind](data, ofhe.BINARY)
    except Exception as exc:  # noqa: BLE001 - OpenFHE raises RuntimeError with C++ text
        raise RoundError(f"{len(data)} bytes are not a {kind.replace('_', ' ')}: {exc}") from exc


def _dump(obj) -> bytes:
    return ofhe.Serialize(obj, ofhe.BINARY)


PARTY_FORMAT = "medblindtuner-threshold-party/1"
PARTY_STATE, PARTY_SHARE, PARTY_PUBLIC_KEY = ("party.json", "secret_share.bin",
                                              "joint_public_key.bin")
RELAY = -1  # the party number of messages the relay makes (sums of shares)


def round_of_automorphisms(chunk: int) -> str:
    return f"automorphisms-{chunk}"


def round_of_decryption(request_id: str) -> str:
    return f"decrypt-{request_id}"


# ---- one party -------------------------------------------------------------------------------
class ThresholdParty:
    """One hospital's secret share and the rounds it answers.

    Each round is answered once: asked again with the same input it returns the same bytes (a
    relay that lost a message), with another input it is refused (a replay or a confused
    relay must not get a second share under the same round name).
    """

    def __init__(self, job_id: str, index: int, n_parties: int, context: ofhe.CryptoContext):
        if n_parties < 2 or not 0 <= index < n_parties:
            raise RoundError(f"party {index} of {n_parties}: need n >= 2 and 0 <= index < n")
        self.job_id = job_id
        self.index = index
        self.n_parties = n_parties
        self.context = context
        self._secret: ofhe.PrivateKey | None = None
        self.joint_public_key: ofhe.PublicKey | None = None
        self._answered: dict[str, tuple[str, bytes]] = {}
        self._restored = False  # from `save`: answers no key round again
        self._progress: Path | None = None  # `keep_progress`: key rounds kept mid-ceremony

    @property
    def is_lead(self) -> bool:
        return self.index == 0

    @property
    def joint_tag(self) -> str:
        if self.joint_public_key is None:
            raise RoundError("the joint public key is not known yet: finish the key chain first")
        return self.joint_public_key.GetKeyTag()

    def _secret_key(self) -> ofhe.PrivateKey:
        if self._secret is None:
            raise RoundError(f"party {self.index} has no secret share yet: run the key chain")
        return self._secret

    def _answer(self, round_name: str, inputs: Sequence[bytes], make) -> bytes:
        if self._restored and not round_name.startswith(round_of_decryption("")):
            raise RoundError(f"party {self.index} was restored from its saved share: it "
                             f"answers no key round ({round_name!r}) again: refused")
        digest = hashlib.sha256(b"".join(hashlib.sha256(i).digest() for i in inputs)).hexdigest()
        if round_name in self._answered:
            seen, output = self._answered[round_name]
            if seen != digest:
                raise RoundError(f"party {self.index} already answered round {round_name!r} of "
                                 f"job {self.job_id!r} for other input: refused")
            return output
        output = RoundMessage(self.job_id, round_name, self.index, make()).to_bytes()
        self._answered[round_name] = (digest, output)
        if self._progress is not None and not round_name.startswith(round_of_decryption("")):
            from .threshold_progress import keep_answer
            keep_answer(self, self._progress, round_name)
        return output

    def _input(self, message: bytes | None, round_name: str, party: int) -> bytes:
        if message is None:
            raise RoundError(f"party {self.index} needs party {party}'s {round_name!r} message")
        return RoundMessage.from_bytes(message, self.job_id, round_name, party).payload

    # saved between processes: the share and the joint public key, once the key rounds ended
    def save(self, directory: Path) -> None:
        """Write the secret share (mode 0600) and the joint public key into `directory`
        (this hospital's own folder, 0700): what a restarted hospital needs (`restore`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        share = directory / PARTY_SHARE
        share.touch(mode=0o600)
        if not (ofhe.SerializeToFile(str(share), self._secret_key(), ofhe.BINARY)
                and ofhe.SerializeToFile(str(directory / PARTY_PUBLIC_KEY),
                                         self.joint_public_key, ofhe.BINARY)):
            raise RoundError(f"OpenFHE could not write party {self.index}'s state")
        (directory / PARTY_STATE).write_text(json.dumps({
            "format": PARTY_FORMAT, "job_id": self.job_id, "index": self.index,
            "n_parties": self.n_parties, "joint_tag": self.joint_tag}))

    @classmethod
    def restore(cls, directory: Path, context: ofhe.CryptoContext) -> ThresholdParty:
        """The party `save` wrote. It answers decryptions and refreshes, never a key round
        again (a second key share under the same round would be another key)."""
        directory = Path(directory)
        try:
            state = json.loads((directory / PARTY_STATE).read_text())
            party = cls(state["job_id"], int(state["index"]), int(state["n_parties"]), context)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RoundError(f"{directory}: no saved threshold party ({exc})") from exc
        secret, ok = ofhe.DeserializePrivateKey(str(directory / PARTY_SHARE), ofhe.BINARY)
        public, ok_public = ofhe.DeserializePublicKey(str(directory / PARTY_PUBLIC_KEY),
                                                      ofhe.BINARY)
        if not (ok and ok_public) or public.GetKeyTag() != state.get("joint_tag"):
            raise RoundError(f"{directory}: the saved share or joint public key is unreadable "
                             "or of another key")
        party._secret, party.joint_public_key, party._restored = secret, public, True
        return party

    def keep_progress(self, directory: Path) -> None:
        """From now on keep the secret share (0600) and each key round's answer in `directory`
        before `_answer` returns it to be posted (`he.threshold_progress`): a party killed
        mid-ceremony resumes from there with the same share and bytes."""
        self._progress = Path(directory)
        self._progress.mkdir(parents=True, exist_ok=True, mode=0o700)

    # 1. the public-key chain
    def public_key_round(self, previous: bytes | None = None) -> bytes:
        """Party 0: a fresh key pair; party i: a share chained on party i-1's public key."""
        def make() -> bytes:
            if self.is_lead:
                pair = self.context.KeyGen()
            else:
                pk = _load("public_key", self._input(previous, "public-key", self.index - 1))
                pair = self.context.MultipartyKeyGen(pk)
            self._secret = pair.secretKey
            return _dump(pair.publicKey)
        return self._answer("public-key", [previous or b""], make)

    def accept_joint_public_key(self, last: bytes) -> ofhe.PublicKey:
        """The last party's public-key message: the joint public key everyone encrypts under."""
        payload = RoundMessage.from_bytes(last, self.job_id, "public-key",
                                          self.n_parties - 1).payload
        self.joint_public_key = _load("public_key", payload)
        return self.joint_public_key

    # 2-3. the relinearisation key
    def relin_share(self, lead_share: bytes | None = None) -> bytes:
        """Party 0: `KeySwitchGen(s0, s0)`; party i: `MultiKeySwitchGen(si, si, party 0's)`."""
        def make() -> bytes:
            secret = self._secret_key()
            if self.is_lead:
                return _dump(self.context.KeySwitchGen(secret, secret))
            first = _load("eval_key", self._input(lead_share, "relin-1", 0))
            return _dump(self.context.MultiKeySwitchGen(secret, secret, first))
        return self._answer("relin-1", [lead_share or b""], make)

    def relin_product(self, summed: bytes) -> bytes:
        """`MultiMultEvalKey(si, sum of the relin shares)` under the joint key's tag."""
        def make() -> bytes:
            total = _load("eval_key", self._input(summed, "relin-1-sum", RELAY))
            return _dump(self.context.MultiMultEvalKey(self._secret_key(), total,
                                                       self.joint_tag))
        return self._answer("relin-2", [summed], make)

    # 4. rotation and bootstrapping keys, a chunk of automorphism indices at a time
    def automorphism_share(self, chunk: int, indices: Sequence[int],
                           lead_share: bytes | None = None) -> bytes:
        """Party 0: `EvalAutomorphismKeyGen(s0, indices)`; party i: `MultiEvalAutomorphism
        KeyGen(si, party 0's map, indices)`."""
        name = round_of_automorphisms(chunk)
        listed = json.dumps(sorted(int(i) for i in indices)).encode()

        def make() -> bytes:
            secret = self._secret_key()
            wanted = [int(i) for i in indices]
            if self.is_lead:
                return _dump(self.context.EvalAutomorphismKeyGen(secret, wanted))
            first = _load("key_map", self._input(lead_share, name, 0))
            return _dump(self.context.MultiEvalAutomorphismKeyGen(secret, first, wanted,
                                                                  self.joint_tag))
        return self._answer(name, [listed, lead_share or b""], make)

    # 5. decryption shares
    def decryption_share(self, request_id: str, ciphertext: bytes) -> bytes:
        """This party's partial decryption of one ciphertext (Lead for party 0, else Main).
        Alone it reveals nothing useful; with all n it reveals the value to whoever fuses."""
        def make() -> bytes:
            ct = _load("ciphertext", ciphertext)
            if self.is_lead:
                share = self.context.MultipartyDecryptLead([ct], self._secret_key())[0]
            else:
                share = self.context.MultipartyDecryptMain([ct], self._secret_key())[0]
            return _dump(share)
        return self._answer(round_of_decryption(request_id), [ciphertext], make)

    # 6. interactive refresh (he.joint_refresh), rules above this layer (consortium.refresher)
    def random_element(self) -> ofhe.Ciphertext:
        """A fresh uniform ring element (this party's a_i of a refresh's commit-reveal)."""
        if self.joint_public_key is None:
            raise RoundError("the joint public key is not known yet: finish the key chain first")
        return self.context.IntMPBootRandomElementGen(self.joint_public_key)

    def refresh_share(self, c1: ofhe.Ciphertext, a: ofhe.Ciphertext
                      ) -> tuple[ofhe.Ciphertext, ofhe.Ciphertext]:
        """`IntMPBootDecrypt(s_i, c1, a)`: this party's masked share (h0_i, h1_i) of one
        refresh; useless without all n parties' shares."""
        h0, h1 = self.context.IntMPBootDecrypt(self._secret_key(), c1, a)
        return h0, h1


# ---- the relay: public material only ---------------------------------------------------------
def combine_relin_shares(context: ofhe.CryptoContext, messages: Sequence[bytes], job_id: str,
                         n_parties: int, joint_tag: str) -> bytes:
    """Sum of the relin-1 shares (`MultiAddEvalKeys`): the input of every party's relin-2."""
    shares = [_load("eval_key", p) for p in collect(messages, job_id, "relin-1", n_parties)]
    total = shares[0]
    for share in shares[1:]:
        total = context.MultiAddEvalKeys(total, share, joint_tag)
    return RoundMessage(job_id, "relin-1-sum", RELAY, _dump(total)).to_bytes()


def combine_relin_products(context: ofhe.CryptoContext, messages: Sequence[bytes], job_id: str,
                           n_parties: int, joint_tag: str) -> bytes:
    """The joint relinearisation key (`MultiAddEvalMultKeys` over the relin-2 products)."""
    parts = [_load("eval_key", p) for p in collect(messages, job_id, "relin-2", n_parties)]
    total = parts[0]
    for part in parts[1:]:
        total = context.MultiAddEvalMultKeys(total, part, joint_tag)
    return _dump(total)


def combine_automorphism_shares(context: ofhe.CryptoContext, messages: Sequence[bytes],
                                job_id: str, n_parties: int, chunk: int,
                                joint_tag: str) -> bytes:
    """One chunk of joint automorphism keys (`MultiAddEvalAutomorphismKeys`)."""
    maps = [_load("key_map", p)
            for p in collect(messages, job_id, round_of_automorphisms(chunk), n_parties)]
    total = maps[0]
    for part in maps[1:]:
        total = context.MultiAddEvalAutomorphismKeys(total, part, joint_tag)
    return _dump(total)


def install_joint_keys(context: ofhe.CryptoContext, relin_key: bytes | None,
                       automorphism_chunks: Sequence[bytes], joint_tag: str) -> None:
    """Insert the joint relinearisation key and automorphism chunks into this process's
    OpenFHE key maps (where the evaluator looks them up by the joint key's tag)."""
    if relin_key is not None:
        key = _load("eval_key", relin_key)
        if key.GetKeyTag() != joint_tag:
            raise RoundError("the relinearisation key belongs to another joint key")
        context.InsertEvalMultKey([key])
    for chunk in automorphism_chunks:
        context.InsertEvalAutomorphismKey(_load("key_map", chunk), joint_tag)


def fuse_decryption_shares(context: ofhe.CryptoContext, messages: Sequence[bytes], job_id: str,
                           request_id: str, n_parties: int, length: int) -> np.ndarray:
    """`MultipartyDecryptFusion` of all n shares of one request: the plaintext values."""
    shares = [_load("ciphertext", p)
              for p in collect(messages, job_id, round_of_decryption(request_id), n_parties)]
    plaintext = context.MultipartyDecryptFusion(shares)
    plaintext.SetLength(length)
    return np.asarray(plaintext.GetRealPackedValue(), dtype=np.float64)


# Towers a ciphertext keeps when n parties decrypt it (`for_decryption`): the first modulus
# and one scaling modulus (98 bits or more) hold every loss the hospitals decrypt: a sum of
# squares over the validation rows, far below 2^40, at a scale of 2^45 or 2^50.
DECRYPTION_TOWERS = 2


def for_decryption(ciphertext: ofhe.Ciphertext) -> ofhe.Ciphertext:
    """`ciphertext` reduced to DECRYPTION_TOWERS towers (OpenFHE `Compress`: the same value)
    before the cloud asks n parties to decrypt it: every share is a few times smaller to
    compute, seal, relay and fuse (BreastMNIST at 128 bits: docs/results.md)."""
    return ciphertext.GetCryptoContext().Compress(ciphertext, DECRYPTION_TOWERS)


def request_id_of(ciphertext: bytes) -> str:
    """A decryption request's name: the ciphertext's hash (each party checks it itself)."""
    return hashlib.sha256(ciphertext).hexdigest()[:32]
