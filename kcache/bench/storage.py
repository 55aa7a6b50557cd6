"""``kcache bench store``: size, speed and error of each storage option on a real cache.

For every option (kcache/cache/lossy.py) and cached layer, the first ``rows`` rows are encoded and
written to a fresh zarr v3 array in a temporary directory with the cache's own chunk rows, shard
rows and codecs, then read back in full and decoded to float32. All options are measured in one
run on the same rows, so their ratios compare like with like; times are the median of
``repeats`` runs. Errors are against the values read from the cache (float32), so ``lossless``
is exact by construction when the cache's dtype is the storage dtype.

Conventions: "bytes per token-layer" is the total size of the files written for an option
divided by ``rows * layers``; MB/s are MiB of the float32 rows (``rows * hidden * 4``) per second
of encode+write or of read+decode.

The command is in ``kcache/cli/bench.py``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kcache.cache.lossy import (
    ErrorAccumulator,
    bits_per_value,
    decode_block,
    encode_block,
    parse_storage,
    storage_spec,
)
from kcache.cache.reader import Cache
from kcache.cache.writer import codecs_description, compressors_for_cache

DEFAULT_OPTIONS = ("lossless", "bitround:8", "bitround:6", "bitround:4", "int8")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _write(group, layer: int, ref: np.ndarray, storage: dict, dtype: str, chunk: int, shard: int, compressors) -> dict:
    """Create the option's arrays for one layer and write ``ref`` a shard at a time (as the
    extractor does: whole shards only). Returns the zarr arrays by name."""
    n, hidden = ref.shape
    first = encode_block(ref[: min(shard, n)], storage, dtype)
    arrays = {}
    for name, a in first.items():
        if a.ndim == 2:
            shape, chunks, shards = (n, hidden), (chunk, hidden), (shard, hidden)
        else:
            shape, chunks, shards = (n,), (chunk,), (shard,)
        arrays[name] = group.create_array(f"layer_{layer:02d}/{name}", shape=shape, chunks=chunks, shards=shards,
                                          dtype=a.dtype, compressors=compressors, fill_value=0, overwrite=True)
    for name, a in first.items():
        arrays[name][: len(a)] = a
    for start in range(shard, n, shard):
        for name, a in encode_block(ref[start : start + shard], storage, dtype).items():
            arrays[name][start : start + len(a)] = a
    return arrays


def _read(arrays: dict, storage: dict, dtype: str, n: int, hidden: int, shard: int) -> np.ndarray:
    out = np.empty((n, hidden), np.float32)
    for start in range(0, n, shard):
        out[start : start + shard] = decode_block({k: a[start : start + shard] for k, a in arrays.items()},
                                                  storage, dtype)
    return out


def _machine_info() -> dict:
    import numcodecs
    import zarr

    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "zarr": zarr.__version__, "numcodecs": numcodecs.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a kcache dependency
        info["torch"] = None
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    return info


def bench_store(cache_path, rows: int = 200_000, options=DEFAULT_OPTIONS, out_json=None, out_png=None,
                repeats: int = 3, tmp_dir=None, progress: bool = True, log=print) -> dict:
    """Measure each storage option on the first ``rows`` rows of every layer of a cache.

    Returns (and writes to ``out_json`` when given) a dict with ``machine``, the cache's shape
    (``cache``, ``rows``, ``layers``, ``hidden``, ``dtype``, ``chunk_rows``, ``shard_rows``,
    ``codecs``) and ``results``: one entry per option with ``bytes``, ``bytes_per_token_layer``,
    ``ratio_vs_float32``, ``ratio_vs_float16``, ``write_mb_per_s``, ``read_mb_per_s``,
    ``write_seconds``/``read_seconds`` (per layer, every repeat), ``relative_rmse`` and
    ``max_abs_error`` (all layers pooled) and ``per_layer`` errors. An option the cache's dtype
    cannot use (bitround on a float32 cache) is reported under ``skipped`` with the reason.
    ``tmp_dir`` is where the scratch arrays go (default: the system temp dir).
    """
    storages = [(storage_spec(parse_storage(o)), parse_storage(o)) for o in options]  # bad specs fail before any work
    cache = Cache.open(cache_path)
    s = cache.settings
    layers, dtype, hidden = list(cache.layers), cache.dtype, int(cache.hidden_size)
    chunk, shard = int(s["chunk_rows"]), int(s["shard_rows"])
    n = int(min(rows, cache.total_rows))
    if n <= 0:
        raise ValueError(f"{cache_path}: no rows to benchmark (cache has {cache.total_rows}, asked for {rows})")
    compressors = compressors_for_cache()  # what kcache writes now (a cache may hold older ones)
    machine = _machine_info()
    runnable, skipped = _runnable(storages, hidden, dtype, log)
    wtimes, rtimes, acc, nbytes = _measure(cache, runnable, n, repeats, compressors, tmp_dir, progress)
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())

    f32_bytes = n * hidden * 4 * len(layers)
    mib = f32_bytes / 2**20
    results = {}
    for spec, st in runnable:
        wsum = sum(statistics.median(t) for t in wtimes[spec])  # median per layer, summed over layers
        rsum = sum(statistics.median(t) for t in rtimes[spec])
        ov = acc[spec].overall()
        results[spec] = {
            "storage": st,
            "bits_per_value": bits_per_value(st, dtype, hidden),
            "bytes": nbytes[spec],
            "bytes_per_token_layer": nbytes[spec] / (n * len(layers)),
            "bits_per_value_on_disk": 8 * nbytes[spec] / (n * len(layers) * hidden),
            "ratio_vs_float32": f32_bytes / nbytes[spec],
            "ratio_vs_float16": f32_bytes / 2 / nbytes[spec],
            "write_mb_per_s": mib / wsum,
            "read_mb_per_s": mib / rsum,
            "write_seconds": wtimes[spec],
            "read_seconds": rtimes[spec],
            "relative_rmse": ov["relative_rmse"],
            "max_abs_error": ov["max_abs_error"],
            "per_layer": acc[spec].summary(),
            "error_state": acc[spec].state(),
        }
    res = {
        "machine": machine, "cache": str(cache_path), "rows": n, "rows_in_cache": int(cache.total_rows),
        "layers": layers,
        "hidden": hidden, "dtype": dtype, "cache_storage": getattr(cache, "storage", {"kind": "lossless"}),
        "chunk_rows": chunk, "shard_rows": shard, "codecs": codecs_description(),
        "cache_codecs": s.get("codecs"),
        "repeats": repeats, "float32_bytes": f32_bytes, "results": results, "skipped": skipped,
    }
    _report(res, out_json, out_png, log)
    return res


def _runnable(storages: list[tuple[str, dict]], hidden: int, dtype: str,
              log) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """Pre-flight check of each option on one zero row: the ones the cache's dtype can use, and
    the others with the reason (logged). -> (runnable, skipped)."""
    runnable, skipped = [], {}
    for spec, st in storages:
        try:
            encode_block(np.zeros((1, hidden), np.float32), st, dtype)
            runnable.append((spec, st))
        except ValueError as e:
            skipped[spec] = str(e)
            log(f"  skipping {spec}: {e}")
    return runnable, skipped


def _measure(cache: Cache, runnable: list[tuple[str, dict]], n: int, repeats: int, compressors, tmp_dir,
             progress: bool):
    """Write and read back the first ``n`` rows of every layer with every option, ``repeats`` times,
    in scratch arrays under ``tmp_dir`` (deleted afterwards). Layers are the outer loop, so each
    layer's reference rows are read from the cache once.

    -> (write seconds, read seconds, error accumulator, bytes on disk), each per option.
    """
    from tqdm.auto import tqdm

    s = cache.settings
    layers, dtype, hidden = list(cache.layers), cache.dtype, int(cache.hidden_size)
    chunk, shard = int(s["chunk_rows"]), int(s["shard_rows"])
    acc = {spec: ErrorAccumulator(layers) for spec, _ in runnable}
    wtimes = {spec: [] for spec, _ in runnable}
    rtimes = {spec: [] for spec, _ in runnable}
    nbytes = {spec: 0 for spec, _ in runnable}
    tmp = Path(tempfile.mkdtemp(prefix="kcache-benchstore-", dir=tmp_dir))
    bar = tqdm(total=len(runnable) * len(layers), desc="bench store", disable=not progress)
    try:
        import zarr

        for layer in layers:  # layers outer: each layer's reference rows are read from the cache once
            ref = np.ascontiguousarray(cache.read_rows(layer, 0, n), dtype=np.float32)
            for spec, st in runnable:
                bar.set_postfix_str(f"{spec} layer {layer}")
                root = tmp / spec.replace(":", "-")
                group = zarr.open_group(str(root), mode="a")
                w, r = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    arrays = _write(group, layer, ref, st, dtype, chunk, shard, compressors)
                    w.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    back = _read(arrays, st, dtype, n, hidden, shard)
                    r.append(time.perf_counter() - t0)
                wtimes[spec].append(w)
                rtimes[spec].append(r)
                acc[spec].update(layer, ref, back)
                nbytes[spec] += _dir_bytes(root / f"layer_{layer:02d}")
                del back
                bar.update(1)
            del ref
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return wtimes, rtimes, acc, nbytes


def _report(res: dict, out_json, out_png, log) -> None:
    """Log the table, and write the JSON and the plot when asked."""
    log(format_table(res))
    if out_json:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(res, indent=2))
        log(f"  wrote {out_json}")
    if out_png:
        plot_png(res, Path(out_png))
        log(f"  wrote {out_png}")


def format_table(res: dict) -> str:
    """The printed / markdown table: one row per option."""
    head = (f"bench store: {res['cache']}, {res['rows']} rows x {len(res['layers'])} layers x hidden {res['hidden']}, "
            f"cache dtype {res['dtype']}, chunks {res['chunk_rows']} rows, shards {res['shard_rows']} rows, "
            f"median of {res['repeats']}")
    lines = [head, "",
             "| storage | bytes/token-layer | bits/value on disk | ratio vs f32 | ratio vs f16 | write MB/s | "
             "read MB/s | relative RMSE | max abs error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec, r in res["results"].items():
        rel = "n/a" if r["relative_rmse"] is None else f"{r['relative_rmse']:.2e}"
        lines.append(f"| {spec} | {r['bytes_per_token_layer']:.1f} | {r['bits_per_value_on_disk']:.2f} | "
                     f"{r['ratio_vs_float32']:.2f}x | {r['ratio_vs_float16']:.2f}x | {r['write_mb_per_s']:.0f} | "
                     f"{r['read_mb_per_s']:.0f} | {rel} | {r['max_abs_error']:.3g} |")
    return "\n".join(lines)


def plot_png(res: dict, path: Path) -> None:
    """Left: bytes per token-layer vs relative RMSE (one point per option; the x axis is
    symlog so lossless at 0 is drawn). Right: write and read throughput per option."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(res["results"])
    r = res["results"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    errs = [r[s]["relative_rmse"] or 0.0 for s in specs]
    size = [r[s]["bytes_per_token_layer"] for s in specs]
    a.scatter(errs, size, color="#47a")
    for s, x, y in zip(specs, errs, size):
        a.annotate(s, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    # Reference: what the rows would take uncompressed as float16 (2 bytes per value).
    a.axhline(2 * res["hidden"], color="#888", ls="--", lw=1)
    a.text(0.98, 2 * res["hidden"], "raw float16", transform=a.get_yaxis_transform(), ha="right", va="bottom",
           fontsize=7, color="#666")
    nonzero = [e for e in errs if e > 0]
    a.set_xscale("symlog", linthresh=(min(nonzero) / 2 if nonzero else 1e-6))
    a.set(xlabel="relative RMSE vs cache (symlog)", ylabel="bytes per token-layer on disk",
          title=f"size vs error ({res['rows']} rows x {len(res['layers'])} layers, hidden {res['hidden']})")
    a.set_ylim(0, 2.25 * res["hidden"])
    a.set_xlim(left=0, right=max(errs) * 3 if nonzero else 1e-5)  # room for the last label
    a.grid(alpha=0.3)
    x = np.arange(len(specs))
    bw = b.bar(x - 0.2, [r[s]["write_mb_per_s"] for s in specs], 0.4, label="encode + write", color="#4a7")
    br = b.bar(x + 0.2, [r[s]["read_mb_per_s"] for s in specs], 0.4, label="read + decode", color="#a74")
    b.bar_label(bw, fmt="%.0f", fontsize=7)
    b.bar_label(br, fmt="%.0f", fontsize=7)
    b.set_xticks(x, specs, rotation=20)
    b.set(ylabel="MiB/s of float32 rows",
          title=f"throughput ({res['machine'].get('cpu_count')} CPUs, median of {res['repeats']})")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
