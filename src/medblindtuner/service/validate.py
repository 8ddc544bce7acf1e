"""Parse attacker-supplied artifacts in a short-lived, resource-limited subprocess.

OpenFHE's deserialisers are C++ code fed with bytes chosen by a client the service does not
trust: one flipped bit in a key file with a matching checksum can make them abort, segfault or
allocate without bound, and that would take the web process (every job) down with it. So the
web process never calls an OpenFHE `Deserialize*` on uploaded bytes: it runs

    python -m medblindtuner.service.validate [--memory-bytes N --cpu-s S] file PATH... --role R
    python -m medblindtuner.service.validate [...] job JOB_DIR [--allow-insecure] [--query Q]

under `setrlimit` limits on address space and CPU time (which the child sets before it reads
anything) and a wall-clock timeout. The child
prints one JSON line (`{"ok": true}` or `{"ok": false, "error": ...}`); a crash, a timeout or
no answer is a refusal of the artifact, never of the service.

`file` runs at finalize: the secret-key check (a file that parses as an OpenFHE private key is
refused) and, for the small roles (context, public key, ciphertexts), a parse as that role; a
batch of one upload's ciphertexts shares one child (`Validator.batch_passes`: the child's start
costs more than a ciphertext's parse).
`job` runs at start: the whole public bundle (checksums, exactly the public files, each parsed
as its role, the context's ring dimension against the parameters the manifest declares) and
every dataset (or query) ciphertext, whose ring dimension must be the bundle's too. The checks
run again in the worker, which is a separate process anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medblindtuner.he.untrusted import (
    ROLES,
    Verdict,
    answer,
    check_file,
    limit_resources,
    parse,
    ring_dimension,
    run_isolated,
    stage,
)
from medblindtuner.service.errors import BadRequest, CloudError
from medblindtuner.service.limits import ServiceLimits

MODULE = "medblindtuner.service.validate"
BUNDLE_ROLES = {"context.bin": "context", "public_key.bin": "public_key",
                "mult_key.bin": "mult_key", "rotation_keys.bin": "rotation_keys",
                "shard_keys.bin": "rotation_keys"}  # the Ray shard actors' subset
__all__ = ["Validator", "Verdict", "check_job", "limit_resources", "run_validator"]


def run_validator(args: list[str], timeout_s: float, memory_bytes: int, what: str,
                  python: str = sys.executable) -> Verdict:
    """This module's child (`file` or `job` mode) under the limits; always a verdict."""
    return run_isolated(args, timeout_s, memory_bytes, what, MODULE, python)


def file_role(kind: str, name: str) -> str:
    """What an uploaded file must parse as: its bundle role, else a ciphertext."""
    if kind == "bundle":
        return BUNDLE_ROLES.get(name, "unknown")
    return "ciphertext"


class ValidatorsBusy(CloudError):
    """Every validator slot stayed busy for the whole queueing time."""

    status_code = 503
    headers = {"Retry-After": "30"}


class Validator:
    """The service's checks of uploaded OpenFHE files, each in its own limited subprocess.

    At most `limits.max_concurrent_validators` children run at once, whatever the number of
    concurrent finalizes and starts: the others wait for a slot (a queue, not N at once).
    Replaceable (like the supervisor's spawner): in-process tests on random bytes use a
    stand-in, the real subprocess is exercised by the tests that upload real keys."""

    def __init__(self, limits: ServiceLimits, allow_insecure: bool,
                 python: str = sys.executable) -> None:
        self.limits = limits
        self.allow_insecure = allow_insecure
        self.python = python
        self._slots = threading.BoundedSemaphore(max(1, limits.max_concurrent_validators))

    @contextmanager
    def slot(self, what: str) -> Iterator[None]:
        """One of the validator slots, waited for; 503 if none frees up in time."""
        if not self._slots.acquire(timeout=self.limits.validator_queue_s):
            raise ValidatorsBusy(f"every validator was busy for {self.limits.validator_queue_s:g}"
                                 f" s; {what} was not checked: retry later")
        try:
            yield
        finally:
            self._slots.release()

    def check_file(self, path: Path, kind: str, name: str,
                   declared: dict | None = None) -> None:
        """Finalize: not a secret key, parses as its role (small roles), of the declared ring
        dimension; a context must be what the bundle manifest's `declared` parameters say
        (read from the context itself). 400 otherwise."""
        extra = ["--params", json.dumps(declared)] if declared else []
        verdict = self._files_verdict([path], file_role(kind, name), declared, name, extra)
        if not verdict.ok:
            raise BadRequest(verdict.error or f"{name} refused")

    def batch_passes(self, paths: list[Path], role: str, declared: dict | None) -> bool:
        """Finalize of several files of one job and role in ONE child: True only if every
        file passes `check_file`'s checks. On False the caller checks each file alone (which
        one failed, with its own reason); a batch never refuses a file by itself."""
        return self._files_verdict(paths, role, declared, f"{len(paths)} files").ok

    def _files_verdict(self, paths: list[Path], role: str, declared: dict | None, what: str,
                       extra: list[str] = ()) -> Verdict:
        """One `file` child over `paths`, with the declared ring dimension, in a slot."""
        ring = ["--ring-dim", str(declared["ring_dim"])] if declared else []
        with self.slot(what):
            return run_validator(["file", *map(str, paths), "--role", role, *ring, *extra],
                                 self.limits.validate_timeout_s,
                                 self.limits.validate_memory_bytes, what, self.python)

    def check_job(self, job_dir: Path, query_id: str | None = None) -> None:
        """Start (or scoring): the bundle and the ciphertexts, parsed and matched. 400."""
        args = ["job", str(job_dir)] + (["--allow-insecure"] if self.allow_insecure else [])
        if query_id is not None:
            args += ["--query", query_id]
        what = "the query set" if query_id else "the job's artifacts"
        with self.slot(what):
            verdict = run_validator(args, self.limits.validate_job_timeout_s,
                                    self.limits.validate_job_memory_bytes, what, self.python)
        if not verdict.ok:
            prefix = "refusing to score: " if query_id else "refusing to train: "
            raise BadRequest(prefix + (verdict.error or "refused"))


# ---- child side: the start-time checks (OpenFHE imported only in the child) -------------
def check_context(context, params) -> None:  # noqa: ANN001 - OpenFHE context, CkksParams
    """The context is what the manifest declares: read from the context, never trusted."""
    from medblindtuner.he.params import context_mismatches

    found = context_mismatches(context, params)
    if found:
        raise ValueError("the uploaded context does not match the bundle manifest: it has "
                         + "; ".join(found))


def check_context_file(path: Path, declared: str) -> None:
    """Finalize of context.bin: its parameters against the bundle manifest's."""
    from medblindtuner.he.params import CkksParams

    check_context(parse(path, "context"), CkksParams.from_dict(json.loads(declared)))


def check_job(job_dir: Path, allow_insecure: bool, query_id: str | None) -> None:
    """Start-time checks: bundle, dataset (or one query set), headers vs declared params."""
    from medblindtuner.he.keys import _reset_openfhe_state, verify_public_bundle
    from medblindtuner.he.params import CkksParams
    from medblindtuner.protocol import BUNDLE, DATASET, QUERY_INPUT_DIR, query_dir

    bundle = Path(job_dir) / BUNDLE
    manifest = verify_public_bundle(bundle, allow_insecure=allow_insecure)
    params = CkksParams.from_dict(manifest["params"])
    _reset_openfhe_state()
    context = parse(bundle / "context.bin", "context")
    if context.GetRingDimension() != params.ring_dim:
        raise ValueError(f"the bundle declares parameters {params.name!r} (ring "
                         f"{params.ring_dim}) but its context has ring dimension "
                         f"{context.GetRingDimension()}")
    check_context(context, params)
    parse(bundle / "public_key.bin", "public_key")
    if query_id is None:  # the evaluation keys (GBs) were parsed when the job started
        optional = [name for name in ("shard_keys.bin",) if name in manifest["files"]]
        for name in ["mult_key.bin", "rotation_keys.bin", *optional]:
            parse(bundle / name, BUNDLE_ROLES[name], context)
    artifact = (query_dir(Path(job_dir), query_id) / QUERY_INPUT_DIR if query_id
                else Path(job_dir) / DATASET)
    listed = json.loads((artifact / "manifest.json").read_text())
    if listed.get("params_fingerprint") != params.fingerprint():
        raise ValueError("the ciphertexts were made for other parameters than the bundle")
    sample = None
    for name in sorted(listed["files"]):
        ciphertext = parse(artifact / name, "ciphertext")
        if ring_dimension(ciphertext) != params.ring_dim:
            raise ValueError(f"{name} has ring dimension {ring_dimension(ciphertext)}, the "
                             f"bundle declares {params.ring_dim}")
        sample = sample or ciphertext
    if query_id is None and sample is not None:
        check_bootstrapping(context, params, sample)


def check_bootstrapping(context, params, sample) -> None:  # noqa: ANN001 - OpenFHE objects
    """The declared bootstrapping set-up works with the uploaded keys: set up as the worker
    will (declared level budgets and slot counts) and bootstrap one dataset ciphertext per
    slot count. Keys made for another set-up lack the rotations it needs."""
    from medblindtuner.he.params import level_budget_for, setup_bootstrapping

    budgets = sorted({tuple(level_budget_for(params, n)) for n in params.bootstrap_slots})
    stage(f"the declared bootstrapping set-up (level budgets {budgets}, slots "
          f"{list(params.bootstrap_slots)}) with the uploaded keys")
    try:
        setup_bootstrapping(context, params)
        for slots in params.bootstrap_slots:
            work = sample.Clone()
            work.SetSlots(slots)
            context.EvalBootstrap(work)
    except RuntimeError as exc:
        raise ValueError(f"the declared bootstrapping set-up (level budgets {budgets}, slots "
                         f"{list(params.bootstrap_slots)}) does not work with the uploaded "
                         f"keys: {str(exc)[:300]}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-bytes", type=int, default=4 << 30)
    parser.add_argument("--cpu-s", type=int, default=120)
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("file")
    one.add_argument("path", type=Path, nargs="+")
    one.add_argument("--role", choices=ROLES, default="unknown")
    one.add_argument("--ring-dim", type=int, default=None)
    one.add_argument("--params", default=None, help="declared CkksParams (JSON)")
    job = sub.add_parser("job")
    job.add_argument("job_dir", type=Path)
    job.add_argument("--allow-insecure", action="store_true")
    job.add_argument("--query", default=None)
    args = parser.parse_args(argv)
    limit_resources(args.memory_bytes, args.cpu_s)
    if args.mode == "file":
        def checks() -> None:
            for path in args.path:
                stage(path.name)
                check_file(path, args.role, args.ring_dim)
                if args.role == "context" and args.params:
                    check_context_file(path, args.params)
        return answer(checks)
    return answer(lambda: check_job(args.job_dir, args.allow_insecure, args.query))


if __name__ == "__main__":
    sys.exit(main())
