"""The cloud service as a separate OS process on loopback, as a user would deploy it.

One starter for everything that runs a real service next to the hospital on one machine:
the demo, the tests and `benchmarks/hostile.py`. Restartable on the same data directory,
so crash and restart cases use the same object.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalService:
    """`serve` on a free loopback port, with its output appended to `<data_dir>/<log_name>`.

    `entry` is the module run with `python -m`: the service package starts faster than the
    full CLI (which imports torch); tests of the CLI pass `medblindtuner.cli.main`.
    """

    def __init__(self, data_dir: Path, *extra: str, insecure: bool = False,
                 entry: str = "medblindtuner.service", log_name: str = "service.log",
                 start_timeout_s: float = 120.0) -> None:
        self.data_dir = Path(data_dir)
        self.extra = list(extra)
        self.insecure = insecure
        self.entry = entry
        self.log_path = self.data_dir / log_name
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalService:
        """Start the process and wait until `/healthz` answers; its log tail if it dies."""
        command = [sys.executable, "-m", self.entry, "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra]
        if self.insecure:
            command.append("--insecure-test-params")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("cloud service exited:\n" + self.log_path.read_text()[-3000:])
            if self.alive(timeout_s=1):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"cloud service did not start within {self.start_timeout_s:.0f} s")

    def alive(self, timeout_s: float = 10) -> bool:
        """The process runs and answers its health check."""
        try:
            return (self.process is not None and self.process.poll() is None
                    and httpx.get(f"{self.url}/healthz", timeout=timeout_s).status_code == 200)
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` (SIGKILL for crash cases) and wait; kill if it does not end in 20 s."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill_workers(self, sig: int = signal.SIGKILL) -> None:
        """Workers are detached on purpose (they outlive a service restart); end ours."""
        for pid_file in (self.data_dir / "jobs").glob("**/worker.pid"):
            try:
                os.kill(int(pid_file.read_text()), sig)
            except (ProcessLookupError, ValueError, PermissionError):
                pass

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
        self.kill_workers(signal.SIGTERM)
