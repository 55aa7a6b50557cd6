"""Stage three: ``generate`` and ``evaluate`` (thin layers over :mod:`kcache.generate`, :mod:`kcache.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.cli._options import DEVICE_HELP, MODEL_HELP
from kcache.cli.errors import ensure_writable_dir, errors


def generate_cmd(
    encoders: Path = typer.Option(..., "--encoders", "-e", help="encoder bundle directory"),
    knowledge: list[str] = typer.Option(..., "--knowledge", "-k",
                                        help="knowledge text; repeat for several passages (joined by the bundle's "
                                             "separator)"),
    prompt: str = typer.Option(..., "--prompt", "-p",
                               help='the input, used as the sample source, e.g. '
                                    '"[USR] What is the capital of Zorbia? [SYS]"'),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    compare: bool = typer.Option(False, "--compare",
                                 help="also generate without knowledge and with the knowledge in context"),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
):
    """Continue a prompt with knowledge injected by trained encoders."""
    from kcache.generate import generate, render
    from kcache.inject import Injector
    from kcache.models import load_decoder

    with errors():
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        injector = Injector.from_bundle(decoder, encoders)
        g = generate(decoder, injector, list(knowledge), prompt, max_new_tokens=max_new_tokens, compare=compare)
    typer.echo(render(g))


def evaluate_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="samples .parquet or .jsonl"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="encoder bundle directory (needed by ekx)"),
    split: str = typer.Option("test", "--split", help="evaluate this split only ('' for all rows)"),
    cache: str = typer.Option(None, "--cache", help="stage-one cache (directory or URL) for the oracle (exact deltas)"),
    methods: str = typer.Option(None, "--methods",
                                help="comma-separated: x, kx, ekx, oracle (default: x,kx,ekx, plus oracle with "
                                     "--cache)"),
    out: Path = typer.Option(Path("eval-results"), "--out", "-o", help="directory for evaluation.json / .md / .png"),
    limit: int = typer.Option(None, "--limit", help="first N samples of the split"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    token_budget: int = typer.Option(4096, "--token-budget", help="padded tokens per batch"),
    max_length: int = typer.Option(None, "--max-length",
                                   help="bound on len(k_ids + x_ids) (default: the bundle's / cache's)"),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
    controls: bool = typer.Option(True, "--controls/--no-controls",
                                  help="also run knowledge-reading methods with another sample's knowledge and with "
                                       "none (knowledge use)"),
    share_lower_blocks: bool = typer.Option(True, "--share-lower-blocks/--no-share-lower-blocks",
                                            help="methods that leave the decoder's lower blocks unchanged over x "
                                                 "start from their output, computed once per input"),
):
    """Perplexity over target tokens (and option accuracy) of D(x), D(K,x), D(E(K,x)+x), oracle, with knowledge-swap controls."""  # noqa: E501 - one line: it is the command's help summary
    from kcache.evaluate import evaluate, markdown_report, write_report
    from kcache.models import load_decoder

    if methods is None:
        names = ["x", "kx"] + (["ekx"] if encoders is not None else []) + (["oracle"] if cache is not None else [])
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
    with errors():
        ensure_writable_dir(out, "report directory")  # before the evaluation, not after it
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        res = evaluate(decoder, samples, encoders, names, cache=cache, split=split or None, limit=limit,
                       token_budget=token_budget, max_length=max_length, progress=True, controls=controls,
                       share_lower_blocks=share_lower_blocks)
        paths = write_report(res, out)
    typer.echo(markdown_report(res))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
