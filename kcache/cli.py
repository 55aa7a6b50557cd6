"""The ``kcache`` command line. Each command is a thin layer over a function in the module named
after its stage (extract, fit, inject, evaluate, data, kg)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from kcache import __version__
from kcache.data.cli import app as data_app

app = typer.Typer(
    help="kcache: inject external knowledge into a frozen decoder (DIEKÆ), cache-first.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")


def _version(value: bool):
    if value:
        typer.echo(f"kcache {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")):
    """kcache command line."""


def fail(msg: str, code: int = 1):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def run():  # pragma: no cover - console entry with clean errors
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


del Path
