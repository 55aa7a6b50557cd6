"""Publishing caches (`kcache push`), their dataset card, object-store folder limits, and partial pulls
(`kcache pull URL DIR --layers --split --limit-samples`).

Destinations are memory://, file:// and, when moto and s3fs are installed (`pip install -e .[s3test]`),
an S3 server of moto's on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from conftest import relist, tiny_dec, unlock
from typer.testing import CliRunner

from kcache.cache import Cache, CacheError, pull, push, validate_cache
from kcache.cache import publish as publish_mod
from kcache.cache.card import SIDECAR_CARD_NAME, dataset_card, size_category, yaml_lines
from kcache.cache.format import MANIFEST
from kcache.cache.publish import MARKER, crowded_folders, folder_entries, upload_order
from kcache.cache.remote import manifest_files
from kcache.cache.subset import check_spans, expand, select_samples, spans, stored
from kcache.cache.writer import OBJECT_STORE_FOLDER_LIMIT, shard_rows_within, store_folder_entries
from kcache.cli import app

SMALL = dict(layers="1-2", token_budget=256, chunk_rows=16, shard_rows=64)  # several shards per layer


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tokenizer_nobos):
    """Finalized tiny-llama caches: ``one`` (24 samples), ``other`` (other samples), ``merged`` (two
    parts) and ``int8`` (lossy storage), all with several shards per layer."""
    from kcache.cache.merge import merge
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("caches")
    dec = tiny_dec("llama", tokenizer_nobos, name="tiny-llama")
    extract(dec, synth_samples(24, seed=7), root / "one.zarr", ExtractConfig(**SMALL), progress=False)
    extract(dec, synth_samples(12, seed=8), root / "other.zarr", ExtractConfig(**SMALL), progress=False)
    extract(dec, synth_samples(16, seed=9), root / "int8.zarr", ExtractConfig(**SMALL, storage="int8"),
            progress=False)
    merge([str(root / "one.zarr"), str(root / "other.zarr")], root / "merged.zarr", progress=False)
    return {name: root / f"{name}.zarr" for name in ("one", "other", "merged", "int8")}


@pytest.fixture
def mem_url():
    """A fresh memory:// location, emptied afterwards (the memory file system is process-wide)."""
    url = f"memory://kcache-test-{uuid.uuid4().hex[:12]}/pub.zarr"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root.rsplit("/", 1)[0]):
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


def _listed(cache: Path) -> dict[str, int]:
    """Every file the manifest lists (relative to the cache root) -> size."""
    doc = json.loads((cache / MANIFEST).read_bytes())
    return {e.key: e.size for e in manifest_files(doc)}


def _assert_published(src: Path, url: str) -> None:
    """``url`` holds ``src`` byte for byte: every listed file and the manifest; no push marker left."""
    fs, root = fsspec.core.url_to_fs(url)
    for key in [*_listed(src), MANIFEST]:
        assert fs.cat_file(f"{root}/{key}") == (src / key).read_bytes(), key
    assert not fs.exists(f"{root}/{MARKER}")


def _assert_same_values(a: Cache, b: Cache, ids, layers) -> None:
    for sid in ids:
        ta, sa = a.encoder_tokens(sid)
        tb, sb = b.encoder_tokens(sid)
        assert sa == sb and np.array_equal(ta, tb), sid
        assert np.array_equal(a.loss_mask(sid), b.loss_mask(sid)), sid
        assert np.array_equal(a.target_mask(sid), b.target_mask(sid)), sid
        for l in layers:
            assert np.array_equal(a.deltas(sid, l), b.deltas(sid, l)), (sid, l)


# ---------------------------------------------------------------------------------------------
# push


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_push_then_pull_is_byte_identical_and_a_second_push_is_a_verified_no_op(caches, scheme, mem_url,
                                                                                tmp_path):
    src = caches["one"]
    url = mem_url if scheme == "memory" else f"file://{tmp_path}/pub.zarr"
    first = push(src, url, progress=False)
    assert first["state"] == "new" and first["manifest_written"] and first["card"] == SIDECAR_CARD_NAME
    assert first["files_uploaded"] == first["files"] == len(_listed(src))
    assert first["verified_sha256"] == first["files"] and first["verified_size_only"] == 0
    assert first["bytes_uploaded"] == sum(_listed(src).values())
    _assert_published(src, url)
    assert validate_cache(url) == []  # the card beside a single-store cache is not an unlisted cache file
    pulled = tmp_path / "pulled"
    pull(url, pulled, progress=False)
    for key in [*_listed(src), MANIFEST]:
        assert (pulled / key).read_bytes() == (src / key).read_bytes(), key
    assert validate_cache(pulled) == []

    again = push(src, url, progress=False)
    assert again["state"] == "published" and not again["manifest_written"] and not again["card_written"]
    assert again["files_uploaded"] == 0 and again["files_skipped"] == again["verified_sha256"] == again["files"]


def test_an_interrupted_push_leaves_no_manifest_and_resumes(caches, mem_url, monkeypatch):
    src = caches["one"]
    real, done, k = publish_mod.upload_file, [], 7

    def flaky(dest, path, key):
        if len(done) == k:
            raise ConnectionError("connection reset by peer (simulated)")
        real(dest, path, key)
        done.append(key)

    monkeypatch.setattr(publish_mod, "upload_file", flaky)
    with pytest.raises(ConnectionError):
        push(src, mem_url, progress=False)
    fs, root = fsspec.core.url_to_fs(mem_url)
    assert not fs.exists(f"{root}/{MANIFEST}") and fs.exists(f"{root}/{MARKER}")
    assert not fs.exists(f"{root}/zarr.json")  # uploaded last: the half-pushed store is not a zarr group
    with pytest.raises(CacheError, match="not a kcache cache"):
        Cache.open(mem_url)
    monkeypatch.setattr(publish_mod, "upload_file", real)
    report = push(src, mem_url, progress=False)
    assert report["state"] == "resume" and report["files_skipped"] == k
    assert report["files_uploaded"] == report["files"] - k
    _assert_published(src, mem_url)
    assert validate_cache(mem_url) == []


def test_stores_that_refuse_reads_get_a_size_check_and_say_so(caches, mem_url, monkeypatch):
    def refuse(self, key, size):
        raise PermissionError(f"{key}: write-only credentials")

    monkeypatch.setattr(publish_mod.Destination, "digest", refuse)
    report = push(caches["one"], mem_url, progress=False)
    assert report["verified_size_only"] == report["files"] and report["verified_sha256"] == 0
    assert f"{report['files']} file(s) checked by size only" in publish_mod.summary_line("one.zarr", report)
    monkeypatch.undo()
    _assert_published(caches["one"], mem_url)
    off = push(caches["one"], mem_url, readback=False, progress=False)  # --no-readback
    assert off["verified_size_only"] == off["files"] and off["files_uploaded"] == 0


def test_upload_order_puts_each_parts_zarr_json_last(caches):
    entries = manifest_files(json.loads((caches["merged"] / MANIFEST).read_bytes()))
    keys = [e.key for e in upload_order(entries)]
    assert sorted(keys) == sorted(e.key for e in entries)
    roots = [k for k in keys if k.endswith("/zarr.json") and k.count("/") == 2]  # parts/NNNNN/zarr.json
    assert len(roots) == 2 and keys[-2:] == roots


def test_push_refuses_a_destination_holding_something_else(caches, mem_url, tmp_path, monkeypatch):
    push(caches["one"], mem_url, progress=False)
    with pytest.raises(CacheError, match=rf"{mem_url} already holds a different cache"):
        push(caches["other"], mem_url, progress=False)
    _assert_published(caches["one"], mem_url)  # untouched

    # an unfinished push of another cache
    url = f"file://{tmp_path}/half.zarr"
    monkeypatch.setattr(publish_mod, "upload_file", lambda *a: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(ConnectionError):
        push(caches["other"], url, progress=False)
    monkeypatch.undo()
    with pytest.raises(CacheError, match="unfinished push of another cache"):
        push(caches["one"], url, progress=False)

    # anything else that is not empty
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not empty"):
        push(caches["one"], tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(CacheError, match="is not a directory"):
        push(caches["one"], tmp_path / "a-file", progress=False)


@pytest.mark.parametrize("race", ["marker", "manifest"])
def test_a_concurrent_push_to_the_same_url_is_refused_before_the_manifest(caches, mem_url, monkeypatch, race):
    """Two pushes of different caches to one URL at once: the one that finds the marker replaced (or
    another manifest written) while it uploaded refuses to write its manifest, naming the URL."""
    real = publish_mod.upload_file
    fs, root = fsspec.core.url_to_fs(mem_url)
    other = (caches["other"] / MANIFEST).read_bytes()

    def racing(dest, path, key):
        real(dest, path, key)
        if race == "marker":  # the other push started after ours and wrote its marker
            doc = publish_mod.marker_document(other, json.loads(other))
            fs.pipe_file(f"{root}/{MARKER}", json.dumps(doc).encode())
        else:  # the other push finished first
            fs.pipe_file(f"{root}/{MANIFEST}", other)

    monkeypatch.setattr(publish_mod, "upload_file", racing)
    with pytest.raises(CacheError, match=rf"{mem_url}.*(another push|{MARKER})"):
        push(caches["one"], mem_url, progress=False)
    ours = (caches["one"] / MANIFEST).read_bytes()
    assert not fs.exists(f"{root}/{MANIFEST}") or fs.cat_file(f"{root}/{MANIFEST}") != ours


def test_a_new_hub_repository_counts_as_empty():
    empty = publish_mod.listing_is_empty
    assert empty([], hub=False) and empty([], hub=True)
    assert empty(["datasets/u/r/.gitattributes"], hub=True)
    assert empty(["datasets/u/r/.gitattributes", "datasets/u/r/README.md"], hub=True)
    assert not empty(["datasets/u/r/.gitattributes", "datasets/u/r/README.md", "datasets/u/r/data.csv"], hub=True)
    assert not empty(["datasets/u/r/.gitattributes", "datasets/u/r/notes.txt"], hub=True)
    assert not empty(["/x/.gitattributes"], hub=False) and not empty(["/x/README.md"], hub=False)


def test_push_refuses_unfinalized_and_invalid_caches(caches, tmp_path, mem_url):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(caches["one"], copy)
    unlock(copy)
    shard = next(k for k in _listed(copy) if "/c/" in k)
    data = bytearray((copy / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / shard).write_bytes(bytes(data))
    with pytest.raises(CacheError, match="does not validate"):
        push(copy, mem_url, progress=False)
    (copy / MANIFEST).unlink()
    with pytest.raises(CacheError, match="not a finalized cache"):
        push(copy, mem_url, progress=False)
    fs, root = fsspec.core.url_to_fs(mem_url)
    assert not fs.exists(root)  # refused before anything was written
    with pytest.raises(CacheError, match="read-only"):
        push(caches["one"], "https://example.invalid/c.zarr", progress=False)


def test_a_multi_part_cache_gets_its_card_as_readme(caches, mem_url, tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the front matter (installed with transformers)")
    report = push(caches["merged"], mem_url, license="cc-by-4.0", progress=False)
    assert report["card"] == "README.md" and report["card_written"]
    fs, root = fsspec.core.url_to_fs(mem_url)
    card = fs.cat_file(f"{root}/README.md").decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0" and meta["kcache"]["parts"] == 2 and meta["kcache"]["samples"] == 36
    assert validate_cache(mem_url) == []
    pull(mem_url, tmp_path / "pulled", progress=False)
    assert validate_cache(tmp_path / "pulled") == [] and not (tmp_path / "pulled" / "README.md").exists()


# ---------------------------------------------------------------------------------------------
# the dataset card


def _front_matter(card: str) -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the front matter (installed with transformers)")
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dataset_card_front_matter(caches):
    c = Cache.open(caches["one"])
    card = dataset_card(c.manifest, c.attrs, {"synth": 20, "dream": 4}, dataset_licenses={"dream": "custom"},
                        url="s3://b/one.zarr")
    meta = _front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] == "unspecified"
    assert {"kcache", "activation-cache", "diekae"} <= set(meta["tags"])
    assert meta["task_categories"] and meta["size_categories"] == ["n<1K"]
    assert meta["source_datasets"] == ["dream", "synth"]
    k = meta["kcache"]
    model = c.settings["model"]
    assert (k["base_model"], k["base_model_weights_hash"]) == (model["name"], model["weights_hash"])
    assert k["layers"] == [1, 2] and k["storage"] == "lossless" and k["storage_error"] == {}
    assert k["metadata_digest"] == c.manifest["metadata_digest"] and k["kcache_version"] == c.manifest["kcache_version"]
    assert {d["name"]: d["license"] for d in k["source_datasets"]}["dream"] == "custom"
    assert "kcache pull s3://b/one.zarr" in card and "fit-encoders --cache s3://b/one.zarr" in card
    assert 'Cache.open("s3://b/one.zarr")' in card and "did not state a license" in card
    unknown = _front_matter(dataset_card(c.manifest, c.attrs, {"wow": 3}))["kcache"]["source_datasets"]
    assert unknown == [{"name": "wow", "samples": 3, "license": "unknown"}]
    assert card == dataset_card(c.manifest, c.attrs, {"synth": 20, "dream": 4}, dataset_licenses={"dream": "custom"},
                                url="s3://b/one.zarr")  # deterministic: a second push rewrites nothing


def test_dataset_card_of_lossy_storage_records_the_error(caches):
    c = Cache.open(caches["int8"])
    k = _front_matter(dataset_card(c.manifest, c.attrs, {"synth": 16}, license="mit"))["kcache"]
    assert k["storage"] == "int8" and set(k["storage_error"]) == {"1", "2"}
    assert 0 < k["storage_error"]["1"]["relative_rmse"] < 0.05


def test_size_categories_and_yaml_emitter():
    assert [size_category(n) for n in (0, 999, 1000, 9999, 10_000, 250_000, 10**13)] == [
        "n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "n>1T"]
    yaml = pytest.importorskip("yaml", reason="PyYAML checks the emitter")
    doc = {"a": "n<1K", "b": [1, "x: y", {"c": None, "d": [True, 2.5]}], "e": {}, "f": [], "g": {"h": "ü\"'#"},
           "3": {"no": "yes"}}
    assert yaml.safe_load("\n".join(yaml_lines(doc))) == doc


# ---------------------------------------------------------------------------------------------
# object-store folder limits


def test_layout_rules_predict_the_folders_of_a_real_cache(caches):
    c = Cache.open(caches["one"])
    s, a = c.settings, c.attrs
    want = store_folder_entries(c.total_rows, a["counts"]["encoder_tokens"], c.num_samples, a["vocab_size"],
                                c.hidden_size, c.dtype, c.layers, s["chunk_rows"], s["shard_rows"])
    assert folder_entries([*_listed(caches["one"]), MANIFEST]) == want
    assert want["deltas/layer_01/c"] == -(-c.total_rows // 64) > 1


def test_a_7b_sized_cache_stays_within_the_folder_limit():
    # LLaMA2-7B (hidden 4096, vocab 32000), float16, layers 3-8, default chunking: 256-row chunks, 2048-row shards.
    def largest(rows, shard_rows=None):
        f = store_folder_entries(rows, rows * 5, rows // 100, 32000, 4096, "float16", list(range(3, 9)),
                                 shard_rows=shard_rows)
        return max(f.values()), sum(1 for k in f if k.startswith("deltas/layer_") and k.count("/") == 3)

    # 200k samples x 100 input tokens (20M rows, ~1 TB of float16 deltas): 9766 shards per layer folder.
    assert largest(20_000_000) == (9766, 6 * 9766)
    over, _ = largest(50_000_000)
    assert over > OBJECT_STORE_FOLDER_LIMIT
    shard = shard_rows_within(50_000_000, 256)
    assert shard % 256 == 0 and largest(50_000_000, shard)[0] <= OBJECT_STORE_FOLDER_LIMIT
    assert largest(50_000_000, shard - 256)[0] > OBJECT_STORE_FOLDER_LIMIT  # the smallest that fits


def test_push_warns_about_crowded_folders(caches, mem_url, monkeypatch):
    keys = [f"deltas/layer_03/c/{i}/0" for i in range(10_001)] + ["zarr.json"]
    assert crowded_folders(keys) == [("deltas/layer_03/c", 10_001)]
    monkeypatch.setattr(publish_mod, "OBJECT_STORE_FOLDER_LIMIT", 5)
    report = push(caches["one"], mem_url, progress=False)
    assert any("deltas/layer_01/c" in w and "--shard-rows" in w for w in report["warnings"])


# ---------------------------------------------------------------------------------------------
# partial pulls


def test_selection_helpers():
    assert select_samples(["train", "test", "train", "train"], "train", 2).tolist() == [0, 2]
    assert select_samples(["a", "b"], None, None).tolist() == [0, 1]
    with pytest.raises(CacheError, match="at least 1"):
        select_samples(["a"], None, 0)
    assert expand(np.array([10, 3]), np.array([2, 3])).tolist() == [10, 11, 3, 4, 5]
    pos = np.array([0, 1, 2, 10, 11, 40, 41, 42, 43, 44])
    assert spans(pos, max_gap=8, max_len=100) == [(0, 5), (5, 10)]
    assert spans(pos, max_gap=100, max_len=3) == [(0, 3), (3, 5), (5, 7), (7, 10)]  # each under 3 positions long
    assert spans(np.zeros(0, np.int64), 1, 1) == []


def test_check_spans_refuses_a_malformed_index():
    check_spans(np.array([0, 3, 3, 9]), np.array([3, 0, 4, 1]), 10, "row_offset", "src")
    check_spans(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, "row_offset", "src")
    for starts, lengths, why in (([0, 2], [3, 1], "not ascending"), ([5, 0], [1, 1], "not ascending"),
                                 ([0, 8], [3, 5], "past the 10 stored"), ([-1, 3], [1, 1], "negative"),
                                 ([0, 3], [3, -2], "negative length")):
        with pytest.raises(CacheError, match=rf"s3://b/c\.zarr: malformed index: row_offset .*{why}"):
            check_spans(np.array(starts), np.array(lengths), 10, "row_offset", "s3://b/c.zarr")


def test_a_partial_pull_of_a_tampered_or_malformed_source_fails_and_leaves_nothing_finalized(caches, tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "src.zarr"
    shutil.copytree(caches["one"], src)
    unlock(src)
    man = json.loads((src / MANIFEST).read_text())
    shard = next(k for k in man["parts"][0]["files"] if k.startswith("deltas/layer_02/c/"))
    path = src / man["parts"][0]["path"] / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 tells
    path.write_bytes(bytes(data))
    dest = tmp_path / "small.zarr"
    with pytest.raises(CacheError, match=rf"{shard}.*differs from the manifest"):
        pull(str(src), dest, progress=False, layers=[2], limit_samples=5)
    assert not dest.exists() and not (dest.parent / MANIFEST).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("small.zarr")]
    # A malformed index (offsets not ascending): refused naming the source, nothing written.
    bad = tmp_path / "bad.zarr"
    shutil.copytree(caches["one"], bad)
    unlock(bad)
    part = man["parts"][0]["path"]
    idx_path = bad / part / "index.parquet"
    t = pq.read_table(idx_path)
    ro = t["row_offset"].to_numpy().copy()
    ro[[0, 1]] = ro[[1, 0]]
    pq.write_table(t.set_column(t.schema.get_field_index("row_offset"), "row_offset", pa.array(ro, pa.int64())),
                   idx_path)
    relist(bad, "index.parquet", part=part)  # digests that match the damaged index: only the offsets are wrong
    with pytest.raises(CacheError, match=rf"{bad}: malformed index: row_offset"):
        pull(str(bad), tmp_path / "b.zarr", progress=False, layers=[2], limit_samples=5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("b.zarr")]


@pytest.mark.parametrize("source", ["one", "merged", "int8"])
def test_partial_pull_validates_and_equals_the_source(caches, source, mem_url, tmp_path):
    src = caches[source]
    push(src, mem_url, progress=False)  # pulled back from a URL, as users will
    dest = tmp_path / "small.zarr"
    report = pull(mem_url, dest, progress=False, layers=[2], split="train", limit_samples=9)
    assert report["state"] == "written" and report["layers"] == [2]
    assert validate_cache(dest, require_manifest=True) == []
    a, b = Cache.open(src), Cache.open(dest)
    train = [sid for sid, sp in zip(a.index["sample_id"].to_pylist(), a.index["split"].to_pylist()) if sp == "train"]
    ids = b.index["sample_id"].to_pylist()
    assert ids == train[:9] and b.layers == [2] and b.num_samples == report["samples"] == 9
    assert len(b.parts) == 1 and b.storage == a.storage and b.dtype == a.dtype
    _assert_same_values(a, b, ids, [2])
    assert np.array_equal(a.embeddings(), b.embeddings())
    sub = b.manifest["provenance"]["subset"]
    raw = fsspec.core.url_to_fs(mem_url)[0].cat_file(fsspec.core.url_to_fs(mem_url)[1] + "/" + MANIFEST)
    import hashlib

    assert sub["source"] == mem_url and sub["source_manifest_sha256"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert sub["source_metadata_digest"] == a.manifest["metadata_digest"]
    assert (sub["layers"], sub["split"], sub["limit_samples"], sub["samples"]) == ([2], "train", 9, 9)
    counts = b.attrs["counts"]
    assert counts["samples"] == 9 and counts["input_tokens"] == b.total_rows == report["rows"]
    assert counts["loss_tokens"] == sum(int(b.loss_mask(i).sum()) for i in ids)
    assert set(b.attrs["stats"]) == {"2"} and b.settings["sample_set"] != a.settings["sample_set"]
    if source == "int8":
        assert set(b.attrs["storage_error"]) == {"2"}

    again = pull(mem_url, dest, progress=False, layers=[2], split="train", limit_samples=9)
    assert again["state"] == "already complete"
    with pytest.raises(CacheError, match="not empty"):
        pull(mem_url, dest, progress=False, layers=[1])


def test_partial_pull_refuses_what_the_cache_does_not_have(caches, tmp_path):
    with pytest.raises(CacheError, match=r"layer\(s\) 7 not in this cache"):
        pull(str(caches["one"]), tmp_path / "a", progress=False, layers=[2, 7])
    with pytest.raises(CacheError, match="no sample of split 'nope'"):
        pull(str(caches["one"]), tmp_path / "b", progress=False, split="nope")
    with pytest.raises(CacheError, match="at least 1"):
        pull(str(caches["one"]), tmp_path / "c", progress=False, limit_samples=0)
    with pytest.raises(CacheError, match="no layer chosen"):
        pull(str(caches["one"]), tmp_path / "d", progress=False, layers=[])
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_stored_reads_across_parts(caches):
    c = Cache.open(caches["merged"])
    first = c.parts[0].rows
    got = stored(c, "deltas/layer_01", first - 3, first + 4)
    want = np.concatenate([c.parts[0].array("deltas/layer_01")[first - 3:], c.parts[1].array("deltas/layer_01")[:4]])
    assert np.array_equal(got, want)
    assert stored(c, "tokens/ids", 5, 5, per_token=True).shape == (0,)


# ---------------------------------------------------------------------------------------------
# the command line (in process)


def test_cli_push_and_partial_pull(caches, tmp_path):
    dest = tmp_path / "pub.zarr"
    res = CliRunner().invoke(app, ["push", str(caches["merged"]), str(dest), "-q", "--license", "mit",
                                   "--dataset-license", "synth=cc0-1.0"])
    assert res.exit_code == 0, res.output
    assert "36 samples" not in res.output and "every file read back and hashed" in res.output
    assert validate_cache(dest) == []  # README.md at a multi-part root is not a file of any part
    meta = _front_matter((dest / "README.md").read_text())
    assert meta["license"] == "mit" and meta["kcache"]["source_datasets"][0]["license"] == "cc0-1.0"
    res = CliRunner().invoke(app, ["push", str(caches["merged"]), str(dest), "-q", "--license", "mit",
                                   "--dataset-license", "synth=cc0-1.0"])
    assert res.exit_code == 0 and "already published" in res.output and "card README.md unchanged" in res.output
    res = CliRunner().invoke(app, ["push", str(caches["one"]), str(dest), "-q"])
    assert res.exit_code == 2 and f"{dest} already holds a different cache" in res.output
    res = CliRunner().invoke(app, ["push", str(caches["one"]), str(tmp_path / "x"), "--dataset-license", "bad"])
    assert res.exit_code == 2 and "expected NAME=LICENSE" in res.output

    res = CliRunner().invoke(app, ["pull", f"file://{dest}", str(tmp_path / "small.zarr"), "-q", "--layers", "1",
                                   "--split", "train", "--limit-samples", "4"])
    assert res.exit_code == 0, res.output
    assert "written; 4 samples, layers 1" in res.output
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "small.zarr")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "small.zarr")])
    assert res.exit_code == 0 and f"subset     of file://{dest}" in res.output
    assert "layers 1, split train, 4 of 36 samples" in res.output


# ---------------------------------------------------------------------------------------------
# S3 (moto's server + s3fs)


@pytest.fixture
def s3_url(monkeypatch):
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e .[s3test])")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[s3test])")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")  # botocore reads it: plain s3:// URLs work
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("kcache-test")
        yield "s3://kcache-test/team/one.zarr"
    finally:
        import fsspec.asyn
        import s3fs
        from zarr.core.sync import _get_loop

        for fs in list(s3fs.S3FileSystem._cache.values()):  # kcache's and zarr's (asynchronous) instances
            if fs._s3 is not None:  # close their sessions: no "Unclosed client session" at exit
                with contextlib.suppress(Exception):  # tidiness only: never fail a test over it
                    fsspec.asyn.sync(fs.loop if not fs.asynchronous else _get_loop(), fs._s3.__aexit__, None, None,
                                     None)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_s3_round_trip(caches, s3_url, tmp_path):
    src = caches["one"]
    report = push(src, s3_url, progress=False)
    assert report["verified_sha256"] == report["files"] and report["manifest_written"]
    _assert_published(src, s3_url)
    assert validate_cache(s3_url) == []
    pull(s3_url, tmp_path / "back", progress=False)
    for key in [*_listed(src), MANIFEST]:
        assert (tmp_path / "back" / key).read_bytes() == (src / key).read_bytes(), key
    small = pull(s3_url, tmp_path / "small", progress=False, layers=[1], limit_samples=5)
    assert small["samples"] == 5 and validate_cache(tmp_path / "small") == []
    b = Cache.open(tmp_path / "small")
    _assert_same_values(Cache.open(src), b, b.index["sample_id"].to_pylist(), [1])
    assert push(src, s3_url, progress=False)["files_uploaded"] == 0


def test_index_table_survives_subsetting():
    from kcache.cache.subset import subset_index

    t = pa.table({"sample_id": ["a", "b", "c"], "row_offset": pa.array([0, 2, 5], pa.int64()),
                  "x_len": pa.array([2, 3, 1], pa.int32()), "k_len": pa.array([4, 1, 2], pa.int32()),
                  "tok_offset": pa.array([0, 6, 10], pa.int64())})
    s = subset_index(t, np.array([0, 2]))
    assert s["row_offset"].to_pylist() == [0, 2] and s["tok_offset"].to_pylist() == [0, 6]
    assert s["sample_id"].to_pylist() == ["a", "c"]
