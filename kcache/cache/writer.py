"""Writing one cache store (format v1, :mod:`kcache.cache.format`): creation and the delta writer.

Writes follow zarr v3's constraints: one writer per store, whole shards only, and a shard is
only trusted once a commit line covering it is in ``commits.jsonl``. On resume anything past
the last commit is rewritten. Lossy storage (:mod:`kcache.cache.lossy`) is applied here, a whole
shard at a time.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from kcache.cache.format import ATTRS_KEY, COMMIT_LOG, DTYPES, POSITION_STATS, CacheError, decode_rows
from kcache.cache.lossy import decode_block, encode_block
from kcache.lock import fresh_tmp
from kcache.schemas import arrow_schema, validate_document

# ---------------------------------------------------------------------------------------------
# layout


def default_chunk_rows(hidden: int, dtype: str, target_bytes: int = 2 << 20) -> int:
    """Rows per chunk: the power of two closest to ``target_bytes`` of uncompressed data."""
    row = hidden * np.dtype(DTYPES[dtype][0]).itemsize
    rows = max(1, target_bytes // row)
    lo = 1 << (rows.bit_length() - 1)
    return lo if rows - lo <= 2 * lo - rows else 2 * lo


# Flat arrays (tokens/ids, tokens/offsets, masks): elements per chunk and chunks per shard; the
# embedding matrix: chunks of ~2 MiB of rows, EMBEDDING_SHARD_CHUNKS per shard (create_cache).
FLAT_CHUNK = 1 << 20
FLAT_SHARD_CHUNKS = 16
EMBEDDING_SHARD_CHUNKS = 8
# Entries (files or sub-folders) one folder of a cache should hold at most: the Hugging Face Hub's
# recommended maximum per folder, and a listing of ten pages on S3 (docs/sharing.md, "Object-store limits").
OBJECT_STORE_FOLDER_LIMIT = 10_000


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _array_folders(name: str, shards: int, two_d: bool) -> dict[str, int]:
    """Folders of one sharded array with ``shards`` shard files along its first axis."""
    out = {name: 1 + (shards > 0)}  # zarr.json (+ c/)
    if shards:
        out[f"{name}/c"] = shards
        if two_d:  # ARRAY/c/I/0: the second axis is one shard
            out.update({f"{name}/c/{i}": 1 for i in range(shards)})
    return out


def store_folder_entries(rows: int, tokens: int, samples: int, vocab: int, hidden: int, dtype: str,
                         layers: list[int], chunk_rows: int | None = None, shard_rows: int | None = None,
                         int8: bool = False) -> dict[str, int]:
    """Folder (relative to the store, '' = its root) -> entries it holds (files and sub-folders), by
    the layout rules of :func:`create_cache`, for a store of ``rows`` delta rows, ``tokens`` encoder
    tokens, ``samples`` samples and a ``vocab`` x ``hidden`` embedding matrix.

    zarr v3 sharding writes one file per shard: ``ARRAY/c/I/0`` for the 2-D arrays (deltas,
    embeddings; the hidden axis is one shard) and ``ARRAY/c/I`` for the 1-D ones, so ``ARRAY/c``
    holds one entry per shard along the first axis. A shard holding only the fill value is not
    written, so these are upper bounds. ``chunk_rows``/``shard_rows`` default as in extraction
    (~2 MiB chunks, 8 per shard). A finalized store's manifest.json is counted at its root.
    """
    chunk = chunk_rows or default_chunk_rows(hidden, dtype)
    shard = shard_rows or chunk * 8
    out: dict[str, int] = {"": 10}  # zarr.json README.md index.parquet skipped.parquet commits.jsonl manifest.json
    out["deltas"] = len(layers) * (2 if int8 else 1) + 1  # the arrays + the group's zarr.json
    for l in layers:
        out.update(_array_folders(f"deltas/layer_{l:02d}", _ceil(rows, shard), True))
        if int8:
            out.update(_array_folders(f"deltas/scale_{l:02d}", _ceil(rows, shard), False))
    out["tokens"] = out["masks"] = 3  # two arrays + the group's zarr.json
    for name, n in (("tokens/ids", tokens), ("tokens/offsets", samples + 1), ("masks/loss", rows),
                    ("masks/target", rows)):
        out.update(_array_folders(name, _ceil(n, min(n, FLAT_CHUNK * FLAT_SHARD_CHUNKS)) if n else 0, False))
    erows = max(1, min(vocab, default_chunk_rows(hidden, dtype)))
    out.update(_array_folders("embeddings", _ceil(vocab, erows * EMBEDDING_SHARD_CHUNKS), True))
    return out


def shard_rows_within(rows: int, chunk_rows: int, limit: int = OBJECT_STORE_FOLDER_LIMIT) -> int:
    """The smallest ``--shard-rows`` (a multiple of ``chunk_rows``) that keeps ``ARRAY/c`` of a
    delta array of ``rows`` rows at most ``limit`` entries."""
    per = _ceil(_ceil(rows, limit), chunk_rows)
    return max(1, per) * chunk_rows


# zstd level 1: on the demo's float16 deltas it stores 1.49x smaller than raw against level 3's 1.52x,
# and compresses 3.1x faster (317 vs 101 MB/s on one core), which is most of what extraction spends
# beyond its forward passes (docs/benchmarks.md). Caches written at level 3 read and resume alike:
# each array records its own codecs, and ``settings.codecs`` is not compared (``settings_differences``).
ZSTD_LEVEL = 1


def codecs_description() -> list[dict]:
    return [{"name": "blosc", "cname": "zstd", "clevel": ZSTD_LEVEL, "shuffle": "shuffle"}, {"name": "crc32c"}]


def compressors_for_cache():
    return (BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle"), Crc32cCodec())


# ---------------------------------------------------------------------------------------------
# commit log


def read_last_commit(path: Path) -> dict | None:
    """The last complete line of the commit log (a torn last line from a kill is ignored)."""
    log = Path(path) / COMMIT_LOG
    if not log.exists():
        return None
    last = None
    with open(log, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                last = json.loads(raw)
            except ValueError:
                break
    return last


def append_commit(path: Path, entry: dict) -> None:
    with open(Path(path) / COMMIT_LOG, "ab") as fh:
        fh.write((json.dumps(entry, sort_keys=True) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------
# creation


def _array(group, name, shape, chunks, shards, dtype, fill=0):
    return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                              compressors=compressors_for_cache(), fill_value=fill, overwrite=True)


def create_cache(
    path: Path,
    attrs: dict,
    index: pa.Table,
    skipped: pa.Table,
    token_ids: np.ndarray,
    token_offsets: np.ndarray,
    loss_mask: np.ndarray,
    target_mask: np.ndarray,
    embeddings: np.ndarray | None,
):
    """Write everything known before any forward pass; the delta arrays are created empty.

    ``embeddings`` None: no embedding matrix in this store (an elastic extraction's later units,
    ``has_embeddings: false`` in ``attrs``; the cache's first part holds it)."""
    s = attrs["settings"]
    validate_document(attrs, "cache-v1", f"{path}/zarr.json")
    final = Path(path)
    # Built under a process-unique temporary name and renamed, so a kill during creation leaves no
    # half store and two processes never share (or delete) each other's (kcache.lock).
    path = fresh_tmp(final, "creating")
    group = zarr.open_group(str(path), mode="w")
    total = int(index["x_len"].to_numpy().sum()) if index.num_rows else 0
    hidden = attrs["hidden_size"]
    chunk, shard = s["chunk_rows"], s["shard_rows"]
    np_dtype = DTYPES[s["dtype"]][0]
    int8 = s.get("storage", {}).get("kind") == "int8"
    for layer in s["layers"]:
        _array(group, f"deltas/layer_{layer:02d}", (total, hidden), (chunk, hidden), (shard, hidden),
               np.int8 if int8 else np_dtype)
        if int8:
            _array(group, f"deltas/scale_{layer:02d}", (total,), (chunk,), (shard,), np.float32)
    for name, arr in (("tokens/ids", token_ids), ("tokens/offsets", token_offsets), ("masks/loss", loss_mask),
                      ("masks/target", target_mask)):
        n = max(1, len(arr))
        a = _array(group, name, arr.shape, (min(n, FLAT_CHUNK),), (min(n, FLAT_CHUNK * FLAT_SHARD_CHUNKS),), arr.dtype,
                   fill=False if arr.dtype == bool else 0)
        if len(arr):
            a[:] = arr
    if embeddings is not None:
        v = embeddings.shape[0]
        erows = max(1, min(v, default_chunk_rows(hidden, s["dtype"])))
        e = _array(group, "embeddings", embeddings.shape, (erows, hidden), (erows * EMBEDDING_SHARD_CHUNKS, hidden),
                   embeddings.dtype)
        e[:] = embeddings
    pq.write_table(index.cast(arrow_schema("cache-index-v1")), path / "index.parquet")
    pq.write_table(skipped.cast(arrow_schema("cache-skipped-v1")), path / "skipped.parquet")
    (path / COMMIT_LOG).write_bytes(b"")
    group.attrs[ATTRS_KEY] = attrs
    if final.exists():
        shutil.rmtree(final)
    os.replace(path, final)
    return zarr.open_group(str(final), mode="r+")


# ---------------------------------------------------------------------------------------------
# the background writer


class RunningStats:
    """Per-layer running sums (float64) that survive a resume through the commit log."""

    def __init__(self, layers: list[int], state: dict | None = None):
        self.layers = layers
        self.s = {str(l): {"n": 0, "sum": 0.0, "sumsq": 0.0, "pos_sum": [0.0] * POSITION_STATS,
                           "pos_n": [0] * POSITION_STATS} for l in layers}
        if state:
            self.s.update(json.loads(json.dumps(state)))

    def update(self, layer: int, rows: np.ndarray, positions: np.ndarray) -> None:
        st = self.s[str(layer)]
        r = np.asarray(rows, dtype=np.float32)
        # per row in float32 (one row is a few thousand values), across rows in float64
        sq = np.einsum("ij,ij->i", r, r)
        st["n"] += int(r.size)
        st["sum"] += float(r.sum(axis=1, dtype=np.float64).sum())
        st["sumsq"] += float(sq.sum(dtype=np.float64))
        norms = np.sqrt(sq.astype(np.float64))
        for j in range(POSITION_STATS):
            sel = positions == j
            if sel.any():
                st["pos_sum"][j] += float(norms[sel].sum())
                st["pos_n"][j] += int(sel.sum())

    def state(self) -> dict:
        return self.s

    def summary(self) -> dict:
        out = {}
        for l, st in self.s.items():
            n = max(st["n"], 1)
            mean = st["sum"] / n
            var = max(st["sumsq"] / n - mean * mean, 0.0)
            out[l] = {
                "mean": mean,
                "std": var ** 0.5,
                "rms": (st["sumsq"] / n) ** 0.5,
                "n": st["n"],
                "position_norms": [s / c for s, c in zip(st["pos_sum"], st["pos_n"]) if c],
                "pos_n": [c for c in st["pos_n"] if c],
            }
        return out


class DeltaWriter:
    """Writes delta rows whole shards at a time, committing each: on a background thread, or in the
    caller's thread with ``background=False``.

    ``put(first_row, {layer: rows})`` takes contiguous rows in layout order. Rows before
    ``start_row`` (already committed by an earlier run) are dropped. Exceptions raised on the
    thread resurface on the next ``put`` or on ``close``.

    In the background the writing overlaps the decoder, which is what a GPU wants. On a CPU whose
    every core already runs a torch thread it is slower than writing in between: the writer's
    compression takes a core from one OpenMP thread and the others wait for it at every barrier
    (extraction took 1.2-1.4x its bare passes with the thread, docs/benchmarks.md).
    """

    def __init__(self, path: Path, group, layers: list[int], dtype: str, shard_rows: int, total_rows: int,
                 start_row: int, positions: np.ndarray, stats: RunningStats, extra_commit: dict | None = None,
                 max_queue: int = 8, storage: dict | None = None, errors=None, background: bool = True):
        self.path, self.layers, self.dtype = Path(path), layers, dtype
        self.arrays = {l: group[f"deltas/layer_{l:02d}"] for l in layers}
        # Lossy storage: rows arrive as float32 and are quantized here, a whole shard at a time.
        self.storage, self.errors = storage, errors
        int8 = storage and storage["kind"] == "int8"
        self.scales = {l: group[f"deltas/scale_{l:02d}"] for l in layers} if int8 else {}
        self.shard_rows, self.total = shard_rows, total_rows
        self.buf_start = start_row
        self.buf: dict[int, list[np.ndarray]] = {l: [] for l in layers}
        self.buf_rows = 0
        self.positions = positions
        self.stats = stats
        self.extra = extra_commit or {}
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.write_seconds = 0.0
        self.thread = None
        if background:
            self.thread = threading.Thread(target=self._run, name="kcache-writer", daemon=True)
            self.thread.start()

    def put(self, first_row: int, rows: dict[int, np.ndarray]) -> None:
        if self.error:
            raise self.error
        if self.thread is None:
            self._take(first_row, rows)
        else:
            self.q.put((first_row, rows))

    def close(self) -> None:
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
        if self.error:
            raise self.error

    def _take(self, first: int, rows: dict[int, np.ndarray]) -> None:
        """Buffer rows and write every shard that is complete."""
        import time

        n = next(iter(rows.values())).shape[0]
        skip = max(0, self.buf_start + self.buf_rows - first)
        if first + skip != self.buf_start + self.buf_rows:
            raise CacheError(f"writer got rows starting at {first}, expected {self.buf_start + self.buf_rows}")
        if skip < n:
            for l in self.layers:
                self.buf[l].append(rows[l][skip:])
            self.buf_rows += n - skip
        while self.buf_rows >= self.shard_rows or (self.buf_rows and self.buf_start + self.buf_rows >= self.total):
            t0 = time.perf_counter()
            self._flush(min(self.shard_rows, self.buf_rows))
            self.write_seconds += time.perf_counter() - t0

    def _run(self):
        try:
            while (item := self.q.get()) is not None:
                self._take(*item)
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller
            self.error = e
            while True:  # drain so the producer never blocks forever
                try:
                    if self.q.get_nowait() is None:
                        break
                except queue.Empty:
                    break

    def _flush(self, n: int) -> None:
        a, b = self.buf_start, self.buf_start + n
        for l in self.layers:
            data = np.concatenate(self.buf[l]) if len(self.buf[l]) > 1 else self.buf[l][0]
            block, rest = data[:n], data[n:]
            if self.storage is None:
                self.arrays[l][a:b] = block
                decoded = decode_rows(block, self.dtype)
            else:
                enc = encode_block(block, self.storage, self.dtype)
                self.arrays[l][a:b] = enc["values"]
                if "scale" in enc:
                    self.scales[l][a:b] = enc["scale"]
                decoded = decode_block(enc, self.storage, self.dtype)
                self.errors.update(l, block, decoded)
            self.stats.update(l, decoded, self.positions[a:b])
            self.buf[l] = [rest] if len(rest) else []
        self.buf_start, self.buf_rows = b, self.buf_rows - n
        entry = {"rows": b, "stats": self.stats.state(), **self.extra}
        if self.errors is not None:
            entry["errors"] = self.errors.state()
        append_commit(self.path, entry)
