"""``kcache bench inject|extract|fit|store``: thin layers over :mod:`kcache.bench`."""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.bench.storage import DEFAULT_OPTIONS
from kcache.cli._options import DEVICE_HELP, MODEL_HELP
from kcache.cli.errors import errors

HELP = "Benchmarks: time and memory of the stages."


def inject_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    sizes: str = typer.Option("64,128,256,512,1024", "--sizes", help="knowledge lengths in tokens"),
    input_tokens: int = typer.Option(32, "--input-tokens", help="fixed input length |x|"),
    layers: str = typer.Option("3-8", "--layers", help="encoder layers (fresh encoders; ignored with --encoders)"),
    encoders: Path = typer.Option(None, "--encoders", help="time a trained encoder bundle instead of fresh encoders"),
    repeats: int = typer.Option(5, "--repeats", help="timed runs per size and method (median reported)"),
    threads: int = typer.Option(None, "--threads", help="torch intra-op CPU threads (default: torch's choice)"),
    out: Path = typer.Option(Path("bench-results/inject"), "--out", "-o",
                             help="directory for bench-inject.json / .png"),
):
    """D(E(K,x)+x) vs D(K,x): time and peak memory as the knowledge grows, ratios side by side."""
    from kcache.bench.inject import bench_inject
    from kcache.models import load_decoder

    with errors():
        decoder = load_decoder(model, device=device)
        stack = None
        if encoders is not None:
            from kcache.inject import Injector

            stack = Injector.from_bundle(decoder, encoders).stack
        size_list = tuple(int(s) for s in sizes.split(",") if s.strip())
    bench_inject(decoder, sizes=size_list, input_tokens=input_tokens, layers=layers, stack=stack, repeats=repeats,
                 threads=threads, out=out, echo=typer.echo)


def extract_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m"),
    n: int = typer.Option(300, "--samples", help="synthetic samples to extract"),
    layers: str = typer.Option("3-8", "--layers"),
    site: str = typer.Option("block", "--site"),
    token_budget: int = typer.Option(8192, "--token-budget"),
    repeats: int = typer.Option(1, "--repeats", help="take the best of this many runs"),
    device: str = typer.Option(None, "--device"),
    model_dtype: str = typer.Option(None, "--model-dtype",
                                    help="decoder dtype; a comma-separated list (e.g. auto,float32) runs each "
                                         "side by side and compares the whole extraction of the first and last"),
    out: Path = typer.Option(Path("bench/extract.json"), "--out", help="JSON result; a PNG is written beside it"),
):
    """Stage one: full-depth extraction vs kcache vs bare truncated passes, one run, same samples."""
    from kcache.bench.stages import bench_extract, bench_extract_dtypes

    dtypes = tuple(d.strip() for d in (model_dtype or "").split(",") if d.strip())
    if len(dtypes) > 1:
        bench_extract_dtypes(model, dtypes, n, layers, site, token_budget, device, out, repeats, log=typer.echo)
    else:
        bench_extract(model, n, layers, site, token_budget, device, model_dtype, out, repeats, log=typer.echo)


def fit_cmd(
    cache: Path = typer.Option(..., "--cache", "-c"),
    steps: int = typer.Option(60, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option(None, "--device"),
    compute: str = typer.Option("float32,auto", "--compute",
                                help="compute precisions to run side by side (first = baseline)"),
    out: Path = typer.Option(Path("bench/fit.json"), "--out"),
    sources: str = typer.Option("local,local-verify,http,pulled", "--sources",
                                help="read the cache also as: local-verify (sha256 on the fly), http (loopback, "
                                     "streamed and verified), pulled (kcache pull first); '' for none"),
    stream_buffer_mb: int = typer.Option(512, "--stream-buffer-mb", help="verified-file buffer of the streamed reads"),
):
    """Stage two: cache loader throughput vs training throughput per compute precision, time waiting for data;
    loader MB/s and data wait with the cache read locally, verified, over loopback HTTP and pulled."""
    from kcache.bench.stages import bench_fit

    bench_fit(cache, steps, batch_size, device, out, log=typer.echo,
              computes=tuple(c.strip() for c in compute.split(",") if c.strip()),
              sources=tuple(s.strip() for s in sources.split(",") if s.strip()), stream_buffer_mb=stream_buffer_mb)


def finetune_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m"),
    n: int = typer.Option(240, "--samples", help="synthetic samples (80 % train)"),
    steps: int = typer.Option(12, "--steps", help="finetune steps per run (the first and last are not timed)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="bundle to start from (default: fresh encoders)"),
    layers: str = typer.Option("3-8", "--layers", help="injected layers (fresh encoders)"),
    model_dtype: str = typer.Option("float32,auto", "--model-dtype",
                                    help="decoder dtypes to run side by side (first = baseline; auto = the default)"),
    device: str = typer.Option(None, "--device"),
    out: Path = typer.Option(Path("bench/finetune.json"), "--out"),
):
    """Stage three: finetune seconds per step with the decoder in each dtype, validation NLL after the same steps."""
    from kcache.bench.stages import bench_finetune

    bench_finetune(model, n, steps, batch_size, encoders, layers,
                   tuple(d.strip() for d in model_dtype.split(",") if d.strip()), device, out, log=typer.echo)


def store_cmd(
    cache: Path = typer.Option(..., "--cache", "-c", help="a complete kcache cache"),
    rows: int = typer.Option(200_000, "--rows", help="first N rows of each layer"),
    options: str = typer.Option(",".join(DEFAULT_OPTIONS), "--options", help="comma-separated storage specs"),
    repeats: int = typer.Option(3, "--repeats", help="times are the median of this many runs"),
    out_json: Path = typer.Option(Path("docs/bench/store.json"), "--json"),
    out_png: Path = typer.Option(Path("docs/bench/store.png"), "--png"),
    tmp_dir: Path = typer.Option(None, "--tmp-dir", help="scratch directory for the written arrays"),
):
    """Lossless vs bit-rounded vs int8 storage: bytes per token-layer, MB/s, error vs the cache."""
    from kcache.bench.storage import bench_store

    bench_store(cache, rows, tuple(o.strip() for o in options.split(",") if o.strip()), out_json, out_png,
                repeats=repeats, tmp_dir=tmp_dir, log=typer.echo)
