"""Parse attacker-supplied artifacts in a short-lived, resource-limited subprocess.

OpenFHE's deserialisers are C++ code fed with bytes chosen by a client the service does not
trust: one flipped bit in a key file with a matching checksum can make them abort, segfault or
allocate without bound, and that would take the web process (every job) down with it. So the
web process never calls an OpenFHE `Deserialize*` on uploaded bytes: it runs

    python -m medblindtuner.service.validate [--memory-bytes N --cpu-s S] file PATH --role R
    python -m medblindtuner.service.validate [...] job JOB_DIR [--allow-insecure] [--query Q]

under `setrlimit` limits on address space and CPU time (which the child sets before it reads
anything) and a wall-clock timeout. The child
prints one JSON line (`{"ok": true}` or `{"ok": false, "error": ...}`); a crash, a timeout or
no answer is a refusal of the artifact, never of the service.

`file` runs at finalize: the secret-key check (a file that parses as an OpenFHE private key is
refused) and, for the small roles (context, public key, ciphertexts), a parse as that role.
`job` runs at start: the whole public bundle (checksums, exactly the public files, each parsed
as its role, the context's ring dimension against the parameters the manifest declares) and
every dataset (or query) ciphertext, whose ring dimension must be the bundle's too. The checks
run again in the worker, which is a separate process anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medblindtuner.service.errors import BadRequest
from medblindtuner.service.limits import ServiceLimits

MODULE = "medblindtuner.service.validate"
ROLES = ("context", "public_key", "mult_key", "rotation_keys", "ciphertext", "unknown")
# Roles cheap enough to parse at finalize; the evaluation keys (GBs) are parsed at start.
FINALIZE_PARSED = ("context", "public_key", "ciphertext")
BUNDLE_ROLES = {"context.bin": "context", "public_key.bin": "public_key",
                "mult_key.bin": "mult_key", "rotation_keys.bin": "rotation_keys",
                "shard_keys.bin": "rotation_keys"}  # the Ray shard actors' subset


@dataclass(frozen=True)
class Verdict:
    ok: bool
    error: str | None = None


# ---- web-process side: run the child and read its verdict ------------------------------------
def limit_resources(memory_bytes: int, cpu_s: int) -> None:
    """The child's first act, before it reads a byte: cap its address space and CPU time and
    forbid core dumps. (Set by the child itself rather than in a `preexec_fn`, which is not
    safe in the web process's threads.)"""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_validator(args: list[str], timeout_s: float, memory_bytes: int, what: str,
                  python: str = sys.executable) -> Verdict:
    """Run the validator child; any crash, timeout or garbled answer is a refusal verdict."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [python, "-m", MODULE, "--memory-bytes", str(memory_bytes), "--cpu-s",
             str(int(timeout_s) + 1), *args], capture_output=True, text=True, env=env,
            timeout=timeout_s, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return Verdict(False, f"validating {what} took longer than {timeout_s:g} s: refused")
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return Verdict(False, f"{what} crashed the OpenFHE parser ({name}): malformed, refused")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        answer = json.loads(lines[-1])
        verdict = Verdict(bool(answer["ok"]), answer.get("error"))
    except (IndexError, KeyError, TypeError, ValueError):
        return Verdict(False, f"{what} could not be parsed (validator exit code "
                              f"{done.returncode}, e.g. out of memory): refused")
    if not verdict.ok and not verdict.error:
        return Verdict(False, f"{what} refused by the validator")
    return verdict


def file_role(kind: str, name: str) -> str:
    """What an uploaded file must parse as: its bundle role, else a ciphertext."""
    if kind == "bundle":
        return BUNDLE_ROLES.get(name, "unknown")
    return "ciphertext"


class Validator:
    """The service's checks of uploaded OpenFHE files, each in its own limited subprocess.

    Replaceable (like the supervisor's spawner): in-process tests on random bytes use a
    stand-in, the real subprocess is exercised by the tests that upload real keys."""

    def __init__(self, limits: ServiceLimits, allow_insecure: bool,
                 python: str = sys.executable) -> None:
        self.limits = limits
        self.allow_insecure = allow_insecure
        self.python = python

    def check_file(self, path: Path, kind: str, name: str, ring_dim: int | None = None) -> None:
        """Finalize: not a secret key, parses as its role (small roles), of the declared ring
        dimension (if given). 400 otherwise."""
        extra = ["--ring-dim", str(ring_dim)] if ring_dim else []
        verdict = run_validator(["file", str(path), "--role", file_role(kind, name), *extra],
                                self.limits.validate_timeout_s,
                                self.limits.validate_memory_bytes, name, self.python)
        if not verdict.ok:
            raise BadRequest(verdict.error or f"{name} refused")

    def check_job(self, job_dir: Path, query_id: str | None = None) -> None:
        """Start (or scoring): the bundle and the ciphertexts, parsed and matched. 400."""
        args = ["job", str(job_dir)] + (["--allow-insecure"] if self.allow_insecure else [])
        if query_id is not None:
            args += ["--query", query_id]
        what = "the query set" if query_id else "the job's artifacts"
        verdict = run_validator(args, self.limits.validate_job_timeout_s,
                                self.limits.validate_job_memory_bytes, what, self.python)
        if not verdict.ok:
            prefix = "refusing to score: " if query_id else "refusing to train: "
            raise BadRequest(prefix + (verdict.error or "refused"))


# ---- child side: the actual parsing (OpenFHE imported only here) ----------------------------
def _parse(path: Path, role: str, context=None):  # noqa: ANN001, ANN202 - OpenFHE objects
    """Deserialise `path` as `role` (evaluation keys into `context`); ValueError if it is not
    one."""
    import openfhe as ofhe

    if role == "context":
        obj, ok = ofhe.DeserializeCryptoContext(str(path), ofhe.BINARY)
    elif role == "public_key":
        obj, ok = ofhe.DeserializePublicKey(str(path), ofhe.BINARY)
    elif role == "ciphertext":
        obj, ok = ofhe.DeserializeCiphertext(str(path), ofhe.BINARY)
    elif role == "mult_key":
        obj, ok = None, context.DeserializeEvalMultKey(str(path), ofhe.BINARY)
    elif role == "rotation_keys":
        obj, ok = None, context.DeserializeEvalAutomorphismKey(str(path), ofhe.BINARY)
    else:
        return None
    if not ok:
        raise ValueError(f"{path.name} is not an OpenFHE {role.replace('_', ' ')}")
    return obj


def check_file(path: Path, role: str, ring_dim: int | None = None) -> None:
    """Finalize-time checks of one staged file."""
    from medblindtuner.he.keys import looks_like_secret_key

    if looks_like_secret_key(path):
        raise ValueError(f"{path.name} is an OpenFHE secret key: refusing it. The secret key "
                         "must never leave the hospital")
    if role in FINALIZE_PARSED:
        try:
            parsed = _parse(path, role)
        except RuntimeError as exc:
            raise ValueError(f"not a valid OpenFHE {role}: {str(exc)[:300]}") from exc
        actual = (parsed.GetRingDimension() if role == "context" else
                  _ring_dimension(parsed) if role == "ciphertext" else None)
        if ring_dim and actual is not None and actual != ring_dim:
            raise ValueError(f"{path.name} has ring dimension {actual}; the job's bundle "
                             f"manifest declares {ring_dim}")


def _ring_dimension(ciphertext) -> int:  # noqa: ANN001 - OpenFHE object
    return int(ciphertext.GetCryptoContext().GetRingDimension())


def check_job(job_dir: Path, allow_insecure: bool, query_id: str | None) -> None:
    """Start-time checks: bundle, dataset (or one query set), headers vs declared params."""
    from medblindtuner.he.keys import _reset_openfhe_state, verify_public_bundle
    from medblindtuner.he.params import CkksParams
    from medblindtuner.protocol import BUNDLE, DATASET, QUERY_INPUT_DIR, query_dir

    bundle = Path(job_dir) / BUNDLE
    manifest = verify_public_bundle(bundle, allow_insecure=allow_insecure)
    params = CkksParams.from_dict(manifest["params"])
    _reset_openfhe_state()
    context = _parse(bundle / "context.bin", "context")
    if context.GetRingDimension() != params.ring_dim:
        raise ValueError(f"the bundle declares parameters {params.name!r} (ring "
                         f"{params.ring_dim}) but its context has ring dimension "
                         f"{context.GetRingDimension()}")
    _parse(bundle / "public_key.bin", "public_key")
    if query_id is None:  # the evaluation keys (GBs) were parsed when the job started
        optional = [name for name in ("shard_keys.bin",) if name in manifest["files"]]
        for name in ["mult_key.bin", "rotation_keys.bin", *optional]:
            _parse(bundle / name, BUNDLE_ROLES[name], context)
    artifact = (query_dir(Path(job_dir), query_id) / QUERY_INPUT_DIR if query_id
                else Path(job_dir) / DATASET)
    listed = json.loads((artifact / "manifest.json").read_text())
    if listed.get("params_fingerprint") != params.fingerprint():
        raise ValueError("the ciphertexts were made for other parameters than the bundle")
    for name in sorted(listed["files"]):
        ciphertext = _parse(artifact / name, "ciphertext")
        if _ring_dimension(ciphertext) != params.ring_dim:
            raise ValueError(f"{name} has ring dimension {_ring_dimension(ciphertext)}, the "
                             f"bundle declares {params.ring_dim}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-bytes", type=int, default=4 << 30)
    parser.add_argument("--cpu-s", type=int, default=120)
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("file")
    one.add_argument("path", type=Path)
    one.add_argument("--role", choices=ROLES, default="unknown")
    one.add_argument("--ring-dim", type=int, default=None)
    job = sub.add_parser("job")
    job.add_argument("job_dir", type=Path)
    job.add_argument("--allow-insecure", action="store_true")
    job.add_argument("--query", default=None)
    args = parser.parse_args(argv)
    limit_resources(args.memory_bytes, args.cpu_s)
    try:
        if args.mode == "file":
            check_file(args.path, args.role, args.ring_dim)
        else:
            check_job(args.job_dir, args.allow_insecure, args.query)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:  # BundleError is a ValueError
        print(json.dumps({"ok": False, "error": str(exc)[:2000]}), flush=True)
        return 0
    except MemoryError:
        print(json.dumps({"ok": False, "error": "parsing it needed more memory than the "
                                                "validator may use: malformed, refused"}),
              flush=True)
        return 0
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
