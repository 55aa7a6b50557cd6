"""``kcache data ...``: thin layers over :mod:`kcache.data` (synth, convert, split, stats)."""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.cli.errors import errors

HELP = "Knowledge samples: synthesise, convert datasets, inspect."


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


def convert_cmd(
    name: str = typer.Argument(...,
                               help="dataset: cmu_dog, curiosity, dream, natural_questions, quasar_t, "
                                    "wizard_of_wikipedia, proofwriter, folio, counterfact, commonsenseqa"),
    input_path: str = typer.Option(..., "--input",
                                   help="the dataset's raw file or folder (see docs/data.md), or hf:NAME[:CONFIG] for "
                                        "hub-layout datasets"),
    out: Path = typer.Option(..., "--out", help="output .parquet or .jsonl"),
    split: str | None = typer.Option(None, "--split",
                                     help="train | validation | test; default: the split the input's name announces "
                                          "(dev.json -> validation)"),
    reference: bool = typer.Option(False, "--reference-preprocessing",
                                   help="the paper's preprocessing (dream: first question per dialogue, no "
                                        "fill-in-the-blank, W:/M: -> Woman:/Man:)"),
):
    """Convert a public dataset's raw files into knowledge samples and print what was kept and dropped."""
    from kcache.data.convert import convert, format_report

    with errors():
        report = convert(name, input_path, out, split, reference=reference)
    typer.echo(format_report(report))


def split_cmd(
    file: Path = typer.Argument(..., help="a samples .parquet or .jsonl"),
    out: Path = typer.Option(..., "--out", help="output .parquet or .jsonl"),
    sizes: str = typer.Option(..., "--sizes", help="minimum samples in train,validation,test, e.g. 600,100,150"),
    by: str = typer.Option("dialogue_id", "--by",
                           help="meta field whose samples stay together (absent: each sample alone)"),
    seed: int = typer.Option(0, "--seed"),
):
    """Re-split samples by whole groups (e.g. DREAM dialogues), so no knowledge is shared across splits."""
    from kcache.data.samples import read_samples, write_samples
    from kcache.data.split import SPLITS, split_by_group

    with errors():
        try:
            n = [int(v) for v in sizes.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--sizes: expected three integers like 600,100,150, got {sizes!r}") from None
        if len(n) != 3:
            raise typer.BadParameter(f"--sizes: expected three integers (train,validation,test), got {sizes!r}")
        table = split_by_group(read_samples(file), dict(zip(SPLITS, n)), by, seed)
        write_samples(table, out)
    counts = {s: table["split"].to_pylist().count(s) for s in SPLITS}
    typer.echo(f"wrote {table.num_rows} samples to {out} "
               f"({', '.join(f'{k} {v}' for k, v in counts.items())}), grouped by {by}")


def stats_cmd(
    file: Path = typer.Argument(..., help="a samples .parquet or .jsonl"),
    as_json: bool = typer.Option(False, "--json", help="print the statistics as JSON"),
):
    """Per dataset/split counts, knowledge / source / target lengths, labels and optional fields present."""
    import json

    from kcache.data.convert import format_stats, stats

    with errors():
        s = stats(file)
    typer.echo(json.dumps(s, indent=2, ensure_ascii=False) if as_json else format_stats(s))
