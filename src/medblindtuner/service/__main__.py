"""`python -m medblindtuner.service serve ...`: the `serve` command without the rest of the CLI.

The full CLI imports the feature extractors (torch), which costs seconds per start; restarts of
the service (supervisors, tests) do not need them.
"""

from __future__ import annotations

from medblindtuner.service.command import app


@app.callback()
def _main() -> None:
    """MedBlindTuner cloud service."""


if __name__ == "__main__":
    app()
