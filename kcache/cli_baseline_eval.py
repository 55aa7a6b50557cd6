"""``kcache evaluate-baselines``: LoRA / KaSA / SFT baselines through ``kcache evaluate``.

``register(app)`` adds the command to the main typer app. It evaluates D(x), D(K,x),
D(E(K,x)+x) (with ``--encoders``) and one ``base_<dirname>`` method per ``--baselines``
directory (D(K,x) through that baseline, see ``kcache.evaluate_baselines``) on the same batches
and writes the usual ``evaluation.json / .md / .png``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.cli_errors import errors as _errors  # the one CLI error handler
from kcache.cli_stage3 import _DEVICE_HELP, _MODEL_HELP


def evaluate_baselines_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="samples .parquet or .jsonl"),
    baselines: list[Path] = typer.Option(..., "--baselines", "-b", help="train-baseline output directory; repeat for several"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="encoder bundle directory (adds D(E(K,x)+x))"),
    split: str = typer.Option("test", "--split", help="evaluate this split only ('' for all rows)"),
    out: Path = typer.Option(Path("eval-baselines"), "--out", "-o", help="directory for evaluation.json / .md / .png"),
    limit: int = typer.Option(None, "--limit", help="first N samples of the split"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=_MODEL_HELP),
    token_budget: int = typer.Option(4096, "--token-budget", help="padded tokens per batch"),
    max_length: int = typer.Option(None, "--max-length", help="bound on len(k_ids + x_ids) (default: the bundle's, else 1024)"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)"),
    device: str = typer.Option(None, "--device", help=_DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
):
    """D(x), D(K,x), D(E(K,x)+x) and D(K,x) through each LoRA / KaSA / SFT baseline."""
    import torch

    from kcache.evaluate import evaluate, markdown_report, write_report
    from kcache.evaluate_baselines import (
        register_baseline_methods,
        release,
        trainable_parameters,
    )
    from kcache.models import load_decoder

    if threads:
        torch.set_num_threads(threads)
    with _errors():
        names = register_baseline_methods(baselines)
        methods = ["x", "kx"] + (["ekx"] if encoders is not None else []) + names
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        try:
            res = evaluate(decoder, samples, encoders, methods, split=split or None, limit=limit,
                           token_budget=token_budget, max_length=max_length, progress=True)
        finally:
            release()
        res["settings"]["baselines"] = {n: str(p) for n, p in zip(names, baselines)}
        res["settings"]["trainable_params"] = trainable_parameters(baselines)
        paths = write_report(res, out)
    typer.echo(markdown_report(res))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def register(app: typer.Typer) -> None:
    """Add ``evaluate-baselines`` to ``app``."""
    app.command("evaluate-baselines")(evaluate_baselines_cmd)
