"""``kcache data ...``: thin CLI over kcache.data."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Knowledge samples: synthesise, convert datasets, inspect.", no_args_is_help=True)


@app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", help="output .parquet or .jsonl"),
    n: int = typer.Option(1200, "--n", help="number of samples"),
    seed: int = typer.Option(0, "--seed"),
    distractors: int = typer.Option(3, "--distractors", help="distractor facts per sample"),
):
    """Write the deterministic fictional-fact demo set."""
    from kcache.data.samples import write_samples
    from kcache.data.synth import synth_samples

    table = synth_samples(n, seed, distractors)
    write_samples(table, out)
    splits = {s: table["split"].to_pylist().count(s) for s in ("train", "validation", "test")}
    typer.echo(f"wrote {table.num_rows} samples to {out} ({', '.join(f'{k} {v}' for k, v in splits.items())})")
