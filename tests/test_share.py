"""Sharing caches: multi-rank extraction, merge, manifests and digests, immutability, untrusted input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import relist, tiny_dec, unlock
from typer.testing import CliRunner

from kcache.cache import Cache, CacheError, finalize, merge, validate_cache
from kcache.cli import app
from kcache.data.samples import write_samples
from kcache.data.synth import synth_samples
from kcache.extract import ExtractConfig, extract, rank_batches
from kcache.fit import FitConfig, fit_encoders

SMALL = dict(layers="1-2", chunk_rows=32, shard_rows=64, token_budget=96)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_samples(a: Cache, b: Cache, exact: bool = True):
    """Every sample of ``a`` has identical deltas, tokens and masks in ``b``."""
    assert sorted(a.index["sample_id"].to_pylist()) == sorted(b.index["sample_id"].to_pylist())
    for sid in a.index["sample_id"].to_pylist():
        ta, sa = a.encoder_tokens(sid)
        tb, sb = b.encoder_tokens(sid)
        assert sa == sb and np.array_equal(ta, tb), sid
        assert np.array_equal(a.loss_mask(sid), b.loss_mask(sid)), sid
        assert np.array_equal(a.target_mask(sid), b.target_mask(sid)), sid
        for l in a.layers:
            assert np.array_equal(a.deltas(sid, l), b.deltas(sid, l)), (sid, l)


@pytest.fixture
def llama(tokenizer_nobos):

    return tiny_dec("llama", tokenizer_nobos, name="tiny-llama")


# ---------------------------------------------------------------------------------------------
# many ranks


def test_rank_batches_are_contiguous_balanced_and_cover_everything():
    costs = [5, 5, 5, 5, 40, 40, 1, 1, 1]
    for world in (1, 2, 3, 4, 12):
        ranges = rank_batches(costs, world)
        assert len(ranges) == world
        assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    two = rank_batches(costs, 2)
    loads = [sum(costs[a:b]) for a, b in two]
    assert max(loads) <= 0.5 * sum(costs) + max(costs)


@pytest.mark.integration
def test_two_rank_extraction_equals_one_rank(saved_model, tmp_path):
    samples = tmp_path / "s.parquet"
    write_samples(synth_samples(60, seed=5), samples)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = ["--model", str(saved_model), "--samples", str(samples), "--layers", "1-2", "--token-budget", "96",
              "--chunk-rows", "32", "--shard-rows", "64", "--model-dtype", "float32"]
    one = subprocess.run([sys.executable, "-m", "kcache", "extract", *common, "--out", str(tmp_path / "one.zarr")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "kcache", "extract", *common, "--out",
                          str(tmp_path / "two.zarr")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[rank 1/2]" in two.stdout

    a, b = Cache.open(tmp_path / "one.zarr"), Cache.open(tmp_path / "two.zarr")
    assert len(a.parts) == 1 and len(b.parts) == 2
    assert [p["path"] for p in b.manifest["parts"]] == ["parts/00000-of-00002", "parts/00001-of-00002"]
    assert all(p.index.num_rows > 0 for p in b.parts), "both ranks must have done work"
    # the parts in rank order are the single-process layout, cut in two
    assert a.index["sample_id"].to_pylist() == b.index["sample_id"].to_pylist()
    assert a.index["row_offset"].to_pylist() == b.index["row_offset"].to_pylist()
    _same_samples(a, b)
    assert a.attrs["counts"] == {k: v for k, v in b.attrs["counts"].items()}
    assert a.settings == b.settings
    assert a.fingerprint() == b.fingerprint()
    for l in map(str, a.layers):
        assert b.attrs["stats"][l]["rms"] == pytest.approx(a.attrs["stats"][l]["rms"], rel=1e-9)
    assert validate_cache(tmp_path / "two.zarr") == []

    # It trains like any cache: 2 processes (one layer each) on the 2-part cache give the same
    # encoders as one process on the single-process cache.
    fit = ["fit-encoders", "--max-steps", "3", "--eval-every", "3", "--batch-size", "4", "--device", "cpu"]
    ref = subprocess.run([sys.executable, "-m", "kcache", *fit, "--cache", str(tmp_path / "one.zarr"), "--out",
                          str(tmp_path / "enc1")],
                         env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(_free_port()), "-m", "kcache", *fit, "--cache",
                           str(tmp_path / "two.zarr"),
                           "--out", str(tmp_path / "enc2")], env=env, capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert dist.stdout.count("best step") == 1, "only rank 0 prints the summary"
    from safetensors.numpy import load_file

    w1 = load_file(str(tmp_path / "enc1" / "encoders.safetensors"))
    w2 = load_file(str(tmp_path / "enc2" / "encoders.safetensors"))
    assert w1.keys() == w2.keys() and len(w1) > 0
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=0, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------
# merge


@pytest.fixture
def two_caches(llama, tmp_path):
    sa = synth_samples(20, seed=1)
    sb = synth_samples(16, seed=2)
    extract(llama, sa, tmp_path / "a.zarr", ExtractConfig(**SMALL), progress=False)
    extract(llama, sb, tmp_path / "b.zarr", ExtractConfig(**SMALL), progress=False)
    # c shares four samples with a
    sc = pa.concat_tables([synth_samples(6, seed=3), sa.slice(0, 4)])
    extract(llama, sc, tmp_path / "c.zarr", ExtractConfig(**SMALL), progress=False)
    return tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "c.zarr"


def test_merge_combines_validates_and_trains(two_caches, tmp_path):
    a, b, _ = two_caches
    res = CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m.zarr")])
    assert res.exit_code == 0, res.output
    assert "2 parts, 36 samples" in res.output
    m = Cache.open(tmp_path / "m.zarr")
    assert m.num_samples == 36 and m.attrs["counts"]["samples"] == 36
    assert m.attrs["counts"]["input_tokens"] == Cache.open(a).total_rows + Cache.open(b).total_rows
    for src in (a, b):
        s = Cache.open(src)
        for sid in s.index["sample_id"].to_pylist():
            for l in s.layers:
                assert np.array_equal(s.deltas(sid, l), m.deltas(sid, l))
            assert np.array_equal(s.encoder_tokens(sid)[0], m.encoder_tokens(sid)[0])
    source = m.manifest["provenance"]["merged"]["sources"][0]
    assert source["metadata_digest"] == Cache.open(a).manifest["metadata_digest"]
    assert validate_cache(tmp_path / "m.zarr") == []
    summary = fit_encoders(tmp_path / "m.zarr", tmp_path / "enc",
                           FitConfig(max_steps=2, eval_every=2, batch_size=4, val_fraction=0.25), progress=False)
    assert summary["steps"] == 2


def test_merge_duplicates_are_an_error_unless_keep_first(two_caches, tmp_path):
    a, _, c = two_caches
    dup = Cache.open(a).index["sample_id"].to_pylist()
    with pytest.raises(CacheError, match=r"sample 'synth-1-0000\d\d' is in both .*a\.zarr and .*c\.zarr \(and 3 more"):
        merge([str(a), str(c)], tmp_path / "m.zarr", progress=False)
    assert not (tmp_path / "m.zarr").exists()
    merge([str(a), str(c)], tmp_path / "m.zarr", keep_first=True, progress=False)
    m = Cache.open(tmp_path / "m.zarr")
    ids = m.index["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 20 + 6
    assert set(dup) <= set(ids)
    assert m.attrs["counts"]["excluded_duplicates"] == 4
    assert len(m.manifest["parts"][1]["exclude"]) == 4
    # the kept copy is a's
    s = Cache.open(a)
    for sid in dup[:4]:
        assert int(m.part_of[m.position(sid)]) == 0
        assert np.array_equal(m.deltas(sid, 1), s.deltas(sid, 1))
    assert validate_cache(tmp_path / "m.zarr") == []
    # merging a merged cache again works (nested parts, excludes carried over)
    merge([str(tmp_path / "m.zarr"), str(two_caches[1])], tmp_path / "m2.zarr", progress=False)
    assert Cache.open(tmp_path / "m2.zarr").num_samples == 26 + 16


def test_merge_refuses_other_settings_naming_the_field(llama, two_caches, tmp_path):
    a = two_caches[0]
    extract(llama, synth_samples(8, seed=9), tmp_path / "blk.zarr",
            ExtractConfig(**{**SMALL, "layers": "1-2"}, site="mlp"), progress=False)
    with pytest.raises(CacheError, match=r"settings differ \(site: 'block' vs 'mlp'\)"):
        merge([str(a), str(tmp_path / "blk.zarr")], tmp_path / "m.zarr", progress=False)
    res = CliRunner().invoke(app, ["merge", str(a), str(tmp_path / "blk.zarr"), "--out", str(tmp_path / "m.zarr")])
    assert res.exit_code == 2 and "site" in res.output


def test_a_cache_of_another_compression_level_resumes_merges_and_reads(llama, tmp_path, monkeypatch):
    """The lossless codecs' level does not change what a cache holds: a cache written at zstd level
    3 (kcache before the default became 1) is complete for an extraction asking the same, merges
    with one at level 1, and each part keeps and decodes its own codecs."""
    import kcache.cache.writer as writer

    sa, sb = synth_samples(10, seed=1), synth_samples(8, seed=2)
    monkeypatch.setattr(writer, "ZSTD_LEVEL", 3)
    extract(llama, sa, tmp_path / "old.zarr", ExtractConfig(**SMALL), progress=False)
    monkeypatch.setattr(writer, "ZSTD_LEVEL", 1)
    again = extract(llama, sa, tmp_path / "old.zarr", ExtractConfig(**SMALL), progress=False)
    assert again.samples == 10
    extract(llama, sb, tmp_path / "new.zarr", ExtractConfig(**SMALL), progress=False)
    old, new = Cache.open(tmp_path / "old.zarr"), Cache.open(tmp_path / "new.zarr")
    assert old.settings["codecs"][0]["clevel"] == 3 and new.settings["codecs"][0]["clevel"] == 1
    merge([str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")], tmp_path / "m.zarr", progress=False)
    m = Cache.open(tmp_path / "m.zarr")
    levels = {json.loads(f.read_text())["codecs"][0]["configuration"]["codecs"][1]["configuration"]["clevel"]
              for f in (tmp_path / "m.zarr" / "parts").glob("*/deltas/layer_01/zarr.json")}
    assert levels == {1, 3}
    for src in (old, new):
        for sid in src.index["sample_id"].to_pylist():
            assert np.array_equal(src.deltas(sid, 1), m.deltas(sid, 1))
    assert validate_cache(tmp_path / "m.zarr") == []
    # an elastic record holds the settings one level down: the level is not compared there either
    from kcache.elastic import record_differences

    rec = {"attrs": {"settings": old.settings}}
    same_samples = new.settings | {"sample_set": old.settings["sample_set"]}  # all but the codecs alike
    assert record_differences(rec, {"attrs": {"settings": same_samples}}) == []
    assert record_differences(rec, {"attrs": {"settings": old.settings | {"site": "mlp"}}}) == [
        "attrs.settings.site: 'block' vs 'mlp'"]


# ---------------------------------------------------------------------------------------------
# integrity


@pytest.fixture
def cache(llama, tmp_path):
    out = tmp_path / "c.zarr"
    extract(llama, synth_samples(30, seed=4), out, ExtractConfig(**SMALL, dtype="float32"), progress=False)
    assert validate_cache(out) == []
    return out


def test_finalized_cache_is_read_only_and_refuses_changes(cache, tmp_path):
    m = json.loads((cache / "manifest.json").read_text())
    assert m["parts"][0]["path"] == "." and "deltas/layer_01/zarr.json" in m["parts"][0]["files"]
    assert all(not (p.stat().st_mode & 0o222) for p in cache.rglob("*") if p.is_file())
    with pytest.raises(CacheError, match="already finalized"):
        finalize(cache)
    with pytest.raises(CacheError, match="not empty"):
        merge([str(cache), str(cache)], cache, progress=False)
    res = CliRunner().invoke(app, ["inspect", str(cache)])
    assert "finalized (immutable)" in res.output


def test_flipped_byte_in_a_chunk_names_array_and_chunk(cache):
    unlock(cache)
    shard = cache / "deltas" / "layer_02" / "c" / "1" / "0"  # rows 64..127: chunks 2 and 3
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x10  # inside the first inner chunk's payload
    shard.write_bytes(bytes(data))
    problems = validate_cache(cache)
    assert any("deltas/layer_02" in p and "shard (1, 0)" in p and "chunk(s) (2, 0)" in p and "crc32c" in p
               for p in problems), problems
    res = CliRunner().invoke(app, ["validate", str(cache)])
    assert res.exit_code == 1 and "(2, 0)" in res.output


def test_truncated_shard_is_reported(cache):
    unlock(cache)
    shard = cache / "deltas" / "layer_01" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    problems = validate_cache(cache)
    assert any("deltas/layer_01" in p and "truncated" in p for p in problems), problems


def test_extra_file_after_finalizing_is_reported(cache):
    (cache / "deltas" / "layer_01" / "extra").write_bytes(b"x")
    assert any("not listed in manifest.json" in p for p in validate_cache(cache))


def test_edited_index_is_rejected_before_use(cache, monkeypatch):
    unlock(cache)
    t = pq.read_table(cache / "index.parquet")
    xl = t["x_len"].to_pylist()
    rows = sum(xl)
    xl[3] = 10**6
    pq.write_table(t.set_column(t.column_names.index("x_len"), "x_len", pa.array(xl, pa.int32())),
                   cache / "index.parquet")
    relist(cache, "index.parquet")
    _no_zarr(monkeypatch)
    with pytest.raises(CacheError, match=r"(?s)untrusted cache rejected.*"
                                         rf"layer_01/zarr.json: shape \({rows}, 64\) disagrees with the index"):
        Cache.open(cache)


def test_offset_out_of_range_is_rejected(cache, monkeypatch):
    unlock(cache)
    t = pq.read_table(cache / "index.parquet")
    ro = t["row_offset"].to_pylist()
    ro[-1] = ro[-1] + 5
    pq.write_table(t.set_column(t.column_names.index("row_offset"), "row_offset", pa.array(ro, pa.int64())),
                   cache / "index.parquet")
    relist(cache, "index.parquet")
    _no_zarr(monkeypatch)
    with pytest.raises(CacheError, match=rf"(?s)row {len(ro) - 1} .*row_offset out of range"):
        Cache.open(cache)
    assert "row_offset out of range" in validate_cache(cache)[0]


@pytest.mark.parametrize("codecs", [
    [{"name": "numcodecs.pickle", "configuration": {}}],
    [{"name": "sharding_indexed", "configuration": {"chunk_shape": [32, 64],
                                                    "codecs": [{"name": "bytes"}, {"name": "numcodecs.pickle"}],
                                                   "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}]}}],
    [{"name": "vlen-bytes"}],
])
def test_pickle_or_unknown_codec_is_rejected_before_zarr_opens(cache, monkeypatch, codecs):
    unlock(cache)
    meta_path = cache / "deltas" / "layer_01" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = codecs
    meta_path.write_text(json.dumps(meta))
    relist(cache, "deltas/layer_01/zarr.json")  # a forger relists (an unlisted size change is refused first)
    _no_zarr(monkeypatch)
    with pytest.raises(CacheError, match=r"codec '(numcodecs\.pickle|vlen-bytes)' is not allowed"):
        Cache.open(cache)
    assert "is not allowed" in validate_cache(cache)[0]


def test_object_dtype_is_rejected(cache):
    unlock(cache)
    meta_path = cache / "tokens" / "ids" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"] = "string"
    meta_path.write_text(json.dumps(meta))
    relist(cache, "tokens/ids/zarr.json")
    with pytest.raises(CacheError, match=r"tokens/ids/zarr.json: data type 'string', expected 'int32'"):
        Cache.open(cache)


def test_manifest_with_escaping_part_path_is_rejected(cache):
    unlock(cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["parts"][0]["path"] = "../elsewhere"
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="manifest.json: does not match schema"):
        Cache.open(cache)


def _no_zarr(monkeypatch):
    """Make any attempt to open the zarr group fail loudly: rejection must come first."""
    import zarr

    def boom(*a, **k):
        raise AssertionError("zarr was opened before the cache's metadata was checked")

    monkeypatch.setattr(zarr, "open_group", boom)
    monkeypatch.setattr(zarr, "open_array", boom)


# ---------------------------------------------------------------------------------------------
# lossy storage


@pytest.mark.parametrize("storage", ["int8", "bitround:6"])
def test_lossy_storage_records_the_error_it_makes(llama, tmp_path, storage):
    samples = synth_samples(24, seed=6)
    extract(llama, samples, tmp_path / "ref.zarr", ExtractConfig(**SMALL, dtype="float32"), progress=False)
    extract(llama, samples, tmp_path / "lossy.zarr", ExtractConfig(**SMALL, storage=storage), progress=False)
    ref, lossy = Cache.open(tmp_path / "ref.zarr"), Cache.open(tmp_path / "lossy.zarr")
    assert lossy.storage["kind"] == storage.split(":")[0]
    assert validate_cache(tmp_path / "lossy.zarr") == []
    for l in ref.layers:
        a, b = ref.read_rows(l, 0, ref.total_rows), lossy.read_rows(l, 0, lossy.total_rows)
        measured = float(np.linalg.norm(b - a) / np.linalg.norm(a))
        recorded = lossy.attrs["storage_error"][str(l)]["relative_rmse"]
        assert 0 < measured < 0.05
        # recorded against the float32 deltas as computed, so it matches a float32 reference
        assert recorded == pytest.approx(measured, rel=1e-3)
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "lossy.zarr")])
    assert f"LOSSY {storage}" in res.output and "relative RMS error per layer 1:" in res.output
