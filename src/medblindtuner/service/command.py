"""`serve`: the cloud side (FastAPI + uvicorn; training in worker processes).

Lives with the service so that `python -m medblindtuner.service serve` starts it without the
rest of the CLI (whose feature commands import torch); `medblindtuner serve` adds the same
Typer app.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated

import typer

from medblindtuner.service.limits import ServiceConfig, ServiceLimits

app = typer.Typer(add_completion=False, no_args_is_help=True)


def parse_limits(items: list[str]) -> dict[str, int | float]:
    """`NAME=VALUE` pairs for `ServiceLimits` fields, converted to the field's type."""
    types = {f.name: f.type for f in fields(ServiceLimits)}
    values: dict[str, int | float] = {}
    for item in items:
        name, _, raw = item.partition("=")
        if name not in types:
            raise ValueError(f"unknown limit {name!r}; known: {', '.join(sorted(types))}")
        convert = float if "float" in str(types[name]) else int
        try:
            values[name] = convert(raw)
        except ValueError as exc:
            raise ValueError(f"{name} needs a number, got {raw!r}") from exc
    return values


@app.command("serve")
def serve(
    data_dir: Annotated[Path, typer.Option(help="Jobs DB, blobs and job folders.")] = Path(
        "medblindtuner-data"),
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    db_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in --data-dir).")
    ] = None,
    insecure_test_params: Annotated[
        bool, typer.Option(help="Accept NOT-secure test parameter bundles (tests only).")
    ] = False,
    max_upload_bytes: Annotated[
        int | None, typer.Option(help="Largest accepted artifact file, in bytes.")
    ] = None,
    max_job_bytes: Annotated[
        int | None, typer.Option(help="Largest total upload of one job, in bytes.")
    ] = None,
    chunk_bytes: Annotated[
        int | None, typer.Option(help="Upload chunk size clients must use, in bytes.")
    ] = None,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(help="Reverse proxies whose X-Forwarded-For is trusted (comma-separated "
                          "addresses); default: none, quotas use the TCP peer address.")
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option(help="Any other limit or quota of ServiceLimits as NAME=VALUE, e.g. "
                          "max_live_jobs=100 or token_rate_per_s=20 (repeatable).")
    ] = None,
) -> None:
    """Run the cloud training service (it never holds a secret key)."""
    from medblindtuner.service.app import run_server

    defaults = ServiceLimits()
    try:
        values: dict[str, int | float] = {
            "max_upload_bytes": max_upload_bytes or defaults.max_upload_bytes,
            "max_job_bytes": max_job_bytes or defaults.max_job_bytes,
            "chunk_bytes": chunk_bytes or defaults.chunk_bytes,
        }
        values.update(parse_limits(limit or []))
        limits = replace(defaults, **values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--limit") from exc
    if insecure_test_params:
        typer.secho("WARNING: accepting INSECURE test parameters (never use with real "
                    "patient data)", fg=typer.colors.RED, err=True)
    config = ServiceConfig(data_dir=data_dir, db_url=db_url,
                           allow_insecure=insecure_test_params, limits=limits,
                           forwarded_allow_ips=forwarded_allow_ips)
    run_server(config, host=host, port=port)
