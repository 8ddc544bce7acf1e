"""Entry point `medblindtuner`: assembles the per-role command modules into one typer app."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="medblindtuner",
    help="Fine-tune a classifier head on FHE-encrypted medical image features.",
    no_args_is_help=True,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """Fine-tune a classifier head on FHE-encrypted medical image features."""


# Each module defines `register(app: typer.Typer) -> None`. Modules that do not exist yet are
# skipped so that roles can be developed independently.
_COMMAND_MODULES = [
    "medblindtuner.cli.features_cmd",
    "medblindtuner.cli.train_cmd",
    "medblindtuner.cli.service_cmd",
    "medblindtuner.cli.hospital_cmd",
    "medblindtuner.cli.demo_cmd",
    "medblindtuner.cli.experiment_cmd",
]

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # only tolerate the module itself being absent
        if exc.name != _name:
            raise
        continue
    _module.register(app)


if __name__ == "__main__":
    app()
