"""Entry point `medblindtuner`: assembles the per-role command modules into one typer app."""

from __future__ import annotations

import importlib

import click
import typer
from typer.core import TyperGroup

from medblindtuner.errors import EXIT_USER_ERROR, MedBlindTunerError


class _Commands(TyperGroup):
    """Every command's user-actionable errors are handled here, once: one `error:` line on
    stderr and exit code 2, for all commands alike."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MedBlindTunerError as exc:
            from rich.console import Console
            from rich.markup import escape

            # one line whatever the terminal width; the message's brackets are text, not markup
            Console(stderr=True).print(f"[bold red]error:[/] {escape(' '.join(str(exc).split()))}",
                                       soft_wrap=True)
            ctx.exit(EXIT_USER_ERROR)


app = typer.Typer(
    name="medblindtuner",
    help="Fine-tune a classifier head on FHE-encrypted medical image features.",
    no_args_is_help=True,
    add_completion=False,
    cls=_Commands,
)


@app.callback()
def _root() -> None:
    """Fine-tune a classifier head on FHE-encrypted medical image features."""


# Each module defines a module-level Typer `app`; a named one (`hospital`) becomes a command
# group, the others' commands are added at the top level.
_COMMAND_MODULES = [
    "medblindtuner.cli.features_cmd",
    "medblindtuner.cli.train_cmd",
    "medblindtuner.cli.service_cmd",
    "medblindtuner.cli.hospital_cmd",
    "medblindtuner.cli.demo_cmd",
    "medblindtuner.cli.experiment_cmd",
    "medblindtuner.cli.consortium_cmd",
]

for _name in _COMMAND_MODULES:
    _commands = importlib.import_module(_name).app
    app.add_typer(_commands, name=_commands.info.name)


if __name__ == "__main__":
    app()
