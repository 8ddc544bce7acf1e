"""Parse OpenFHE bytes from the other side in a short-lived, resource-limited subprocess.

Both roles receive OpenFHE objects they must not trust: the cloud gets keys and ciphertexts
from hospitals it does not know, the hospital gets validation-loss ciphertexts from a cloud
that may be malicious. OpenFHE's deserialisers are C++ code: one crafted length field makes
them allocate gigabytes, spin or abort. So neither role calls a `Deserialize*` on such bytes
in its own process before this module's child has parsed them

    python -m medblindtuner.he.untrusted [--memory-bytes N --cpu-s S] PATH --role R
                                         [--ring-dim N]

under `setrlimit` limits on address space and CPU time (set by the child before it reads
anything) and a wall-clock timeout. The child prints one JSON verdict line; a crash, a timeout
or no answer is a refusal of the bytes, never of the caller. The service adds its own
start-time checks on top (`service.validate`, which uses the runner below).
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

MODULE = "medblindtuner.he.untrusted"
ROLES = ("context", "public_key", "mult_key", "rotation_keys", "ciphertext", "refresh_request",
         "refresh_answer", "unknown")
# A refresh message (he.refresh): framing, then each ciphertext part parsed as one.
REFRESH_ROLES = ("refresh_request", "refresh_answer")
# Roles cheap enough to parse one file alone; the evaluation keys need their context.
ALONE_PARSED = ("context", "public_key", "ciphertext")
GIB = 1 << 30


@dataclass(frozen=True)
class Verdict:
    ok: bool
    error: str | None = None


def machine_memory_bytes() -> int:
    """Physical memory of this machine, or its cgroup's limit if that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def limit_resources(memory_bytes: int, cpu_s: int) -> None:
    """The child's first act, before it reads a byte: cap its address space and CPU time and
    forbid core dumps. (Set by the child itself rather than in a `preexec_fn`, which is not
    safe in a threaded parent.)"""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_isolated(args: list[str], timeout_s: float, memory_bytes: int, what: str,
                 module: str = MODULE, python: str = sys.executable) -> Verdict:
    """Run `python -m module` with the limits; any crash, timeout or garbled answer is a
    refusal verdict with its reason (every input gets a verdict)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [python, "-m", module, "--memory-bytes", str(memory_bytes), "--cpu-s",
             str(int(timeout_s) + 1), *args], capture_output=True, text=True, env=env,
            timeout=timeout_s, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return Verdict(False, f"validating {what} took longer than {timeout_s:g} s: refused")
    return verdict_of(done.returncode, done.stdout, what, memory_bytes, timeout_s)


def verdict_of(returncode: int, stdout: str, what: str, memory_bytes: int,
               timeout_s: float) -> Verdict:
    """The child's verdict from its exit status and output (a signal or a garbled answer is
    a refusal with its reason)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Verdict(False, f"{what} crashed OpenFHE ({name}; limits {memory_bytes >> 20} "
                              f"MiB, {timeout_s:g} s){last_stage(lines)}: malformed, refused")
    try:
        answer = json.loads(lines[-1])
        verdict = Verdict(bool(answer["ok"]), answer.get("error"))
    except (IndexError, KeyError, TypeError, ValueError):
        return Verdict(False, f"{what} could not be parsed (validator exit code "
                              f"{returncode}, e.g. out of memory): refused")
    if not verdict.ok and not verdict.error:
        return Verdict(False, f"{what} refused by the validator")
    return verdict


def last_stage(lines: list[str]) -> str:
    """`while <stage>` from the child's last `stage` line (what it was doing when it died)."""
    for line in reversed(lines):
        try:
            stage = json.loads(line).get("stage")
        except (ValueError, AttributeError):
            continue
        if stage:
            return f" while checking {str(stage)[:300]}"
    return ""


def stage(text: str) -> None:
    """Child: announce the next step, so a crash in it is reported with its name."""
    print(json.dumps({"stage": text}), flush=True)


# ---- child side: the actual parsing (OpenFHE imported only here) ----------------------------
def parse(path: Path, role: str, context=None):  # noqa: ANN001, ANN201 - OpenFHE objects
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


def ring_dimension(ciphertext) -> int:  # noqa: ANN001 - OpenFHE object
    return int(ciphertext.GetCryptoContext().GetRingDimension())


def check_file(path: Path, role: str, ring_dim: int | None = None) -> None:
    """One file alone: not a secret key; the small roles parse as such and have the expected
    ring dimension."""
    from medblindtuner.he.keys import looks_like_secret_key

    if looks_like_secret_key(path):
        raise ValueError(f"{path.name} is an OpenFHE secret key: refusing it. The secret key "
                         "must never leave the hospital")
    if role in REFRESH_ROLES:
        check_refresh_message(path, role, ring_dim)
    elif role in ALONE_PARSED:
        try:
            parsed = parse(path, role)
        except RuntimeError as exc:
            raise ValueError(f"not a valid OpenFHE {role}: {str(exc)[:300]}") from exc
        actual = (parsed.GetRingDimension() if role == "context" else
                  ring_dimension(parsed) if role == "ciphertext" else None)
        if ring_dim and actual is not None and actual != ring_dim:
            raise ValueError(f"{path.name} has ring dimension {actual}; expected {ring_dim}")


def check_refresh_message(path: Path, role: str, ring_dim: int | None) -> None:
    """A refresh request (c1) or answer (a, h0, h1): well framed, each part one ring element
    of the expected ring dimension."""
    from medblindtuner.he.ciphertexts import ciphertext_from_bytes
    from medblindtuner.he.refresh import RefreshAnswer, RefreshRequest

    data = path.read_bytes()
    message = (RefreshRequest if role == "refresh_request" else RefreshAnswer).from_bytes(data)
    parts = ([message.c1] if role == "refresh_request" else [message.a, message.h0, message.h1])
    for number, part in enumerate(parts):
        stage(f"part {number} of the {role.replace('_', ' ')}")
        try:
            parsed = ciphertext_from_bytes(part)
        except Exception as exc:  # noqa: BLE001 - BundleError or OpenFHE's RuntimeError
            raise ValueError(f"part {number} of the {role.replace('_', ' ')} is not a "
                             f"ciphertext: {str(exc)[:300]}") from exc
        if parsed.NumberCiphertextElements() != 1:
            raise ValueError(f"part {number} of the {role.replace('_', ' ')} holds "
                             f"{parsed.NumberCiphertextElements()} elements, not one")
        if ring_dim and ring_dimension(parsed) != ring_dim:
            raise ValueError(f"part {number} of the {role.replace('_', ' ')} has ring "
                             f"dimension {ring_dimension(parsed)}; expected {ring_dim}")


class PrewarmedChecker:
    """Checks of one role in limited children started ahead of the bytes they will check.

    Each check runs in a fresh child with the limits of `run_isolated` (one child, one
    input: a crash or a leak ends with it); only the child's start (the interpreter and
    OpenFHE loaded, ~0.3 s quiet) happens before the bytes arrive, while the caller waits for
    them (a refresh round trip: docs/results.md, "Refresh through the service"). The spare
    child waits on stdin, without CPU, and exits when its parent goes (end of input).
    """

    def __init__(self, role: str, ring_dim: int | None, memory_bytes: int = 4 * GIB,
                 timeout_s: float = 120.0, python: str = sys.executable) -> None:
        self.role, self.ring_dim = role, ring_dim
        self.memory_bytes, self.timeout_s, self.python = memory_bytes, timeout_s, python
        self._spare: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        ring = ["--ring-dim", str(self.ring_dim)] if self.ring_dim else []
        return subprocess.Popen(
            [self.python, "-m", MODULE, "--memory-bytes", str(self.memory_bytes), "--cpu-s",
             str(int(self.timeout_s) + 1), "-", "--role", self.role, *ring],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def check(self, data: bytes, what: str) -> Verdict:
        """`data` checked as this role by a fresh limited child; the next one starts."""
        import tempfile

        child, self._spare = self._spare or self._start(), None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "untrusted.bin"
            path.write_bytes(data)
            try:
                out, _ = child.communicate(f"{path}\n", timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                verdict = Verdict(False, f"validating {what} took longer than "
                                         f"{self.timeout_s:g} s: refused")
            else:
                verdict = verdict_of(child.returncode, out, what, self.memory_bytes,
                                     self.timeout_s)
        self._spare = self._start()
        return verdict

    def close(self) -> None:
        """Stop the spare child (it would also exit when this process ends)."""
        if self._spare is not None:
            self._spare.kill()
            self._spare.communicate()
            self._spare = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: the child exits anyway
            pass


def answer(check) -> int:  # noqa: ANN001 - a callable running the checks
    """Run `check()` and print the one verdict line the parent reads."""
    try:
        check()
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)[:2000]}), flush=True)
        return 0
    except MemoryError:
        print(json.dumps({"ok": False, "error": "parsing it needed more memory than the "
                                                "validator may use: malformed, refused"}),
              flush=True)
        return 0
    print(json.dumps({"ok": True}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-bytes", type=int, default=4 * GIB)
    parser.add_argument("--cpu-s", type=int, default=120)
    parser.add_argument("path", type=Path, help="the file, or - to read its path from stdin")
    parser.add_argument("--role", choices=ROLES, default="unknown")
    parser.add_argument("--ring-dim", type=int, default=None)
    args = parser.parse_args(argv)
    limit_resources(args.memory_bytes, args.cpu_s)
    path = args.path
    if str(path) == "-":  # prewarmed (PrewarmedChecker): load OpenFHE, then wait for a path
        import medblindtuner.he.refresh  # noqa: F401 - imports openfhe and the parsers

        path = Path(sys.stdin.readline().strip())
    return answer(lambda: check_file(path, args.role, args.ring_dim))


if __name__ == "__main__":
    sys.exit(main())
