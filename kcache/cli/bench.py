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
    out_json: Path = typer.Option(None, "--json",
                                  help="default docs/bench/store.json (store-downstream.json with --downstream)"),
    out_png: Path = typer.Option(None, "--png", help="default: the --json path with .png"),
    tmp_dir: Path = typer.Option(None, "--tmp-dir", help="scratch directory for the written arrays"),
    downstream: bool = typer.Option(False, "--downstream",
                                    help="also fit encoders on each option and compare validation FVU and D(E+x) "
                                         "perplexity with lossless (needs --samples and the decoder)"),
    samples: Path = typer.Option(None, "--samples", help="the samples the cache was extracted from (--downstream)"),
    model: str = typer.Option(None, "--model", "-m", help="decoder (default: the model the cache names)"),
    model_dtype: str = typer.Option(None, "--model-dtype", help="decoder dtype (default: auto)"),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    steps: int = typer.Option(60, "--steps", help="fit steps per option (same seed and batches for all)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    test_samples: int = typer.Option(40, "--test-samples", help="held-out samples scored for perplexity"),
    max_ppl_change: str = typer.Option("1%", "--max-ppl-change",
                                       help="tolerance on the perplexity change vs lossless: 1% or 0.01"),
    judge: str = typer.Option("ekx", "--judge", help="perplexities that must stay within it: ekx, oracle or both "
                                                       "(ekx,oracle)"),
    compute: str = typer.Option("auto", "--compute", help="fit compute precision"),
    seed: int = typer.Option(0, "--seed"),
    seed_control: bool = typer.Option(False, "--seed-control",
                                      help="also fit lossless with seed + 1: how much a rerun moves the figures"),
):
    """Lossless vs bit-rounded vs int8 storage: bytes per token-layer, MB/s, error vs the cache; with
    --downstream also validation FVU after a short fit and D(E+x) perplexity vs lossless, and the
    cheapest option within --max-ppl-change."""
    specs = tuple(o.strip() for o in options.split(",") if o.strip())
    if not downstream:
        from kcache.bench.storage import bench_store

        out_json = out_json or Path("docs/bench/store.json")
        bench_store(cache, rows, specs, out_json, out_png or out_json.with_suffix(".png"), repeats=repeats,
                    tmp_dir=tmp_dir, log=typer.echo)
        return
    from kcache.bench.downstream import DownstreamConfig, bench_store_downstream, parse_tolerance

    with errors():  # bad values are reported before the cache or the decoder is opened
        cfg = DownstreamConfig(steps=steps, batch_size=batch_size, test_samples=test_samples,
                               max_ppl_change=parse_tolerance(max_ppl_change),
                               judge=tuple(j.strip() for j in judge.split(",") if j.strip()), seed=seed,
                               compute=compute, device=device, seed_control=seed_control)
        if samples is None:
            raise ValueError("--downstream needs --samples: the samples file the cache was extracted from")
        out_json = out_json or Path("docs/bench/store-downstream.json")
        bench_store_downstream(cache, samples, model=model, model_dtype=model_dtype, options=specs, rows=rows,
                               repeats=repeats, cfg=cfg, out_json=out_json,
                               out_png=out_png or out_json.with_suffix(".png"), tmp_dir=tmp_dir, log=typer.echo)
