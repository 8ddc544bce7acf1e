"""`medblindtuner consortium <role>` as its own process (insecure test ring), as a hospital
or the cloud operator would run it; shared by the roles tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def consortium_cli(*args: str, timeout: str) -> subprocess.Popen:
    """Start `medblindtuner consortium *args --insecure-test-params --timeout timeout`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "medblindtuner.cli.main", "consortium",
                             *args, "--insecure-test-params", "--timeout", timeout], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(processes: list[subprocess.Popen], timeout: str) -> list[str]:
    """Each process's output, once it exited 0 (its output's tail in the failure if not)."""
    outputs = []
    for process in processes:
        out, _ = process.communicate(timeout=int(timeout))
        assert process.returncode == 0, out[-3000:]
        outputs.append(out)
    return outputs
