"""A real service process for the tests (restartable on the same data dir)."""

from __future__ import annotations

from pathlib import Path

from medblindtuner.service.local import LocalService, free_port

CHUNK = 4 << 20  # 4 MiB: the key files span several chunks

__all__ = ["CHUNK", "ServiceProcess", "free_port"]


class ServiceProcess(LocalService):
    """`serve` on the insecure test ring by default, uploads in `CHUNK`-byte chunks."""

    def __init__(self, data_dir: Path, *extra: str, insecure: bool = True,
                 full_cli: bool = False) -> None:
        super().__init__(data_dir, "--chunk-bytes", str(CHUNK), *extra, insecure=insecure,
                         entry="medblindtuner.cli.main" if full_cli else "medblindtuner.service",
                         log_name="server.out", start_timeout_s=60)
