"""A real `medblindtuner serve` process for the tests (restartable on the same data dir)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CHUNK = 4 << 20  # 4 MiB: the key files span several chunks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """`medblindtuner serve` on a free port; restartable on the same data dir."""

    def __init__(self, data_dir: Path, *extra: str, insecure: bool = True,
                 full_cli: bool = False) -> None:
        self.data_dir = Path(data_dir)
        # The full CLI (`medblindtuner serve`) imports torch; the service module starts faster.
        self.entry = "medblindtuner.cli.main" if full_cli else "medblindtuner.service"
        self.extra = list(extra)
        self.insecure = insecure
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        command = [sys.executable, "-m", self.entry, "serve", "--host",
                   "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
                   "--chunk-bytes", str(CHUNK), *self.extra]
        if self.insecure:
            command.append("--insecure-test-params")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "server.out", "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.data_dir / "server.out").read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service did not come up")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill_workers(self) -> None:
        """Test cleanup: workers are detached on purpose, so end the ones we caused."""
        for pid_file in (self.data_dir / "jobs").glob("*/worker.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
