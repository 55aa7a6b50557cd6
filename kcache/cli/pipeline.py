"""``kcache run CONFIG.toml``: a whole pipeline recipe (thin layer over :mod:`kcache.pipeline`)."""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.cli.errors import errors


def run_cmd(config: Path = typer.Argument(..., help="pipeline config, e.g. pipelines/demo.toml")):
    """Run a whole pipeline recipe (data -> extract -> fit -> finetune -> evaluate), skipping finished stages."""
    from kcache.pipeline import run_pipeline

    with errors():
        run_pipeline(config, log=typer.echo)
