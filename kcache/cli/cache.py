"""Stage one and the cache itself: ``extract``, ``inspect``, ``validate``, ``merge``, ``finalize``, ``pull``,
``push``.

Thin layers over :mod:`kcache.extract` and :mod:`kcache.cache` (reader, integrity, merge, subset, remote, publish).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.cli._options import DeviceOpt, DtypeOpt, ModelOpt
from kcache.cli.errors import EXIT_ENVIRONMENT, EXIT_INVALID, errors, exit_code, fail, message


def extract_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="samples .parquet or .jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="cache directory (zarr v3)"),
    model: str = ModelOpt,
    layers: str = typer.Option("3-8", "--layers", help="0-based blocks: 3-8, 3,5,7 or all"),
    site: str = typer.Option("block", "--site",
                             help="block (block output = residual stream; default, see docs/training.md) or mlp (MLP "
                                  "output before the residual add; the paper's)"),
    max_length: int = typer.Option(1024, "--max-length",
                                   help="bound on len(k_ids + x_ids); knowledge is cut, never the input"),
    dtype: str = typer.Option("float16", "--dtype", help="storage dtype: float16 | bfloat16 | float32"),
    template: str = typer.Option("Imagine that { <knowledge> } ", "--template"),
    separator: str = typer.Option(" [SEP] ", "--separator"),
    template_end: str = typer.Option("eos", "--template-end", help="eos | none: token closing the knowledge prefix"),
    skip_bos: bool = typer.Option(False, "--skip-bos", help="leave a leading BOS out of the loss mask"),
    token_budget: int = typer.Option(8192, "--token-budget", help="padded tokens per pass-B batch"),
    chunk_rows: int = typer.Option(None, "--chunk-rows", help="rows per zarr chunk (default: ~2 MiB)"),
    shard_rows: int = typer.Option(None, "--shard-rows",
                                   help="rows per shard, a multiple of --chunk-rows (default: 8 chunks)"),
    device: str = DeviceOpt,
    model_dtype: str = DtypeOpt,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="replace an unfinished cache made with other settings (finalized caches are "
                                        "never replaced)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    storage: str = typer.Option("lossless", "--storage",
                                help="lossless | bitround:N (keep N of float16's 10 mantissa bits) | int8 (per-row "
                                     "scale); lossy error is measured and recorded"),
    distributed: bool = typer.Option(False, "--distributed",
                                     help="one rank of a torchrun/SLURM launch (implied when WORLD_SIZE > 1)"),
    targets: str = typer.Option("cascade", "--targets",
                                help="cascade (each layer given the ones below already injected) | independent (the "
                                     "paper's, each against the clean pass) | distilled (cascade refined by KL to "
                                     "D(K,x); full-depth passes)"),
    sink: int = typer.Option(1, "--sink",
                             help="leading input positions never written (x's first token is D(x)'s attention sink); 0 "
                                  "writes every position"),
    distill_steps: int = typer.Option(8, "--distill-steps",
                                      help="--targets distilled: Adam steps on the deltas per batch"),
    distill_lr: float = typer.Option(0.05, "--distill-lr",
                                     help="--targets distilled: learning rate, times each layer's delta RMS"),
    elastic: bool = typer.Option(False, "--elastic",
                                 help="be one worker of an elastic extraction: any number of workers (torchrun ranks, "
                                      "a SLURM array, processes on machines sharing the filesystem), started or "
                                      "stopped any time, fill --out unit by unit; same bytes whatever their number"),
    unit_tokens: int = typer.Option(None, "--unit-tokens",
                                    help="--elastic: padded tokens (both passes) per work unit (default 262144)"),
    lease_stale: float = typer.Option(None, "--lease-stale",
                                      help="--elastic: seconds without a heartbeat after which another worker takes a "
                                           "unit over (default 600; a dead worker on the same host at once)"),
):
    """Stage one: run the frozen decoder twice per sample and cache the per-layer differences.

    Under torchrun (``torchrun --nproc-per-node N -m kcache extract ...``) each rank writes its
    own part and rank 0 writes the manifest that joins them. With ``--elastic`` every process is
    an independent worker instead (docs/sharing.md, "Extracting on many processes").
    """
    from kcache import distributed as dist
    from kcache.extract import ExtractConfig, extract
    from kcache.models import load_decoder

    rank, world, local = dist.dist_env()
    if distributed and world == 1:
        fail("--distributed needs a launcher that sets RANK/WORLD_SIZE (torchrun, srun)")
    if distributed and elastic:
        fail("--elastic and --distributed exclude each other: elastic workers need no process group")
    ecfg = _elastic_config(elastic, unit_tokens, lease_stale)
    if world > 1:
        if ecfg is None:
            dist.init()  # elastic workers never talk to each other: no process group
        if device is None:
            import torch

            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"

    cfg = ExtractConfig(layers=layers, site=site, template=template, separator=separator, template_end=template_end,
                        max_length=max_length, dtype=dtype, skip_bos=skip_bos, token_budget=token_budget,
                        chunk_rows=chunk_rows, shard_rows=shard_rows, storage=storage, targets=targets, sink=sink,
                        distill_steps=distill_steps, distill_lr=distill_lr)
    with errors():
        decoder = load_decoder(model, device=device, dtype=model_dtype, trust_remote_code=trust_remote_code)
        report = extract(decoder, samples, out, cfg, overwrite=overwrite, progress=rank == 0, rank=rank, world=world,
                         elastic=ecfg)
    for line in report.lines():
        typer.echo(f"[rank {rank}/{world}] {line}" if world > 1 else line)


def _elastic_config(elastic: bool, unit_tokens: int | None, lease_stale: float | None):
    """The ``ElasticConfig`` of ``--elastic`` (None without it; its options alone are refused)."""
    if not elastic:
        if unit_tokens is not None or lease_stale is not None:
            fail("--unit-tokens and --lease-stale only apply with --elastic")
        return None
    from kcache.elastic import ElasticConfig

    ecfg = ElasticConfig()
    if unit_tokens is not None:
        ecfg.unit_tokens = unit_tokens
    if lease_stale is not None:
        if lease_stale <= 0:
            fail(f"--lease-stale must be > 0 seconds, not {lease_stale}")
        ecfg.stale_s = lease_stale
    return ecfg


def inspect_cmd(cache: str = typer.Argument(..., help="cache directory or URL"),
                card: bool = typer.Option(False, "--card", help="print the cache card")):
    """Summarise a cache: settings, counts, per-layer statistics."""
    from kcache.cache.reader import Cache

    if _elastic_in_progress(cache):
        return
    with errors():
        c = Cache.open(cache, require_complete=False)
    a, s = c.attrs, c.settings
    made = f" on {a['created']}" if a.get("created") else ""
    typer.echo(f"{cache}: kcache cache v{a['schema_version']} ({a['status']}), "
               f"written by kcache {a['kcache_version']}{made}")
    typer.echo(f"model      {s['model'].get('name', '')} {s['model']['architecture']} weights "
               f"{s['model']['weights_hash'][:19]}")
    typer.echo(f"site       {s['site']}   layers {','.join(map(str, s['layers']))}   dtype {s['dtype']}   "
               f"max_length {s['max_length']}")
    typer.echo(f"template   {s['template']['template']!r} separator {s['template']['separator']!r} "
               f"end {s['template']['end']}")
    typer.echo(_storage_line(c))
    typer.echo(_extraction_line(a.get("extraction") or {}))
    if c.manifest is not None:
        typer.echo(f"parts      {len(c.parts)}, finalized (immutable), metadata {c.manifest['metadata_digest'][:23]}…")
        sub = (c.manifest.get("provenance") or {}).get("subset")
        if sub:
            typer.echo(f"subset     of {sub['source']} (manifest {sub['source_manifest_sha256'][:23]}…): layers "
                       f"{','.join(map(str, sub['layers']))}, split {sub.get('split') or 'all'}, "
                       f"{sub['samples']} of {sub.get('source_samples', '?')} samples")
    else:
        typer.echo(f"parts      {len(c.parts)}, not finalized (no manifest.json)")
    cnt = a["counts"]
    typer.echo(f"samples    {cnt['samples']} of {cnt['samples_in']} ({cnt['skipped']} skipped "
               f"{cnt.get('skip_reasons', {})}, {cnt['truncated']} truncated)")
    typer.echo(f"tokens     {cnt['input_tokens']} input, {cnt['encoder_tokens']} encoder, "
               f"{cnt.get('target_tokens', 0)} target")
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
    return (f"extracted  torch {ex.get('torch', '?')} on {ex.get('device', '?')}, "
            f"{ex.get('model_dtype', '?')} weights, "
            + (f"{threads} thread(s)" if threads is not None else "thread count not recorded")
            + f", {ex.get('batches', '?')} batches" + (f", {world} ranks" if world > 1 else "")
            + (f", elastic: {ex['units']} units" if ex.get("units") else "")
            + " (bit-identical re-extraction needs the same torch, device and thread count)")


def _elastic_in_progress(cache: str) -> bool:
    """Print where an unfinished elastic extraction stands; False when ``cache`` is not one."""
    from kcache.elastic import elastic_progress

    if "://" in cache:
        return False
    with errors():
        p = elastic_progress(cache)
    if p is None:
        return False
    typer.echo(f"{cache}: elastic extraction in progress: {p['committed']} of {p['units']} units committed, "
               f"{len(p['leases'])} lease(s)")
    for lease in p["leases"]:
        typer.echo(f"  unit {lease['unit']}: {lease['owner']}, heartbeat {lease['heartbeat_age_s']} s ago")
    return True


def _storage_line(c) -> str:
    st = c.storage
    if st["kind"] == "lossless":
        return f"storage    lossless {c.dtype}"
    err = c.attrs.get("storage_error", {})
    per = ", ".join(f"{l}: {e['relative_rmse']:.3%}" for l, e in sorted(err.items(), key=lambda kv: int(kv[0])))
    kind = st["kind"] + (f":{st['keepbits']}" if "keepbits" in st else "")
    return f"storage    LOSSY {kind}; relative RMS error per layer {per or 'not recorded'}"


def validate_cmd(cache: str = typer.Argument(..., help="cache directory or URL (http(s)://, s3://, gs://, hf://, memory://)")):
    """Check a cache end to end (digests, structure, every value); exit 1 naming each problem."""
    from kcache.cache.integrity import validate_cache

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


def merge_cmd(
    caches: list[str] = typer.Argument(...,
                                       help="two or more caches (directories or URLs) from the same model, site and "
                                            "template"),
    out: Path = typer.Option(..., "--out", "-o", help="new cache directory"),
    keep_first: bool = typer.Option(False, "--keep-first",
                                    help="a sample id in several caches keeps its first copy (default: error)"),
):
    """Combine caches extracted by different teams into one finalized cache."""
    from kcache.cache.merge import merge

    with errors():
        m = merge(caches, out, keep_first=keep_first)
    ex = m["provenance"]["merged"]["excluded_duplicates"]
    typer.echo(f"{out}: {len(m['parts'])} parts, {sum(p['samples'] for p in m['parts']) - ex} samples"
               + (f" ({ex} duplicate(s) hidden, first copy kept)" if ex
                  else "") + f"; metadata {m['metadata_digest'][:19]}")


def finalize_cmd(cache: Path = typer.Argument(..., help="a complete cache written before manifests existed")):
    """Write the manifest (digests) of a complete cache and make it read-only."""
    from kcache.cache.integrity import finalize
    from kcache.cache.reader import Cache
    from kcache.elastic import elastic_progress

    with errors():
        p = elastic_progress(cache)
        if p is not None:
            fail(f"{cache} is an elastic extraction in progress ({p['committed']} of {p['units']} units committed): "
                 "the worker that commits the last unit finalizes it; rerun `kcache extract --elastic` with the same "
                 "settings to finish it")
        Cache.open(cache)
        m = finalize(cache, provenance={"finalized_later": True})
    typer.echo(f"{cache}: finalized, {sum(len(p['files']) for p in m['parts'])} files, "
               f"metadata {m['metadata_digest'][:19]}")


def pull_cmd(
    url: str = typer.Argument(..., help="finalized cache: http(s)://, s3://, gs://, hf://, ... or a local path"),
    dest: Path = typer.Argument(..., help="local directory to pull into (rerun to resume)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    layers: str = typer.Option(None, "--layers",
                               help="partial pull: only these layers (3,4 or 3-5), as a new smaller finalized cache"),
    split: str = typer.Option(None, "--split", help="partial pull: only samples of this split"),
    limit_samples: int = typer.Option(None, "--limit-samples",
                                      help="partial pull: only the first N samples (of --split), in the cache's "
                                           "order (shortest first)"),
):
    """Download a finalized cache, verifying every file against its manifest; resumes where it stopped.

    With --layers, --split or --limit-samples: a partial pull, written as a new, smaller, finalized
    cache whose manifest records the source URL and manifest digest.
    """
    from kcache.cache.remote import pull, summary_line

    with errors():
        chosen = _layer_list(layers) if layers is not None else None
        report = pull(url, dest, progress=not quiet, layers=chosen, split=split, limit_samples=limit_samples)
    if "state" in report:  # a partial pull
        typer.echo(f"{url} -> {dest}: {report['state']}; {report['samples']} samples, layers "
                   f"{','.join(map(str, report['layers']))}, {report['rows']} rows, {report['files']} files, "
                   f"{report['bytes']:,} bytes in {report['seconds']:.1f} s")
        return
    typer.echo(summary_line(url, dest, report))


def _layer_list(spec: str) -> list[int] | None:
    """``3,4`` / ``3-5`` -> layer indices (``all`` -> None: every layer)."""
    if spec.strip().lower() == "all":
        return None
    from kcache.align import parse_layers

    return parse_layers(spec, 1 << 20)  # the bound is checked against the cache's layers by the pull


def push_cmd(
    cache: Path = typer.Argument(..., help="finalized local cache"),
    url: str = typer.Argument(..., help="destination: s3://bucket/path, gs://..., hf://datasets/ORG/NAME, "
                                        "memory://, file:// or a local path (rerun to resume)"),
    license: str = typer.Option("other", "--license",
                                help="license of the published cache, for the dataset card (Hugging Face ids: "
                                     "cc-by-4.0, mit, ...; other = not stated)"),
    dataset_license: list[str] = typer.Option(None, "--dataset-license",
                                              help="NAME=LICENSE of a source dataset, for the card (repeatable; "
                                                   "others are 'unknown')"),
    no_readback: bool = typer.Option(False, "--no-readback",
                                     help="check uploaded files by size only (default: read each back and hash it)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
):
    """Publish a finalized cache to any fsspec URL: files verified, dataset card, manifest.json last; resumable."""
    from kcache.cache.publish import push, summary_line

    licenses = {}
    for item in dataset_license or []:
        name, sep, lic = item.partition("=")
        if not sep or not name or not lic:
            fail(f"--dataset-license {item!r}: expected NAME=LICENSE, e.g. dream=unknown")
        licenses[name] = lic
    with errors():
        report = push(cache, url, license=license, dataset_licenses=licenses, readback=not no_readback,
                      progress=not quiet)
    for w in report["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(summary_line(cache, report))
