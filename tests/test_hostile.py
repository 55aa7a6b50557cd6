"""Hostile caches: what a cache from a stranger must not be able to do (issue 12, items 1-3, 8, 9).

Every test starts from the small finalized cache of tests/test_remote.py (``served``), edits a
private copy the way an attacker would (manifest included, see ``relist``), and reads it locally
and, where it applies, over the loopback HTTP server. Nothing is ever written outside tmp_path.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import relist, tiny_dec, unlock
from httpserver import serve
from test_remote import _copy, _rewrite_manifest, served  # noqa: F401 - the module-scoped cache fixture

from kcache.cache import Cache, CacheError, merge, pull
from kcache.cache.integrity import part_files, validate_cache
from kcache.paths import safe_local_path, safe_relpath

UNSAFE = ["../../../x.sh", "/ABS/y.sh", "deltas\\..\\..\\x.sh", "a\x00b", "a//b", "./zarr.json"]
SHARD = "deltas/layer_02/c/0/0"


@pytest.fixture
def evil(served, tmp_path):  # noqa: F811
    """A writable copy of the served tree: ``root/cache.zarr``; returns ``root``."""
    root = _copy(served, tmp_path)
    return root


def _add_key(cache: Path, key: str, data: bytes = b"#!/bin/sh\necho pwned\n") -> None:
    import hashlib

    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _rewrite_manifest(cache, lambda d: d["parts"][0]["files"].__setitem__(key, entry))


def _outside_files(tmp_path: Path, allowed: list[Path]) -> list[Path]:
    return [p for p in tmp_path.rglob("*.sh") if not any(p.is_relative_to(a) for a in allowed)]


# ---------------------------------------------------------------------------------------------
# 1. path keys


@pytest.mark.parametrize("key", UNSAFE + ["c:/x", ".."])
def test_safe_relpath_refuses_every_unsafe_key(key):
    with pytest.raises(CacheError, match="refusing unsafe|not a relative path"):
        safe_relpath(key, "manifest.json")
    assert safe_relpath("deltas/layer_01/c/0/0", "m") == "deltas/layer_01/c/0/0"


@pytest.mark.parametrize("key", UNSAFE)
def test_unsafe_manifest_keys_are_refused_by_every_reader(evil, tmp_path, key):
    cache = evil / "cache.zarr"
    key = key.replace("/ABS", str(tmp_path / "abs"))
    (evil / "x.sh").write_bytes(b"#!/bin/sh\necho pwned\n")  # what http://host/cache.zarr/../../../x.sh resolves to
    _add_key(cache, key)
    refused = "refusing unsafe|does not match schema"
    with pytest.raises(CacheError, match=refused):
        Cache.open(cache)
    assert any(m for m in validate_cache(cache) if "refusing unsafe" in m or "does not match schema" in m)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CacheError, match=refused):
        merge([str(cache), str(cache)], out / "m.zarr", progress=False)
    with serve(evil) as (url, _):
        for call in (lambda: Cache.open(f"{url}/cache.zarr"),
                     lambda: merge([f"{url}/cache.zarr", str(cache)], out / "m2.zarr", progress=False),
                     lambda: pull(f"{url}/cache.zarr", out / "pulled", progress=False)):
            with pytest.raises(CacheError, match=refused):
                call()
        assert any("does not match schema" in m or "refusing unsafe" in m for m in validate_cache(f"{url}/cache.zarr"))
    assert _outside_files(tmp_path, [evil]) == []  # nothing written outside --out (or anywhere)


def test_merge_writes_nothing_outside_out_even_past_the_schema(evil, tmp_path, monkeypatch):
    """The schema is not the only guard: with it disabled, merge itself refuses the key."""
    import kcache.cache.reader as kc

    monkeypatch.setattr(kc, "validate_document", lambda *a, **k: None)
    cache = evil / "cache.zarr"
    _add_key(cache, "../../../x.sh")
    (evil / "x.sh").write_bytes(b"#!/bin/sh\necho pwned\n")
    with serve(evil) as (url, _), pytest.raises(CacheError, match="refusing unsafe"):
        merge([f"{url}/cache.zarr", str(cache)], tmp_path / "out" / "m.zarr", progress=False)
    assert _outside_files(tmp_path, [evil]) == []


def test_safe_local_path_refuses_a_symlink_on_the_way(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "deltas").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CacheError, match="symbolic link"):
        safe_local_path(tmp_path / "dest", "deltas/layer_01/zarr.json")
    assert safe_local_path(tmp_path / "dest", "new/dir/file") == tmp_path / "dest" / "new" / "dir" / "file"


# ---------------------------------------------------------------------------------------------
# 2. reads outside the cache: symlinks, fifos, devices, oversized files


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_symlinked_shard_is_never_followed(evil, tmp_path, target):
    cache = evil / "cache.zarr"
    unlock(cache)
    shard = cache / SHARD
    if target == "outside":
        target = tmp_path / "outside.bin"
        target.write_bytes(shard.read_bytes())  # even the right bytes: a link is refused
    shard.unlink()
    shard.symlink_to(target)
    with pytest.raises(CacheError, match="symbolic link"):
        Cache.open(cache)
    assert any("symbolic link" in m for m in validate_cache(cache))
    with pytest.raises(CacheError, match="symbolic link"):
        merge([str(cache), str(cache)], tmp_path / "m.zarr", progress=False)
    with pytest.raises(CacheError, match="symbolic link"):
        part_files(cache)  # what finalize lists


def _unblock_fifo_later(fifo: Path) -> threading.Thread:
    """Only if a reader wrongly opened the fifo: open its write end so the test fails instead of hanging."""
    def run():
        threading.Event().wait(10)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_fifo_or_device_in_a_cache_is_refused(evil, tmp_path):
    cache = evil / "cache.zarr"
    unlock(cache)
    shard = cache / SHARD
    shard.unlink()
    os.mkfifo(shard)
    _unblock_fifo_later(shard)
    with pytest.raises(CacheError, match="not a regular file"):
        Cache.open(cache)
    assert any("not a regular file" in m for m in validate_cache(cache))
    with pytest.raises(CacheError, match="not a regular file"):
        part_files(cache)
    with pytest.raises(CacheError, match="not a regular file"):
        merge([str(cache), str(cache)], tmp_path / "m.zarr", progress=False)


def test_a_file_longer_than_its_manifest_size_is_not_read_past_it(evil):
    cache = evil / "cache.zarr"
    unlock(cache)
    with open(cache / "index.parquet", "ab") as f:
        f.write(b"\0" * (8 << 20))  # served as a big body: readers stop after size + 1 bytes
    with pytest.raises(CacheError, match="index.parquet: longer than the .* bytes its manifest records"):
        Cache.open(cache)
    with serve(evil) as (url, _):
        with pytest.raises(CacheError, match="index.parquet: longer than"):
            Cache.open(f"{url}/cache.zarr")


# ---------------------------------------------------------------------------------------------
# 3. size bombs


def _set_shape(cache: Path, array: str, shape: list[int]) -> None:
    p = cache / array / "zarr.json"
    doc = json.loads(p.read_text())
    doc["shape"] = shape
    p.write_text(json.dumps(doc))


def _x_len_bomb(cache: Path) -> None:
    """x_len of one sample 2e9, offsets and every shape edited to match, manifest re-listed."""
    unlock(cache)
    t = pq.read_table(cache / "index.parquet")
    xl = t["x_len"].to_pylist()
    kl = t["k_len"].to_pylist()
    xl[0] = 2_000_000_000
    ro, to, r, k = [], [], 0, 0
    for x, kk in zip(xl, kl):
        ro.append(r), to.append(k)
        r, k = r + x, k + x + kk
    for name, vals, typ in (("x_len", xl, pa.int32()), ("row_offset", ro, pa.int64()), ("tok_offset", to, pa.int64())):
        t = t.set_column(t.column_names.index(name), name, pa.array(vals, typ))
    pq.write_table(t, cache / "index.parquet")
    h = json.loads((cache / "deltas/layer_01/zarr.json").read_text())["shape"][1]
    for arr in ("deltas/layer_01", "deltas/layer_02"):
        _set_shape(cache, arr, [r, h])
    for arr in ("masks/loss", "masks/target"):
        _set_shape(cache, arr, [r])
    _set_shape(cache, "tokens/ids", [k])
    relist(cache, "index.parquet", "deltas/layer_01/zarr.json", "deltas/layer_02/zarr.json", "masks/loss/zarr.json",
           "masks/target/zarr.json", "tokens/ids/zarr.json")


def _vocab_bomb(cache: Path) -> None:
    unlock(cache)
    doc = json.loads((cache / "zarr.json").read_text())
    doc["attributes"]["kcache"]["vocab_size"] = 100_000_000
    (cache / "zarr.json").write_text(json.dumps(doc))
    h = json.loads((cache / "embeddings/zarr.json").read_text())["shape"][1]
    _set_shape(cache, "embeddings", [100_000_000, h])
    relist(cache, "zarr.json", "embeddings/zarr.json")


@pytest.mark.parametrize("bomb,field", [(_x_len_bomb, "deltas/layer_01/zarr.json: shape \\(2000"),
                                        (_vocab_bomb, "embeddings/zarr.json: shape \\(100000000")])
def test_size_bombs_are_refused_before_anything_is_allocated(evil, tmp_path, bomb, field):
    from kcache.fit import FitConfig, fit_encoders

    cache = evil / "cache.zarr"
    bomb(cache)
    msg = rf"(?s){field}.*more than its chunk files .* can hold"
    with pytest.raises(CacheError, match=msg):
        Cache.open(cache)
    assert any("can hold" in m for m in validate_cache(cache))
    with pytest.raises(CacheError, match=msg):
        fit_encoders(cache, tmp_path / "enc", FitConfig(max_steps=1), progress=False)
    with serve(evil) as (url, _), pytest.raises(CacheError, match=msg):
        Cache.open(f"{url}/cache.zarr")


# ---------------------------------------------------------------------------------------------
# pickle codecs, over HTTP too


def test_pickle_codec_is_refused_over_http(evil):
    cache = evil / "cache.zarr"
    unlock(cache)
    p = cache / "deltas/layer_01/zarr.json"
    doc = json.loads(p.read_text())
    doc["codecs"] = [{"name": "numcodecs.pickle", "configuration": {}}]
    p.write_text(json.dumps(doc))
    relist(cache, "deltas/layer_01/zarr.json")
    with serve(evil) as (url, _):
        with pytest.raises(CacheError, match="codec 'numcodecs.pickle' is not allowed"):
            Cache.open(f"{url}/cache.zarr")
        assert "is not allowed" in validate_cache(f"{url}/cache.zarr")[0]


# ---------------------------------------------------------------------------------------------
# 8. a shard deleted from a finalized cache


def test_deleted_shard_is_refused_naming_the_file(evil, tmp_path):
    from kcache.fit import FitConfig, fit_encoders

    cache = evil / "cache.zarr"
    unlock(cache)
    (cache / SHARD).unlink()
    with pytest.raises(CacheError, match=rf"{SHARD}: listed in manifest.json but missing"):
        Cache.open(cache)
    with pytest.raises(CacheError, match=rf"{SHARD}: listed in manifest.json but missing"):
        fit_encoders(cache, tmp_path / "enc", FitConfig(max_steps=1), progress=False)
    assert not (tmp_path / "enc" / "encoders.safetensors").exists()
    # Over HTTP nothing is listed up front: the read that needs the shard fails, naming it (never zeros).
    with serve(evil) as (url, _):
        c = Cache.open(f"{url}/cache.zarr")
        with pytest.raises(CacheError, match=rf"{SHARD}: listed in manifest.json but missing"):
            c.read_rows(2, 0, c.total_rows)


# ---------------------------------------------------------------------------------------------
# 9. an empty part validates; empty input is refused


@pytest.fixture
def llama(tokenizer_nobos):

    return tiny_dec("llama", tokenizer_nobos, name="tiny-llama")


def test_two_rank_cache_with_an_empty_part_validates(llama, tmp_path):
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, extract

    samples = synth_samples(4, seed=3)
    cfg = ExtractConfig(layers="1-2", token_budget=100_000, chunk_rows=32, shard_rows=64)  # one batch: rank 1 gets none
    out = tmp_path / "d.zarr"
    extract(llama, samples, out, cfg, progress=False, rank=1, world=2)
    extract(llama, samples, out, cfg, progress=False, rank=0, world=2)
    c = Cache.open(out)
    assert [p.index.num_rows for p in c.parts] == [4, 0]
    assert validate_cache(out) == []


def test_no_usable_samples_is_refused_up_front(llama, tmp_path):
    from kcache.data.samples import SampleError, require_usable
    from kcache.extract import ExtractConfig, extract

    with pytest.raises(SampleError, match="no samples"):
        require_usable(0, 0, [], "s.jsonl")
    with pytest.raises(SampleError, match="none of the 2 samples.*too long: 2"):
        require_usable(0, 2, [(0, "too long: 900 tokens"), (1, "too long: 901 tokens")], "s.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SampleError, match="no samples"):
        extract(llama, empty, tmp_path / "e.zarr", ExtractConfig(layers="1-2"), progress=False)
    assert not (tmp_path / "e.zarr" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# review fixes: manifest sizes are checked, not trusted; reads stop at them; finalize never chmods through a link


def _inflate(cache: Path, prefix: str, size: int) -> None:
    def edit(d):
        for rel, f in d["parts"][0]["files"].items():
            if rel.startswith(prefix) and "/c/" in rel:
                f["size"] = size
    _rewrite_manifest(cache, edit)


def test_inflated_manifest_sizes_cannot_back_a_size_bomb(evil):
    import time

    from kcache.paths import MAX_FILE_SIZE, check_manifest_paths

    cache = evil / "cache.zarr"
    _x_len_bomb(cache)
    _inflate(cache, "deltas/", 1 << 39)  # within the schema's maximum: only the files' real sizes tell
    t0 = time.monotonic()
    with pytest.raises(CacheError, match=r"(?s)deltas/layer_0[12]/c/0/0: "
                                         r"truncated: \d+ of the 549755813888 bytes its manifest records"):
        Cache.open(cache)
    assert time.monotonic() - t0 < 30
    assert any("549755813888 bytes its manifest records" in m for m in validate_cache(cache))
    _inflate(cache, "deltas/", 10**15)  # beyond any sane file: refused by the schema
    with pytest.raises(CacheError, match="1000000000000000"):
        Cache.open(cache)
    doc = json.loads((cache / "manifest.json").read_text())  # and by the code, whatever validated the document
    with pytest.raises(CacheError, match=rf"size 1000000000000000 is not an integer in 0\.\.{MAX_FILE_SIZE}"):
        check_manifest_paths(doc, "m")


def _store_get(store, key, byte_range=None):
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    out = sync(store.get(key, default_buffer_prototype(), byte_range))
    return None if out is None else out.to_bytes()


@pytest.mark.parametrize("where", ["local", "http"])
def test_zarr_reads_never_go_past_the_manifest_size(evil, where):
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    cache = evil / "cache.zarr"
    c = Cache.open(cache)  # opened while every file has its manifest size
    data = (cache / SHARD).read_bytes()
    size = len(data)
    os.chmod(cache / SHARD, 0o644)
    with open(cache / SHARD, "ab") as f:  # grown after finalize (and after open)
        f.write(b"\xff" * (4 << 20))
    with serve(evil) as (url, server):
        if where == "local":
            loc = c.parts[0].loc
        else:
            from kcache.cache import Location

            loc = Location(f"{url}/cache.zarr")
            loc.sizes = dict(c.parts[0].loc.sizes)  # as Cache.open sets them from the manifest
        store = loc.zarr_store()
        with pytest.raises(CacheError, match=rf"{SHARD}: longer than the {size} bytes its manifest records"):
            _store_get(store, SHARD)
        assert _store_get(store, SHARD, SuffixByteRequest(16)) == data[-16:]  # the manifest's end, not the file's
        assert _store_get(store, SHARD, OffsetByteRequest(size - 8)) == data[-8:]
        assert _store_get(store, SHARD, RangeByteRequest(size - 4, size + 100)) == data[-4:]
        assert _store_get(store, SHARD, RangeByteRequest(size + 10, size + 100)) == b""
        if where == "http":
            got = [r for m, p, r in server.log if m == "GET" and p.endswith(SHARD)]
            assert got and all(r is not None for r in got), got  # every GET asked for a bounded range
            assert f"bytes=0-{size}" in got, got


def test_finalize_never_chmods_through_a_link(tmp_path):
    from kcache.cache.integrity import make_read_only

    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    victim.chmod(0o644)
    root = tmp_path / "c.zarr"
    (root / "deltas").mkdir(parents=True)
    (root / "zarr.json").write_text("{}")
    (root / "deltas" / "evil").symlink_to(victim)
    with pytest.raises(CacheError, match=r"deltas/evil: is a symbolic link"):
        make_read_only(root)
    assert victim.stat().st_mode & 0o777 == 0o644
    (root / "deltas" / "evil").unlink()
    (root / "deltas" / "dir").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(CacheError, match=r"deltas/dir: is a symbolic link"):
        make_read_only(root)
