"""Partial pulls: ``kcache pull URL DIR --layers 3,4 --split train --limit-samples N``.

A partial pull writes a new, smaller, finalized cache (format cache-v1, the source's settings,
chunking and storage) holding the chosen layers of the chosen samples, read from a finalized
cache anywhere (any fsspec URL or a local path). Conventions:

- Selection: the samples of ``split`` (all when None), in the source's order (its global index:
  parts in manifest order, each in layout order, which sorts by length), then the first
  ``limit_samples`` of those. ``layers``: a subset of the source's, kept in the source's order.
- Values are copied as stored (float16/bfloat16 bits, lossy int8 values with their row scales),
  never decoded and re-encoded, so every value read from the result equals the source's. The
  embedding matrix is copied whole; token ids and masks are those of the chosen samples.
- The result's attributes are the source's with the layers, counts, statistics (recomputed over
  the copied rows) and ``sample_set`` (``sha256:`` over the source's sample set and the chosen ids)
  of the subset; lossy storage keeps the source's recorded error for the kept layers (measured over
  the whole source). Its manifest's ``provenance.subset`` records the source URL, the sha256 of the
  source's ``manifest.json`` bytes, its metadata digest and the selection
  (schemas/cache-manifest-v1.json).
- Only the shards holding chosen rows are read, each whole and checked against the source
  manifest's size and sha256 before any of its bytes is used (as training from a URL does,
  :mod:`kcache.cache.stream`), so the provenance's manifest sha256 vouches for every copied value;
  a changed source file fails the pull naming it. A source index whose offsets are not ascending
  or run past the stored rows is refused. The result is validated after it is written.
- Written under a temporary name beside ``DIR`` and renamed into place once finalized; an
  interrupted partial pull leaves no ``DIR`` (rerun it: it starts over). ``DIR`` must be new or
  empty, or hold the result of the same partial pull (then it is validated and left as it is).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from kcache import __version__
from kcache._io import now
from kcache.cache.card import write_card
from kcache.cache.format import ATTRS_KEY, MANIFEST, CacheError, decode_rows
from kcache.cache.integrity import finalize, validate_cache
from kcache.cache.location import Location
from kcache.cache.lossy import dequantize_int8_rows
from kcache.cache.reader import Cache, read_manifest
from kcache.cache.writer import FLAT_CHUNK, RunningStats, append_commit, create_cache
from kcache.lock import fresh_tmp, output_lock
from kcache.schemas import arrow_schema

MAX_SPAN_CHUNKS = 64  # one read covers at most this many source chunks (bounds memory per read)


# ---------------------------------------------------------------------------------------------
# pure: the selection and the reads it needs


def select_samples(splits: list[str], split: str | None, limit: int | None) -> np.ndarray:
    """Positions (into the source's global index) of the chosen samples, ascending: those whose split is
    ``split`` (every sample when None), then the first ``limit`` of them (all when None)."""
    if limit is not None and limit < 1:
        raise CacheError(f"--limit-samples must be at least 1 (got {limit})")
    pos = np.arange(len(splits), dtype=np.int64)
    if split is not None:
        pos = pos[np.asarray([s == split for s in splits], dtype=bool)] if len(splits) else pos
    return pos[:limit] if limit is not None else pos


def choose_layers(available: list[int], wanted: list[int] | None, where: str) -> list[int]:
    """``wanted`` (all when None) in the source's order; a layer the source lacks is an error naming it."""
    if wanted is None:
        return list(available)
    if not wanted:
        raise CacheError(f"{where}: no layer chosen (the cache has layers {', '.join(map(str, available))})")
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise CacheError(f"{where}: layer(s) {', '.join(map(str, missing))} not in this cache "
                         f"(it has layers {', '.join(map(str, available))})")
    return [l for l in available if l in set(wanted)]


def expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``[s, s + n)`` of every (start, length) pair, concatenated (int64)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths) or not lengths.sum():
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(np.asarray(starts, dtype=np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return first + np.arange(int(lengths.sum()), dtype=np.int64)


def spans(positions: np.ndarray, max_gap: int, max_len: int) -> list[tuple[int, int]]:
    """Cut ascending ``positions`` into index ranges ``[i, j)``, each read as one span
    ``[positions[i], positions[j-1] + 1)``: a new span starts where the gap to the previous position
    exceeds ``max_gap`` (reading the gap would cost more than another request), and a run without
    such gaps is cut every ``max_len`` positions from its start (memory per read stays bounded)."""
    n = len(positions)
    if not n:
        return []
    positions = np.asarray(positions, dtype=np.int64)
    run = np.zeros(n, dtype=np.int64)
    run[1:] = np.cumsum(np.diff(positions) > max_gap + 1)
    run_start = positions[np.searchsorted(run, run, side="left")]
    bucket = (positions - run_start) // max_len
    cuts = np.nonzero((np.diff(run) != 0) | (np.diff(bucket) != 0))[0] + 1
    edges = [0, *cuts.tolist(), n]
    return list(zip(edges[:-1], edges[1:]))


def check_spans(starts: np.ndarray, lengths: np.ndarray, total: int, what: str, where: str) -> None:
    """Refuse (CacheError naming ``where``) unless the spans ``[start, start + length)`` lie in
    ``[0, total)``, ascending and without overlap: :func:`gather` and :func:`spans` read ascending
    positions, and a malformed source index (its ``row_offset``/``tok_offset``) must never make them
    read the wrong rows or one huge span."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(starts):
        return
    ends = starts + lengths
    bad = None
    if (lengths < 0).any():
        bad = f"negative length at sample {int(np.argmax(lengths < 0))}"
    elif starts[0] < 0:
        bad = f"first offset {int(starts[0])} is negative"
    elif int(ends[-1]) > total or int(ends.max()) > total:
        bad = f"offsets reach {int(ends.max())}, past the {total} stored"
    elif (starts[1:] < ends[:-1]).any():
        i = int(np.argmax(starts[1:] < ends[:-1]))
        bad = f"offset {int(starts[i + 1])} of sample {i + 1} of the selection comes before the end {int(ends[i])} " \
              "of the one before it (not ascending, or overlapping)"
    if bad:
        raise CacheError(f"{where}: malformed index: {what} {bad}; the source cache is damaged "
                         f"(run `kcache validate {where}`)")


def subset_sample_set(source_sample_set: str, ids: list[str]) -> str:
    """The subset's ``settings.sample_set``: sha256 over the source's sample set and the chosen ids, one a line."""
    text = f"subset of {source_sample_set}\n" + "".join(f"{i}\n" for i in ids)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def subset_index(index: pa.Table, chosen: np.ndarray) -> pa.Table:
    """The chosen rows of a (global) index with ``row_offset``/``tok_offset`` recomputed for the new arrays."""
    t = index.take(pa.array(chosen, pa.int64()))
    x = t["x_len"].to_numpy().astype(np.int64)
    k = t["k_len"].to_numpy().astype(np.int64)
    rows = np.concatenate([[0], np.cumsum(x)[:-1]]) if len(x) else np.zeros(0, np.int64)
    toks = np.concatenate([[0], np.cumsum(x + k)[:-1]]) if len(x) else np.zeros(0, np.int64)
    t = t.set_column(t.schema.get_field_index("row_offset"), "row_offset", pa.array(rows, pa.int64()))
    return t.set_column(t.schema.get_field_index("tok_offset"), "tok_offset", pa.array(toks, pa.int64()))


def subset_counts(index: pa.Table, loss_mask: np.ndarray, target_mask: np.ndarray) -> dict:
    """The counts of a subset: nothing skipped (the source's skipped samples are not part of it)."""
    x = index["x_len"].to_numpy().astype(np.int64)
    k = index["k_len"].to_numpy().astype(np.int64)
    n = index.num_rows
    return {"samples_in": n, "samples": n, "skipped": 0, "skip_reasons": {},
            "truncated": int(np.sum(index["truncated"].to_numpy(zero_copy_only=False))),
            "input_tokens": int(x.sum()), "encoder_tokens": int((x + k).sum()),
            "loss_tokens": int(loss_mask.sum()), "target_tokens": int(target_mask.sum())}


def subset_attrs(source: dict, layers: list[int], ids: list[str], counts: dict) -> dict:
    """The subset's attributes (stats are filled in once the rows are written)."""
    a = copy.deepcopy(source)
    a.pop("parts", None)  # a reader-side summary of multi-part caches, not a stored attribute
    a["settings"]["layers"] = list(layers)
    a["settings"]["sample_set"] = subset_sample_set(source["settings"]["sample_set"], ids)
    a["counts"] = counts
    a["stats"] = {}
    if "storage_error" in a:
        a["storage_error"] = {l: e for l, e in a["storage_error"].items() if int(l) in set(layers)}
    a.update(kcache_version=__version__, status="extracting", created=now(), finished=None)
    return a


# ---------------------------------------------------------------------------------------------
# reading stored values (I/O)


def stored(cache: Cache, name: str, start: int, stop: int, per_token: bool = False) -> np.ndarray:
    """Global positions ``[start, stop)`` of array ``name`` across the parts, as stored (no decoding);
    rows (delta rows, masks) unless ``per_token`` (``tokens/ids``)."""
    base = cache.tok_base if per_token else cache.row_base
    out = []
    j = int(np.searchsorted(base, start, side="right") - 1)
    while start < stop and j < len(cache.parts):
        lo, hi = int(base[j]), int(base[j + 1])
        if hi > start:
            end = min(stop, hi)
            out.append(cache.parts[j].array(name)[start - lo : end - lo])
            start = end
        j += 1
    if not out:
        arr = cache.parts[0].array(name)
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    return out[0] if len(out) == 1 else np.concatenate(out)


def gather(cache: Cache, name: str, positions: np.ndarray, chunk: int, per_token: bool = False) -> np.ndarray:
    """The stored values at ascending global ``positions``, reading each source chunk about once."""
    blocks = []
    for i, j in spans(positions, chunk, chunk * MAX_SPAN_CHUNKS):
        a = int(positions[i])
        blocks.append(stored(cache, name, a, int(positions[j - 1]) + 1, per_token)[positions[i:j] - a])
    if not blocks:
        return stored(cache, name, 0, 0, per_token)
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


# ---------------------------------------------------------------------------------------------
# pull_subset


def pull_subset(url: str, dest: str | os.PathLike, layers: list[int] | None = None, split: str | None = None,
                limit_samples: int | None = None, progress: bool = True) -> dict:
    """Write the chosen layers/samples of the finalized cache at ``url`` as a new finalized cache ``dest``.

    Returns ``{"samples", "layers", "rows", "files", "bytes", "seconds", "state"}`` (``state``:
    ``written`` or ``already complete``). Holds the output lock on ``dest`` throughout.
    """
    with output_lock(dest, "pull into it"):
        return _pull_subset(url, Path(dest), layers, split, limit_samples, progress)


def _open_source(url: str) -> tuple[Cache, str]:
    """The source cache (finalized), opened so that every file read is checked against its manifest
    (size and sha256, :class:`kcache.cache.stream.VerifiedFiles`), and the sha256 of its manifest bytes."""
    from kcache.cache.stream import DEFAULT_BUFFER_MB, VerifiedFiles

    loc = Location(url)
    try:
        raw = loc.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise CacheError(f"{loc}: no {MANIFEST} at the cache root; only finalized caches can be pulled") from None
    try:
        largest = max((int(f["size"]) for p in json.loads(raw)["parts"] for f in p["files"].values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError):
        largest = 0  # Cache.open below refuses a malformed manifest, naming it
    # Room for the largest file twice over: a shard is fetched whole and verified before any of it is used.
    cache = Cache.open(url, verified=VerifiedFiles(max(DEFAULT_BUFFER_MB << 20, 2 * largest)))
    if cache.manifest is None or json.loads(raw) != cache.manifest:
        raise CacheError(f"{loc.url(MANIFEST)}: changed while it was being read; rerun the pull")
    return cache, "sha256:" + hashlib.sha256(raw).hexdigest()


def _pull_subset(url: str, dest: Path, layers, split, limit_samples, progress: bool) -> dict:
    t0 = time.perf_counter()
    src, manifest_sha = _open_source(url)
    chosen = select_samples(src.index["split"].to_pylist(), split, limit_samples)
    if not len(chosen):
        splits = sorted(set(src.index["split"].to_pylist()))
        raise CacheError(f"{url}: no sample of split {split!r} (splits: {', '.join(splits)})")
    layers = choose_layers(src.layers, layers, url)
    provenance = {"subset": {
        "source": str(url), "source_manifest_sha256": manifest_sha,
        "source_metadata_digest": src.manifest["metadata_digest"], "source_samples": src.num_samples,
        "layers": layers, "split": split, "limit_samples": limit_samples, "samples": int(len(chosen)),
        "kcache_version": __version__}}
    done = _existing(dest, provenance)
    if done is not None:
        return {**done, "seconds": time.perf_counter() - t0}
    tmp = fresh_tmp(dest, "subsetting")  # after removing those of a killed partial pull
    try:
        rows = _write_subset(src, tmp, chosen, layers, progress, str(url))
        manifest = finalize(tmp, provenance=provenance)
        if dest.exists():
            dest.rmdir()  # empty (checked by _existing): the finished cache takes its place
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    problems = validate_cache(dest, require_manifest=True)
    if problems:
        raise CacheError(f"{dest}: the partial pull does not validate:\n  " + "\n  ".join(problems[:20]))
    files = [f for p in manifest["parts"] for f in p["files"].values()]
    return {"state": "written", "samples": int(len(chosen)), "layers": layers, "rows": rows, "files": len(files),
            "bytes": sum(f["size"] for f in files), "seconds": time.perf_counter() - t0}


def _existing(dest: Path, provenance: dict) -> dict | None:
    """None when ``dest`` is free (absent or an empty directory); the report of a finished identical
    partial pull (validated); anything else is refused."""
    if not dest.exists() and not dest.is_symlink():
        return None
    if dest.is_symlink() or not dest.is_dir():
        raise CacheError(f"{dest} exists and is not a directory; pull into a new directory")
    if not any(dest.iterdir()):
        return None
    man = read_manifest(Location(dest)) if (dest / MANIFEST).is_file() else None
    want = {k: v for k, v in provenance["subset"].items() if k != "kcache_version"}
    have = {k: v for k, v in ((man or {}).get("provenance", {}).get("subset") or {}).items() if k != "kcache_version"}
    if man is None or have != want:
        raise CacheError(f"{dest} exists and is not empty (and is not this partial pull of the same cache); "
                         "pull into a new or empty directory, or delete it yourself first")
    problems = validate_cache(dest, require_manifest=True)
    if problems:
        raise CacheError(f"{dest}: holds this partial pull but does not validate:\n  " + "\n  ".join(problems[:20]))
    files = [f for p in man["parts"] for f in p["files"].values()]
    return {"state": "already complete", "samples": want["samples"], "layers": want["layers"],
            "rows": sum(p["rows"] for p in man["parts"]), "files": len(files), "bytes": sum(f["size"] for f in files)}


def _write_subset(src: Cache, out: Path, chosen: np.ndarray, layers: list[int], progress: bool,
                  where: str = "") -> int:
    """Create the store at ``out`` with the chosen samples and layers (not finalized); returns its rows."""
    from tqdm.auto import tqdm

    index = subset_index(src.index, chosen)
    s = src.settings
    chunk, shard = int(s["chunk_rows"]), int(s["shard_rows"])
    ro, xl = src.index["row_offset"].to_numpy(), src.index["x_len"].to_numpy()
    to, kl = src.index["tok_offset"].to_numpy(), src.index["k_len"].to_numpy()
    where = where or str(src.location)
    check_spans(ro[chosen], xl[chosen], int(src.row_base[-1]), "row_offset", where)
    check_spans(to[chosen], xl[chosen].astype(np.int64) + kl[chosen], int(src.tok_base[-1]), "tok_offset", where)
    rows = expand(ro[chosen], xl[chosen])  # source row of every output row
    toks = expand(to[chosen], xl[chosen].astype(np.int64) + kl[chosen])
    lmask = gather(src, "masks/loss", rows, FLAT_CHUNK).astype(bool)
    tmask = gather(src, "masks/target", rows, FLAT_CHUNK).astype(bool)
    token_ids = gather(src, "tokens/ids", toks, FLAT_CHUNK, per_token=True).astype(np.int32)
    x_new = index["x_len"].to_numpy().astype(np.int64)
    k_new = index["k_len"].to_numpy().astype(np.int64)
    tok_off = np.concatenate([[0], np.cumsum(x_new + k_new)]).astype(np.int64)
    ids = index["sample_id"].to_pylist()
    attrs = subset_attrs(src.attrs, layers, ids, subset_counts(index, lmask, tmask))
    skipped = arrow_schema("cache-skipped-v1").empty_table()
    group = create_cache(out, attrs, index, skipped, token_ids, tok_off, lmask, tmask,
                         src.parts[0].array("embeddings")[:])  # as stored, like every copied value
    positions = np.minimum(expand(np.zeros(len(x_new), np.int64), x_new), 255).astype(np.uint8)
    stats = RunningStats(layers)
    int8 = src.storage["kind"] == "int8"
    for a in tqdm(range(0, len(rows), shard), desc=f"pull {out.name}", disable=not progress):
        b = min(a + shard, len(rows))
        for l in layers:  # whole shards, every layer, then a commit line: as the extraction writer does
            raw = gather(src, f"deltas/layer_{l:02d}", rows[a:b], chunk)
            group[f"deltas/layer_{l:02d}"][a:b] = raw
            if int8:
                scale = gather(src, f"deltas/scale_{l:02d}", rows[a:b], chunk)
                group[f"deltas/scale_{l:02d}"][a:b] = scale
                stats.update(l, dequantize_int8_rows(raw, scale), positions[a:b])
            else:
                stats.update(l, decode_rows(raw, src.dtype), positions[a:b])
        append_commit(out, {"rows": b, "stats": stats.state()})
    attrs.update(stats=stats.summary(), status="complete", finished=now())
    group.attrs[ATTRS_KEY] = attrs
    write_card(out, attrs)
    return len(rows)
