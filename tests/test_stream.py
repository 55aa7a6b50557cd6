"""Training from a cache where it lies (kcache.cache.stream): verified reads, read-ahead, bit-identical fits.

Caches are served by tests/httpserver.py on 127.0.0.1 (a thread of this process) or held in fsspec's
memory file system; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_dec
from httpserver import serve
from test_remote import _copy as _writable_copy  # noqa: E402

from kcache.cache import Cache, CacheError
from kcache.cache.stream import (
    WAIT,
    AheadWindow,
    LruBudget,
    ReadAhead,
    VerifiedFiles,
    open_streaming,
    rows_files,
)
from kcache.fit import BatchLoader, CacheReader, FitConfig, fit_encoders, split_samples

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
# Small shuffling buffer: the first batches need only the first few blocks (and so only some shards).
CFG = dict(**TINY, epochs=1, batch_size=4, buffer_samples=8, eval_every=1000, checkpoint_every=1000)
FIT = {**CFG, "eval_every": 10, "checkpoint_every": 5}  # the fits compared bit for bit
MANIFEST = "manifest.json"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_nobos):
    """A directory holding ``c.zarr``: 120 samples, layers 1-2, small shards (25 files per layer)."""
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("stream")
    extract(tiny_dec("llama", tokenizer_nobos), synth_samples(120, seed=9), root / "c.zarr",
            ExtractConfig(layers="1-2", dtype="float32", chunk_rows=64, shard_rows=128), progress=False)
    return root


@pytest.fixture(scope="module")
def local_fit(served, tmp_path_factory):
    """The reference: ``FIT`` trained from the local directory."""
    out = tmp_path_factory.mktemp("local-fit") / "enc"
    fit_encoders(served / "c.zarr", out, FitConfig(**FIT), progress=False)
    return out




def _tamper(path: Path) -> None:
    """Change one byte in the middle: same size, other content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def _remote(root: Path, transport: str):
    """``root`` (a directory holding c.zarr) at a URL: the loopback HTTP server, or a memory:// copy."""
    if transport == "http":
        with serve(root) as (url, server):
            yield f"{url}/c.zarr", server
        return
    import fsspec

    fs = fsspec.filesystem("memory")
    name = f"kcache-test-stream-{os.getpid()}-{threading.get_ident()}"
    cache = root / "c.zarr"
    for path in cache.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/{name}/{path.relative_to(cache).as_posix()}", path.read_bytes())
    try:
        yield f"memory://{name}", None
    finally:  # the memory file system is global to the process
        fs.rm(f"/{name}", recursive=True)


# ---------------------------------------------------------------------------------------------
# the buffer and the read-ahead window (pure)


def test_lru_budget_drops_least_recently_used_never_pinned():
    lru = LruBudget(10)
    assert lru.add("a", 4) == [] and lru.add("b", 4) == []
    lru.touch("a")  # b is now the least recently used
    assert lru.add("c", 4) == ["b"] and lru.held == 8
    lru.pin("a")
    lru.pin("c")
    assert lru.add("d", 4) == ["d"]  # no room beside the pinned ones: not kept (the reader still gets its bytes)
    lru.pin("e")  # pinned before it is added (read-ahead pins, then fetches)
    assert lru.add("e", 6) == [] and lru.held == 14  # pinned entries may exceed the capacity
    assert lru.unpin("a") == ["a"] and lru.held == 10
    assert lru.unpin("e") == [] and "e" in lru  # within the capacity again: kept


def _simulate(plan, sizes, budget, rng):
    """Consumer and read-ahead interleaved at random; checks the bound at every step. -> fetch order."""
    win = AheadWindow(plan, sizes, budget)
    fetched, pos = [], 0
    while pos < len(plan):
        if rng.random() < 0.6:
            f = win.next_file()
            if f not in (None, WAIT):
                assert win.counts[f] == 1  # only files the window did not hold yet are fetched
                fetched.append(f)
        else:
            pos += 1
            win.advance(pos)
        block = sum(sizes[f] for f in set(plan[pos])) if pos < len(plan) else 0
        assert win.held <= max(budget, block), (win.held, budget, block)
        assert win.held == sum(sizes[f] for f in win.counts)
    return fetched, win


def test_read_ahead_window_is_bounded_and_complete():
    rng = np.random.default_rng(0)
    for _ in range(200):
        files = [f"f{i}" for i in range(12)]
        sizes = {f: int(rng.integers(1, 50)) for f in files}
        plan = [list(rng.choice(files, size=int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 20)))]
        budget = int(rng.integers(0, 120))
        _, win = _simulate(plan, sizes, budget, rng)
        assert win.held == 0 and not win.counts  # everything released once the consumer is past the end
    # A consumer that waits for the read-ahead gets every file of every block, in order, each block's
    # files before the next block's; a file shared by neighbouring blocks is fetched once.
    sizes = {"a": 5, "b": 5, "c": 5}
    win = AheadWindow([["a", "b"], ["b", "c"], ["c"]], sizes, budget=10)
    assert [win.next_file(), win.next_file()] == ["a", "b"]
    assert win.next_file() == WAIT and win.held == 10  # c would exceed the budget while block 0 is read
    assert win.advance(1) == ["a"]
    assert win.next_file() == "c" and win.next_file() is None  # c counted for blocks 1 and 2, fetched once
    assert win.advance(3) == ["b", "c"] and win.held == 0


def test_the_block_being_read_is_fetched_whatever_the_budget():
    win = AheadWindow([["big"], ["small"]], {"big": 100, "small": 1}, budget=10)
    assert win.next_file() == "big"  # block 0 is the consumer's: never held back
    assert win.next_file() == WAIT  # block 1 waits until block 0 is done
    win.advance(1)
    assert win.next_file() == "small"


class _FakePart:
    """A part location serving in-memory files, counting fetches (for VerifiedFiles / ReadAhead)."""

    def __init__(self, files: dict[str, bytes], delay: float = 0.0):
        self.spec, self.files = "fake://part", files
        self.sizes = {k: len(v) for k, v in files.items()}
        self.digests = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        self.fetches: list[str] = []
        self.delay = delay

    def url(self, rel: str) -> str:
        return f"{self.spec}/{rel}"

    def read_unverified(self, rel: str, size: int) -> bytes:
        import time

        time.sleep(self.delay)
        self.fetches.append(rel)
        return self.files[rel]


def test_read_ahead_fetches_within_its_budget_and_releases_everything():
    loc = _FakePart({f"s{i}": bytes([i]) * 100 for i in range(10)}, delay=0.002)
    files = VerifiedFiles(capacity=250, ahead_bytes=200, threads=3)
    peak = []
    real_get = files.get

    def get(l, rel):  # the most bytes held at any fetch
        peak.append(files.held_bytes)
        return real_get(l, rel)

    files.get = get
    plan = [[(loc, f"s{i}")] for i in range(10)]
    ahead = ReadAhead(files, plan)
    for b in range(10):
        ahead.advance(b)
        assert files.get(loc, f"s{b}") == bytes([b]) * 100
    ahead.close()
    assert max(peak) <= 300  # 200 pinned ahead + one block read past the window; the capacity is 250
    assert files.lru.pins == {} and files.held_bytes <= 250
    assert sorted(loc.fetches) == sorted(set(loc.fetches))  # each file fetched once: ahead, then served


def test_a_changed_file_is_refused_naming_it():
    loc = _FakePart({"deltas/layer_01/c/0/0": b"x" * 64})
    files = VerifiedFiles(capacity=1000)
    loc.files["deltas/layer_01/c/0/0"] = b"y" * 64  # same size, other bytes than the manifest's
    with pytest.raises(CacheError, match=r"fake://part/deltas/layer_01/c/0/0: content differs .*sha256"):
        files.get(loc, "deltas/layer_01/c/0/0")
    assert files.held_bytes == 0  # nothing kept
    with pytest.raises(CacheError, match="more than the 10-byte stream buffer"):  # refused before it is fetched
        VerifiedFiles(capacity=10).get(loc, "deltas/layer_01/c/0/0")
    assert len(loc.fetches) == 1


# ---------------------------------------------------------------------------------------------
# streamed training


@pytest.mark.parametrize("transport", ["http", "memory"])
def test_streamed_fit_equals_local_fit_bit_for_bit(served, local_fit, tmp_path, transport):
    with _remote(served, transport) as (url, server):
        fit_encoders(url, tmp_path / "remote", FitConfig(**FIT), progress=False)
    for name in ("encoders.safetensors", "history.json", "checkpoint/model.safetensors",
                 "checkpoint/optimizer.safetensors"):
        assert (tmp_path / "remote" / name).read_bytes() == (local_fit / name).read_bytes(), name
    if server is not None:  # every file read whole (to be hashed), once: the buffer holds this small cache
        gets = [p for m, p, _ in server.log if m == "GET"]
        assert all(r is None for m, _, r in server.log if m == "GET")
        assert sorted(set(gets) - {f"c.zarr/{MANIFEST}"}) == sorted(g for g in gets if g != f"c.zarr/{MANIFEST}")


def test_a_small_buffer_still_gives_the_same_fit(served, local_fit, tmp_path):
    """A buffer smaller than the cache: files are evicted and fetched (and verified) again, same weights."""
    with serve(served) as (url, server):
        fit_encoders(f"{url}/c.zarr", tmp_path / "remote", FitConfig(**FIT, stream_buffer_mb=1), progress=False)
    gets = [p for m, p, _ in server.log if m == "GET" and "/c/" in p]
    assert len(gets) > len(set(gets)), "files should have been evicted and fetched again"
    name = "encoders.safetensors"
    assert (tmp_path / "remote" / name).read_bytes() == (local_fit / name).read_bytes()


def test_a_fit_streamed_then_resumed_from_a_local_copy_is_the_same_fit(served, local_fit, tmp_path):
    """How the cache is read is not part of the run: a checkpoint written while streaming resumes locally."""
    cfg = FitConfig(**FIT)

    class Crash(Exception):
        pass

    def crash(step):
        if step == 12:  # last checkpoint at 10
            raise Crash

    with serve(served) as (url, _), pytest.raises(Crash):
        fit_encoders(f"{url}/c.zarr", tmp_path / "run", cfg, progress=False, on_step=crash)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 10
    fit_encoders(served / "c.zarr", tmp_path / "run", cfg, progress=False)
    name = "encoders.safetensors"
    assert (tmp_path / "run" / name).read_bytes() == (local_fit / name).read_bytes()


def _first_batch_needing(cache_dir: Path, cfg: FitConfig) -> dict[str, int]:
    """Delta shard file -> index of the first training batch (epoch 0) that needs it, from the
    loader's own block and batch order (the loader reads blocks in order until a batch is complete)."""
    cache = Cache.open(cache_dir)
    reader = CacheReader(cache, cache.layers)
    train, _ = split_samples(cache, cfg.val_fraction, cfg.seed)
    loader = BatchLoader(reader, train, cfg.batch_size, cfg.buffer_samples, cfg.seed, 0)
    loader.close()
    first: dict[str, int] = {}
    loaded: set[int] = set()
    next_block = 0
    for bi, batch in enumerate(loader.batches):
        while any(s not in loaded for s in batch):
            block = loader.blocks[next_block]
            for _, rel in rows_files(cache, cache.layers, *reader.block_rows(block)):
                first.setdefault(rel, bi)
            loaded.update(block)
            next_block += 1
    return first


@pytest.mark.parametrize("transport", ["http", "memory"])
def test_a_tampered_shard_stops_training_before_its_values_are_used(served, tmp_path, monkeypatch, transport):
    import kcache.fit

    # The train-mean baseline reads 64 random blocks before the first step; out of the way, so that
    # which shards are read before which step follows from the batch order alone.
    monkeypatch.setattr(kcache.fit, "_train_mean",
                        lambda reader, *a: {l: torch.zeros(reader.cache.hidden_size) for l in reader.layers})
    cfg = FitConfig(**CFG)
    first = _first_batch_needing(served / "c.zarr", cfg)
    rel, m = max(first.items(), key=lambda kv: (kv[1], kv[0]))
    n_batches = max(first.values()) + 1
    assert 2 <= m < n_batches, "the chosen shard should be needed only after a few steps"
    root = _writable_copy(served, tmp_path)
    _tamper(root / "c.zarr" / rel)
    steps: list[int] = []
    with _remote(root, transport) as (url, _), pytest.raises(CacheError) as err:
        fit_encoders(url, tmp_path / "e", cfg, progress=False, on_step=steps.append)
    msg = str(err.value)
    assert f"{url}/{rel}" in msg and "sha256" in msg and "content differs" in msg, msg
    # Batches 0..m-1 trained (they need only verified files); batch m, the first to need the shard, did not.
    assert steps == list(range(1, m + 1))


def test_a_tampered_index_is_refused_when_the_cache_is_opened(served, tmp_path):
    root = _writable_copy(served, tmp_path)
    _tamper(root / "c.zarr" / "index.parquet")
    with serve(root) as (url, _), pytest.raises(CacheError, match=r"c\.zarr/index\.parquet: content differs"):
        open_streaming(f"{url}/c.zarr")


def test_local_caches_are_verified_only_when_asked(served, tmp_path):
    root = _writable_copy(served, tmp_path)
    rel = "deltas/layer_02/c/0/0"
    _tamper(root / "c.zarr" / rel)
    plain = open_streaming(root / "c.zarr")  # local: read directly, zarr's crc32c notices the change
    assert plain.verified is None
    with pytest.raises(ValueError, match="checksum"):
        plain.read_rows(2, 0, 128)  # the shard's rows
    checked = open_streaming(root / "c.zarr", verify=True)
    with pytest.raises(CacheError, match=rf"{rel}: content differs .*sha256"):
        checked.read_rows(2, 0, 10)  # rows of an unchanged chunk of the shard: refused all the same
    np.testing.assert_array_equal(checked.read_rows(1, 0, 10), Cache.open(served / "c.zarr").read_rows(1, 0, 10))


def test_verification_needs_a_finalized_cache(served, tmp_path):
    root = _writable_copy(served, tmp_path)
    (root / "c.zarr" / MANIFEST).unlink()
    with pytest.raises(CacheError, match="not finalized"):
        open_streaming(root / "c.zarr", verify=True)
    with serve(root) as (url, _), pytest.raises(CacheError, match="not finalized"):
        open_streaming(f"{url}/c.zarr")
    assert open_streaming(f"{root}/c.zarr", verify=False).verified is None


def test_a_cache_of_several_parts_streams_every_part(served, tmp_path, tokenizer_nobos):
    from kcache.cache.merge import merge
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, extract

    other = tmp_path / "b.zarr"
    extract(tiny_dec("llama", tokenizer_nobos), synth_samples(40, seed=2), other,
            ExtractConfig(layers="1-2", dtype="float32", chunk_rows=64, shard_rows=128), progress=False)
    root = tmp_path / "root"
    merge([str(served / "c.zarr"), str(other)], root / "c.zarr", progress=False)
    local = Cache.open(root / "c.zarr")
    assert len(local.parts) == 2
    with _remote(root, "memory") as (url, _):
        streamed = open_streaming(url)
        rows = local.total_rows
        for layer in local.layers:
            np.testing.assert_array_equal(streamed.read_rows(layer, 0, rows), local.read_rows(layer, 0, rows))
        listed = {(p["path"], rel) for p in local.manifest["parts"] for rel in p["files"] if "deltas/layer_" in rel
                  and "/c/" in rel}
        part_of = {p.loc.spec: p.name for p in streamed.parts}
        planned = {(part_of[loc.spec], rel) for loc, rel in rows_files(streamed, local.layers, 0, rows)}
        assert planned == listed  # the read-ahead plan names every delta shard of both parts
        assert streamed.verified.stats["files_fetched"] > 0
