"""Key roles: the hospital makes keys; only a *public bundle* ever leaves it.

Hospital side (`HospitalKeys`): context + key pair; writes the public bundle (context, public
key, relinearisation key, rotation + bootstrapping keys for exactly the indices the training
plan needs, and the step kernel's rotation keys again in a file of their own) and, separately,
the secret key.

Cloud side (`CloudCrypto`): loads a public bundle. It holds no secret key and has no decrypt
method; it can only evaluate. OpenFHE writes each key file straight to disk (keys are GBs), and
checksums are computed by streaming, so no key is held twice in memory (except the step
kernel's rotation keys at the hospital, kept as bytes from key generation to the bundle).

Shard workers (`ShardKeys`, `cloud.cluster`): a node computing step kernels gets the context,
public key, relinearisation key and the kernel's rotation keys as bytes, never the bootstrapping
keys (OpenFHE keeps those in the same automorphism-key map as the rotations, which is why the
kernel's subset is serialised at key generation, before any bootstrapping key exists).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openfhe as ofhe

from medblindtuner.errors import MedBlindTunerError
from medblindtuner.formats import sha256_file
from medblindtuner.he.params import (
    CkksParams,
    ParameterError,
    build_context,
    require_secure,
    setup_bootstrapping,
)

BUNDLE_FORMAT = "medblindtuner-public-bundle/1"
SECRET_FORMAT = "medblindtuner-secret-key/1"
_PUBLIC_FILES = {
    "context": "context.bin",
    "public_key": "public_key.bin",
    "mult_key": "mult_key.bin",
    "rotation_keys": "rotation_keys.bin",
    "shard_keys": "shard_keys.bin",
}
# What a shard worker loads: no bootstrapping key, no secret key.
SHARD_KEY_ROLES = ("context", "public_key", "mult_key", "shard_keys")
_SECRET_FILE = "secret_key.bin"


class BundleError(MedBlindTunerError, ValueError):
    """A bundle or key file is missing, tampered with, or of the wrong kind."""


def _reset_openfhe_state() -> None:
    """Drop OpenFHE's process-wide key maps so a load never mixes in keys from elsewhere."""
    ofhe.ClearEvalMultKeys()
    ofhe.CryptoContext.ClearEvalAutomorphismKeys()
    ofhe.ReleaseAllContexts()


@dataclass
class HospitalKeys:
    """Key holder's material. Never serialise this object to the cloud."""

    params: CkksParams
    context: ofhe.CryptoContext
    public_key: ofhe.PublicKey
    secret_key: ofhe.PrivateKey
    rotation_indices: tuple[int, ...]
    keygen_seconds: float = 0.0
    # the step kernel's rotation keys, serialised before the bootstrapping keys joined them,
    # to a file of their own (a second copy in memory would cost ~100 MiB a key)
    shard_rotation_indices: tuple[int, ...] = ()
    shard_keys: tempfile.TemporaryDirectory | None = None

    @classmethod
    def generate(
        cls,
        params: CkksParams,
        rotation_indices: list[int] | tuple[int, ...],
        allow_insecure: bool = False,
        shard_rotation_indices: list[int] | tuple[int, ...] = (),
    ) -> HospitalKeys:
        """Make a context and keys: relinearisation, the plan's rotations, bootstrapping.

        `shard_rotation_indices` (the step kernel's, `TrainingPlan.kernel_rotation_indices`)
        are generated first and serialised on their own: OpenFHE adds bootstrapping keys to the
        same key map, so this is the one moment the map holds the shard workers' keys alone.
        """
        require_secure(params, allow_insecure)
        start = time.perf_counter()
        _reset_openfhe_state()
        context = build_context(params)
        setup_bootstrapping(context, params)
        pair = context.KeyGen()
        context.EvalMultKeyGen(pair.secretKey)

        def nonzero(values) -> tuple[int, ...]:
            return tuple(sorted({int(i) for i in values if int(i) % params.slots}))

        shard_indices = nonzero(shard_rotation_indices)
        if shard_indices:
            context.EvalRotateKeyGen(pair.secretKey, list(shard_indices))
        shard_keys = tempfile.TemporaryDirectory(prefix="medblindtuner-shard-keys-")
        shard_file = Path(shard_keys.name) / _PUBLIC_FILES["shard_keys"]
        write_automorphism_keys(context, shard_file, pair.secretKey.GetKeyTag(),
                                bool(shard_indices), "the shard workers' rotation keys")
        indices = nonzero(tuple(rotation_indices) + shard_indices)
        rest = sorted(set(indices) - set(shard_indices))
        # the bundle's rotation_keys.bin holds the driver's other keys only (the cloud loads
        # both files): each shard key once, not twice
        context.ClearEvalAutomorphismKeys()
        if rest:
            context.EvalRotateKeyGen(pair.secretKey, rest)
        for slots in params.bootstrap_slots:
            context.EvalBootstrapKeyGen(pair.secretKey, slots)
        driver_file = Path(shard_keys.name) / _PUBLIC_FILES["rotation_keys"]
        write_automorphism_keys(context, driver_file, pair.secretKey.GetKeyTag(),
                                bool(rest or params.bootstrap_slots),
                                "the driver's rotation keys")
        if shard_indices and not context.DeserializeEvalAutomorphismKey(str(shard_file),
                                                                        ofhe.BINARY):
            raise BundleError("OpenFHE failed to reload the shard workers' rotation keys")
        return cls(
            params=params,
            context=context,
            public_key=pair.publicKey,
            secret_key=pair.secretKey,
            rotation_indices=indices,
            keygen_seconds=time.perf_counter() - start,
            shard_rotation_indices=shard_indices,
            shard_keys=shard_keys,
        )

    # ---- hospital-only operations -------------------------------------------------------
    def encrypt(self, values: np.ndarray, level: int = 0) -> ofhe.Ciphertext:
        """Encrypt a full-slot vector at `level` (data is encrypted at the level it is used)."""
        plaintext = self.context.MakeCKKSPackedPlaintext(
            np.ascontiguousarray(values, dtype=np.float64), 1, level, None, self.params.slots
        )
        return self.context.Encrypt(self.public_key, plaintext)

    def decrypt(self, ciphertext: ofhe.Ciphertext, length: int | None = None) -> np.ndarray:
        plaintext = self.context.Decrypt(self.secret_key, ciphertext)
        plaintext.SetLength(length or ciphertext.GetSlots())
        return np.asarray(plaintext.GetRealPackedValue(), dtype=np.float64)

    # ---- files --------------------------------------------------------------------------
    def save_public_bundle(self, directory: Path) -> dict:
        """Write everything the cloud needs and nothing that can decrypt. Returns the manifest."""
        if self.shard_keys is None:
            raise BundleError("these keys were reloaded without the shard keys, which exist "
                              "only at key generation: generate the bundle anew")
        keys_dir = Path(self.shard_keys.name)
        return write_public_bundle(directory, self.params, self.context, self.public_key,
                                   self.rotation_indices, self.shard_rotation_indices,
                                   keys_dir / _PUBLIC_FILES["shard_keys"],
                                   keys_dir / _PUBLIC_FILES["rotation_keys"])

    def save_secret_key(self, path: Path) -> None:
        """Secret key in its own file (mode 0600), with a sidecar naming its parameters."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not ofhe.SerializeToFile(str(path), self.secret_key, ofhe.BINARY):
            raise BundleError(f"OpenFHE failed to write the secret key to {path}")
        path.chmod(0o600)
        meta = {"format": SECRET_FORMAT, "params_fingerprint": self.params.fingerprint()}
        path.with_suffix(".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, bundle_dir: Path, secret_key_path: Path, allow_insecure: bool = False,
             with_eval_keys: bool = True):
        """Hospital reload: its own public bundle plus the secret key kept at home.

        `with_eval_keys=False` skips the (GB-sized) relinearisation/rotation keys: enough to
        encrypt and decrypt, which is all the hospital does while the cloud trains.
        """
        cloud = CloudCrypto.load(bundle_dir, allow_insecure=allow_insecure, setup_bootstrap=False,
                                 with_eval_keys=with_eval_keys)
        meta_path = Path(secret_key_path).with_suffix(".json")
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("params_fingerprint") != cloud.params.fingerprint():
                raise ParameterError(
                    f"secret key {secret_key_path} belongs to another parameter set "
                    f"({meta.get('params_fingerprint')} vs {cloud.params.fingerprint()})"
                )
        secret_key, ok = ofhe.DeserializePrivateKey(str(secret_key_path), ofhe.BINARY)
        if not ok:
            raise BundleError(f"{secret_key_path} is not an OpenFHE secret key")
        return cls(
            params=cloud.params,
            context=cloud.context,
            public_key=cloud.public_key,
            secret_key=secret_key,
            rotation_indices=cloud.rotation_indices,
        )


def write_automorphism_keys(context: ofhe.CryptoContext, path: Path, tag: str, any_keys: bool,
                            what: str) -> None:
    """The context's automorphism keys of `tag` into `path`; an empty file when there are
    none (`any_keys` False: OpenFHE serialises no empty key map). BundleError on failure."""
    if not any_keys:
        Path(path).write_bytes(b"")
    elif not context.SerializeEvalAutomorphismKey(str(path), ofhe.BINARY, tag):
        raise BundleError(f"OpenFHE failed to serialise {what}")


def write_public_bundle(directory: Path, params: CkksParams, context: ofhe.CryptoContext,
                        public_key: ofhe.PublicKey, rotation_indices: tuple[int, ...],
                        shard_rotation_indices: tuple[int, ...], shard_keys_file: Path,
                        rotation_keys_file: Path | None = None) -> dict:
    """A public bundle from the context's current evaluation keys (one key holder's, or a
    consortium's joint keys): context, public key, relinearisation keys, the shard workers'
    rotation keys copied from `shard_keys_file`, and the driver's other automorphism keys
    copied from `rotation_keys_file` (None: all the context holds, shard keys again).
    The cloud loads both key files. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {key: directory / name for key, name in _PUBLIC_FILES.items()}
    shutil.copyfile(shard_keys_file, paths["shard_keys"])
    if rotation_keys_file is not None:
        shutil.copyfile(rotation_keys_file, paths["rotation_keys"])
    ok = [
        ofhe.SerializeToFile(str(paths["context"]), context, ofhe.BINARY),
        ofhe.SerializeToFile(str(paths["public_key"]), public_key, ofhe.BINARY),
        context.SerializeEvalMultKey(str(paths["mult_key"]), ofhe.BINARY),
        rotation_keys_file is not None
        or context.SerializeEvalAutomorphismKey(str(paths["rotation_keys"]), ofhe.BINARY),
    ]
    if not all(ok):
        raise BundleError(f"OpenFHE failed to serialise the public bundle into {directory}")
    manifest = {
        "format": BUNDLE_FORMAT,
        "params": params.to_dict(),
        "params_fingerprint": params.fingerprint(),
        "rotation_indices": list(rotation_indices),
        "shard_rotation_indices": list(shard_rotation_indices),
        "files": {
            name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for name, path in ((p.name, p) for p in paths.values())
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(bundle_dir: Path) -> dict:
    path = Path(bundle_dir) / "manifest.json"
    if not path.exists():
        raise BundleError(f"{bundle_dir} has no manifest.json: not a public bundle")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: unknown bundle format {manifest.get('format')!r}")
    return manifest


def verify_public_bundle(bundle_dir: Path, allow_insecure: bool = False) -> dict:
    """Check a public bundle before any use: format, parameters, file set and checksums.

    Refuses bundles with insecure parameters (unless allowed), extra or missing files, and any
    file that deserialises as a secret key. Returns the manifest.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    params = CkksParams.from_dict(manifest["params"])
    if params.fingerprint() != manifest.get("params_fingerprint"):
        raise BundleError("manifest parameters do not match their fingerprint (tampered?)")
    require_secure(params, allow_insecure)
    expected = set(_PUBLIC_FILES.values())
    present = {p.name for p in bundle_dir.iterdir() if p.name != "manifest.json"}
    if present != expected or set(manifest["files"]) != expected:
        raise BundleError(
            f"public bundle must hold exactly {sorted(expected)}; found {sorted(present)}"
        )
    for name, info in manifest["files"].items():
        path = bundle_dir / name
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise BundleError(f"{path} does not match its checksum in the manifest (tampered?)")
    for path in bundle_dir.iterdir():
        if path.name != "manifest.json" and looks_like_secret_key(path):
            raise BundleError(f"{path} is a secret key: refusing a bundle that can decrypt")
    return manifest


def looks_like_secret_key(path: Path) -> bool:
    """True if the file deserialises as an OpenFHE private key (a secret must never upload)."""
    try:
        _key, ok = ofhe.DeserializePrivateKey(str(path), ofhe.BINARY)
    except Exception:  # noqa: BLE001 - any parse failure means "not a secret key"
        return False
    return bool(ok)


@dataclass
class CloudCrypto:
    """The untrusted side's view: evaluation keys only. There is no way to decrypt here."""

    params: CkksParams
    context: ofhe.CryptoContext
    public_key: ofhe.PublicKey
    rotation_indices: tuple[int, ...]
    manifest: dict

    @classmethod
    def load(
        cls, bundle_dir: Path, allow_insecure: bool = False, setup_bootstrap: bool = True,
        with_eval_keys: bool = True,
    ) -> CloudCrypto:
        bundle_dir = Path(bundle_dir)
        manifest = verify_public_bundle(bundle_dir, allow_insecure=allow_insecure)
        params = CkksParams.from_dict(manifest["params"])
        _reset_openfhe_state()
        context, ok = ofhe.DeserializeCryptoContext(str(bundle_dir / "context.bin"), ofhe.BINARY)
        if not ok:
            raise BundleError(f"{bundle_dir / 'context.bin'} is not an OpenFHE crypto context")
        public_key, ok = ofhe.DeserializePublicKey(str(bundle_dir / "public_key.bin"), ofhe.BINARY)
        if not ok:
            raise BundleError(f"{bundle_dir / 'public_key.bin'} is not an OpenFHE public key")
        mult_file = str(bundle_dir / "mult_key.bin")
        if with_eval_keys and not context.DeserializeEvalMultKey(mult_file, ofhe.BINARY):
            raise BundleError(f"{mult_file} is not a relinearisation key")
        rotation_file = bundle_dir / _PUBLIC_FILES["rotation_keys"]
        if (with_eval_keys and rotation_file.stat().st_size
                and not context.DeserializeEvalAutomorphismKey(str(rotation_file),
                                                               ofhe.BINARY)):
            raise BundleError(f"{rotation_file} is not a rotation-key file")
        shard_file = bundle_dir / _PUBLIC_FILES["shard_keys"]
        if (with_eval_keys and shard_file.stat().st_size
                and not context.DeserializeEvalAutomorphismKey(str(shard_file), ofhe.BINARY)):
            raise BundleError(f"{shard_file} is not a rotation-key file")
        if context.GetRingDimension() != params.ring_dim:
            raise ParameterError("context ring dimension differs from the manifest's parameters")
        if setup_bootstrap and with_eval_keys:
            setup_bootstrapping(context, params)
        return cls(
            params=params,
            context=context,
            public_key=public_key,
            rotation_indices=tuple(manifest.get("rotation_indices", ())),
            manifest=manifest,
        )

    def encrypt(self, values: np.ndarray, level: int = 0) -> ofhe.Ciphertext:
        """Public-key encryption (the cloud may encrypt constants; it can never decrypt)."""
        plaintext = self.context.MakeCKKSPackedPlaintext(
            np.ascontiguousarray(values, dtype=np.float64), 1, level, None, self.params.slots
        )
        return self.context.Encrypt(self.public_key, plaintext)


@dataclass(frozen=True)
class ShardKeys:
    """What a step-kernel worker loads, as bytes: the context, public key, relinearisation key
    and the kernel's rotation keys (`SHARD_KEY_ROLES`). Bytes, because they travel to nodes
    that may share no disk with the bundle; never a bootstrapping or a secret key."""

    params: CkksParams
    rotation_indices: tuple[int, ...]
    blobs: dict[str, bytes]  # role -> the file's bytes
    checksums: dict[str, str]  # role -> SHA-256 listed in the bundle's manifest

    @classmethod
    def read(cls, bundle_dir: Path, allow_insecure: bool = False) -> ShardKeys:
        """The shard files of a verified public bundle (checksums kept for the worker)."""
        bundle_dir = Path(bundle_dir)
        manifest = verify_public_bundle(bundle_dir, allow_insecure=allow_insecure)
        if "shard_rotation_indices" not in manifest:
            raise BundleError(f"{bundle_dir}: this bundle predates shard keys; generate it anew")
        names = {role: _PUBLIC_FILES[role] for role in SHARD_KEY_ROLES}
        blobs = {role: (bundle_dir / name).read_bytes() for role, name in names.items()}
        shard = cls(CkksParams.from_dict(manifest["params"]),
                    tuple(manifest["shard_rotation_indices"]), blobs,
                    {role: manifest["files"][name]["sha256"] for role, name in names.items()})
        shard.check()
        return shard

    def check(self) -> None:
        """Every blob matches the manifest's checksum and none parses as a secret key."""
        for role, blob in self.blobs.items():
            if hashlib.sha256(blob).hexdigest() != self.checksums[role]:
                raise BundleError(f"shard key blob {role!r} does not match its checksum")
            # the rotation-key blob (GBs) passed the bundle's file check of the same bytes
            if role != "shard_keys" and _parses_as_secret_key(blob):
                raise BundleError(f"shard key blob {role!r} is a secret key: refused")

    def load(self) -> CloudCrypto:
        """This process's context with the kernel's keys only (a shard worker's start)."""
        self.check()
        _reset_openfhe_state()
        try:
            context = ofhe.DeserializeCryptoContextString(self.blobs["context"], ofhe.BINARY)
            public_key = ofhe.DeserializePublicKeyString(self.blobs["public_key"], ofhe.BINARY)
            ofhe.DeserializeEvalMultKeyString(self.blobs["mult_key"], ofhe.BINARY)
            if self.blobs["shard_keys"]:
                ofhe.DeserializeEvalAutomorphismKeyString(self.blobs["shard_keys"], ofhe.BINARY)
        except (RuntimeError, TypeError) as exc:
            raise BundleError(f"shard keys do not deserialise: {exc}") from exc
        if context.GetRingDimension() != self.params.ring_dim:
            raise ParameterError("context ring dimension differs from the shard keys' params")
        return CloudCrypto(params=self.params, context=context, public_key=public_key,
                           rotation_indices=self.rotation_indices,
                           manifest={"files": dict(self.checksums)})


def _parses_as_secret_key(blob: bytes) -> bool:
    try:
        ofhe.DeserializePrivateKeyString(blob, ofhe.BINARY)
    except Exception:  # noqa: BLE001 - any parse failure means "not a secret key"
        return False
    return True


def bundle_size_bytes(bundle_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(bundle_dir).iterdir() if p.is_file())
