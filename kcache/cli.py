"""The ``kcache`` command line. Each command is a thin layer over a function in the module named
after its stage (extract, fit, inject, evaluate, data, kg)."""

from __future__ import annotations

from pathlib import Path

import typer

from kcache import __version__
from kcache.cli_errors import EXIT_ENVIRONMENT, EXIT_INVALID, KCacheGroup, ensure_writable_dir, errors, exit_code, fail, message
from kcache.data.cli import app as data_app
from kcache.kg.cli import app as kg_app

app = typer.Typer(
    help="kcache: inject external knowledge into a frozen decoder (DIEKÆ), cache-first.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=KCacheGroup,  # every command runs inside kcache.cli_errors.errors(): one error line and exit code per kind
)
app.add_typer(data_app, name="data")
app.add_typer(kg_app, name="kg", help="Knowledge graphs as Arrow tables: import, embed, link entities.")


def _version(value: bool):
    if value:
        typer.echo(f"kcache {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
    threads: int = typer.Option(None, "--threads", envvar="KCACHE_THREADS", help="torch CPU threads for any command (default: torch's; a warning when more than the free cores)"),
):
    """kcache command line."""
    from kcache.runtime import set_threads

    set_threads(threads, warn=lambda m: typer.echo(f"warning: {m}", err=True))


ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="hub id, local HF directory, .gguf file, or smollm2-135m")
DeviceOpt = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default: cuda when available)")
DtypeOpt = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu)")


@app.command("extract")
def extract_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="samples .parquet or .jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="cache directory (zarr v3)"),
    model: str = ModelOpt,
    layers: str = typer.Option("3-8", "--layers", help="0-based blocks: 3-8, 3,5,7 or all"),
    site: str = typer.Option("block", "--site", help="block (block output = residual stream; default, see docs/training.md) or mlp (MLP output before the residual add; the paper's)"),
    max_length: int = typer.Option(1024, "--max-length", help="bound on len(k_ids + x_ids); knowledge is cut, never the input"),
    dtype: str = typer.Option("float16", "--dtype", help="storage dtype: float16 | bfloat16 | float32"),
    template: str = typer.Option("Imagine that { <knowledge> } ", "--template"),
    separator: str = typer.Option(" [SEP] ", "--separator"),
    template_end: str = typer.Option("eos", "--template-end", help="eos | none: token closing the knowledge prefix"),
    skip_bos: bool = typer.Option(False, "--skip-bos", help="leave a leading BOS out of the loss mask"),
    token_budget: int = typer.Option(8192, "--token-budget", help="padded tokens per pass-B batch"),
    chunk_rows: int = typer.Option(None, "--chunk-rows", help="rows per zarr chunk (default: ~2 MiB)"),
    shard_rows: int = typer.Option(None, "--shard-rows", help="rows per shard, a multiple of --chunk-rows (default: 8 chunks)"),
    device: str = DeviceOpt,
    model_dtype: str = DtypeOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an unfinished cache made with other settings (finalized caches are never replaced)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    storage: str = typer.Option("lossless", "--storage", help="lossless | bitround:N (keep N of float16's 10 mantissa bits) | int8 (per-row scale); lossy error is measured and recorded"),
    distributed: bool = typer.Option(False, "--distributed", help="one rank of a torchrun/SLURM launch (implied when WORLD_SIZE > 1)"),
    targets: str = typer.Option("cascade", "--targets", help="cascade (each layer given the ones below already injected) | independent (the paper's, each against the clean pass) | distilled (cascade refined by KL to D(K,x); full-depth passes)"),
    sink: int = typer.Option(1, "--sink", help="leading input positions never written (x's first token is D(x)'s attention sink); 0 writes every position"),
    distill_steps: int = typer.Option(8, "--distill-steps", help="--targets distilled: Adam steps on the deltas per batch"),
    distill_lr: float = typer.Option(0.05, "--distill-lr", help="--targets distilled: learning rate, times each layer's delta RMS"),
):
    """Stage one: run the frozen decoder twice per sample and cache the per-layer differences.

    Under torchrun (``torchrun --nproc-per-node N -m kcache extract ...``) each rank writes its
    own part and rank 0 writes the manifest that joins them.
    """
    from kcache import distributed as dist
    from kcache.extract import ExtractConfig, extract
    from kcache.models import load_decoder

    rank, world, local = dist.dist_env()
    if distributed and world == 1:
        fail("--distributed needs a launcher that sets RANK/WORLD_SIZE (torchrun, srun)")
    if world > 1:
        dist.init()
        if device is None:
            import torch

            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"

    cfg = ExtractConfig(layers=layers, site=site, template=template, separator=separator, template_end=template_end,
                        max_length=max_length, dtype=dtype, skip_bos=skip_bos, token_budget=token_budget,
                        chunk_rows=chunk_rows, shard_rows=shard_rows, storage=storage, targets=targets, sink=sink,
                        distill_steps=distill_steps, distill_lr=distill_lr)
    with errors():
        decoder = load_decoder(model, device=device, dtype=model_dtype, trust_remote_code=trust_remote_code)
        report = extract(decoder, samples, out, cfg, overwrite=overwrite, progress=rank == 0, rank=rank, world=world)
    for line in report.lines():
        typer.echo(f"[rank {rank}/{world}] {line}" if world > 1 else line)


@app.command("inspect")
def inspect_cmd(cache: str = typer.Argument(..., help="cache directory or URL"), card: bool = typer.Option(False, "--card", help="print the cache card")):
    """Summarise a cache: settings, counts, per-layer statistics."""
    from kcache.cache import Cache

    with errors():
        c = Cache.open(cache, require_complete=False)
    a, s = c.attrs, c.settings
    typer.echo(f"{cache}: kcache cache v{a['schema_version']} ({a['status']}), written by kcache {a['kcache_version']} on {a['created']}")
    typer.echo(f"model      {s['model'].get('name', '')} {s['model']['architecture']} weights {s['model']['weights_hash'][:19]}")
    typer.echo(f"site       {s['site']}   layers {','.join(map(str, s['layers']))}   dtype {s['dtype']}   max_length {s['max_length']}")
    typer.echo(f"template   {s['template']['template']!r} separator {s['template']['separator']!r} end {s['template']['end']}")
    typer.echo(_storage_line(c))
    typer.echo(_extraction_line(a.get("extraction") or {}))
    if c.manifest is not None:
        typer.echo(f"parts      {len(c.parts)}, finalized (immutable), metadata {c.manifest['metadata_digest'][:23]}…")
    else:
        typer.echo(f"parts      {len(c.parts)}, not finalized (no manifest.json)")
    cnt = a["counts"]
    typer.echo(f"samples    {cnt['samples']} of {cnt['samples_in']} ({cnt['skipped']} skipped {cnt.get('skip_reasons', {})}, {cnt['truncated']} truncated)")
    typer.echo(f"tokens     {cnt['input_tokens']} input, {cnt['encoder_tokens']} encoder, {cnt.get('target_tokens', 0)} target")
    splits = {}
    for sp in c.index["split"].to_pylist():
        splits[sp] = splits.get(sp, 0) + 1
    typer.echo("splits     " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    if a.get("stats"):
        typer.echo("layer        mean        std        rms   |delta| at positions 0,1,2,3")
        for l, st in sorted(a["stats"].items(), key=lambda kv: int(kv[0])):
            pn = " ".join(f"{x:.3g}" for x in st.get("position_norms", [])[:4])
            typer.echo(f"{int(l):5d} {st['mean']:11.4g} {st['std']:10.4g} {st['rms']:10.4g}   {pn}")
    if card:
        typer.echo("")
        typer.echo(c.card())


def _extraction_line(ex: dict) -> str:
    """How the deltas were computed: what a bit-identical re-extraction must match (docs/cache-format.md)."""
    threads = ex.get("threads")
    world = (ex.get("rank") or {}).get("world", 1)
    return (f"extracted  torch {ex.get('torch', '?')} on {ex.get('device', '?')}, {ex.get('model_dtype', '?')} weights, "
            + (f"{threads} thread(s)" if threads is not None else "thread count not recorded")
            + f", {ex.get('batches', '?')} batches" + (f", {world} ranks" if world > 1 else "")
            + " (bit-identical re-extraction needs the same torch, device and thread count)")


def _storage_line(c) -> str:
    st = c.storage
    if st["kind"] == "lossless":
        return f"storage    lossless {c.dtype}"
    err = c.attrs.get("storage_error", {})
    per = ", ".join(f"{l}: {e['relative_rmse']:.3%}" for l, e in sorted(err.items(), key=lambda kv: int(kv[0])))
    kind = st["kind"] + (f":{st['keepbits']}" if "keepbits" in st else "")
    return f"storage    LOSSY {kind}; relative RMS error per layer {per or 'not recorded'}"


@app.command("validate")
def validate_cmd(cache: str = typer.Argument(..., help="cache directory or URL (http(s)://, s3://, gs://, hf://, memory://)")):
    """Check a cache end to end (digests, structure, every value); exit 1 naming each problem."""
    from kcache.integrity import validate_cache

    try:
        problems = validate_cache(cache, progress=True)
    except Exception as e:  # noqa: BLE001 - a dropped connection, a vanished file: say what stopped, then the usual line
        if exit_code(e) != EXIT_ENVIRONMENT:
            raise
        fail(f"validating {cache} stopped before the end, no verdict on the cache: {message(e)}", EXIT_ENVIRONMENT)
    if problems:
        for p in problems:
            typer.echo(f"invalid: {p}", err=True)
        raise typer.Exit(EXIT_INVALID)
    typer.echo(f"{cache}: valid")


@app.command("fit-encoders")
def fit_cmd(
    cache: str = typer.Option(..., "--cache", "-c", help="stage-one cache directory or URL"),
    out: Path = typer.Option(..., "--out", "-o", help="encoder bundle directory (resumes if a checkpoint is there)"),
    layers: str = typer.Option(None, "--layers", help="subset of the cached layers (default: all)"),
    epochs: int = typer.Option(3, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size", help="samples per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr_max: float = typer.Option(1e-4, "--lr", help="peak learning rate (warm-up from --lr-min, cosine back to it)"),
    lr_min: float = typer.Option(1e-5, "--lr-min"),
    hidden_size: int = typer.Option(128, "--hidden-size"),
    num_layers: int = typer.Option(4, "--encoder-layers"),
    num_heads: int = typer.Option(4, "--heads"),
    intermediate_size: int = typer.Option(512, "--intermediate-size"),
    eval_every: int = typer.Option(50, "--eval-every", help="optimizer steps between validations"),
    patience: int = typer.Option(5, "--patience", help="validations without improvement before stopping"),
    buffer_samples: int = typer.Option(2048, "--buffer-samples", help="shuffling buffer size (bounds memory)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    max_steps: int = typer.Option(None, "--max-steps"),
    parallel: str = typer.Option("layers", "--parallel", help="under torchrun/SLURM: 'layers' = each process trains its share of the layers"),
):
    """Stage two: train one encoder per cached layer from the cache alone (no decoder needed).

    Under torchrun (``torchrun --nproc-per-node N -m kcache fit-encoders ...``) process r trains
    layers[r::N]; the bundle is the same as a single process would write.
    """
    from kcache.align import parse_layers
    from kcache.fit import FitConfig, fit_encoders, summary_table
    from kcache.cache import Cache

    with errors():
        ensure_writable_dir(out, "encoder bundle directory")  # before any training
        lay = parse_layers(layers, 10**6) if layers else None
        cfg = FitConfig(layers=lay, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr_max=lr_max, lr_min=lr_min,
                        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
                        eval_every=eval_every, patience=patience, buffer_samples=buffer_samples, seed=seed, device=device, max_steps=max_steps,
                        parallel=parallel)
        Cache.open(cache)
        summary = fit_encoders(cache, out, cfg)
    from kcache import distributed

    if not distributed.is_main():
        return
    typer.echo(summary_table(summary))
    typer.echo(f"best step {summary['best_step']} of {summary['steps']} ({summary['stopped']}); {summary['wall_seconds']:.0f} s, "
               f"{summary['data_wait_seconds'] / max(summary['wall_seconds'], 1e-9):.1%} waiting for data")
    typer.echo(f"bundle: {out}/ (config.json, encoders.safetensors); curves: {out}/curves.png")


@app.command("merge")
def merge_cmd(
    caches: list[str] = typer.Argument(..., help="two or more caches (directories or URLs) from the same model, site and template"),
    out: Path = typer.Option(..., "--out", "-o", help="new cache directory"),
    keep_first: bool = typer.Option(False, "--keep-first", help="a sample id in several caches keeps its first copy (default: error)"),
):
    """Combine caches extracted by different teams into one finalized cache."""
    from kcache.merge import merge

    with errors():
        m = merge(caches, out, keep_first=keep_first)
    ex = m["provenance"]["merged"]["excluded_duplicates"]
    typer.echo(f"{out}: {len(m['parts'])} parts, {sum(p['samples'] for p in m['parts']) - ex} samples"
               + (f" ({ex} duplicate(s) hidden, first copy kept)" if ex else "") + f"; metadata {m['metadata_digest'][:19]}")


@app.command("finalize")
def finalize_cmd(cache: Path = typer.Argument(..., help="a complete cache written before manifests existed")):
    """Write the manifest (digests) of a complete cache and make it read-only."""
    from kcache.cache import Cache
    from kcache.integrity import finalize

    with errors():
        Cache.open(cache)
        m = finalize(cache, provenance={"finalized_later": True})
    typer.echo(f"{cache}: finalized, {sum(len(p['files']) for p in m['parts'])} files, metadata {m['metadata_digest'][:19]}")


@app.command("run")
def run_cmd(config: Path = typer.Argument(..., help="pipeline config, e.g. pipelines/demo.toml")):
    """Run a whole pipeline recipe (data -> extract -> fit -> finetune -> evaluate), skipping finished stages."""
    from kcache.pipeline import run_pipeline

    with errors():
        run_pipeline(config, log=typer.echo)


def _register_stage_commands() -> None:
    # Stage-three commands and benchmarks live in their own modules; registered here so
    # `kcache --help` lists everything.
    from kcache import bench_cache
    from kcache.bench import bench_app
    from kcache.cli_baseline_eval import register as register_baseline_eval
    from kcache.cli_finetune import register as register_finetune
    from kcache.cli_methods import register as register_methods
    from kcache.cli_stage3 import register as register_stage3

    register_stage3(app)
    register_finetune(app)
    bench_cache.register(bench_app)
    _optional_register("kcache.bench_store", bench_app)
    _optional_register("kcache.remote", app)
    register_methods(app)
    register_baseline_eval(app)


def _optional_register(module: str, target) -> None:
    import importlib

    importlib.import_module(module).register(target)


_register_stage_commands()
