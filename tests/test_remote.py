"""Remote caches: `kcache pull` over HTTP (resume, verification, untrusted paths) and reading caches by URL.

Caches are served by tests/httpserver.py on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import stat
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_dec
from httpserver import serve
from typer.testing import CliRunner

from kcache.cache import CacheError
from kcache.cache.remote import MANIFEST, STAGING, manifest_files, pull

BLOCK = 4096  # small range requests, so even the tiny test files take several


# ---------------------------------------------------------------------------------------------
# fixtures


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_nobos):
    """A directory holding one finalized cache, ``cache.zarr`` (tiny llama, layers 1-2)."""
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("served")
    decoder = tiny_dec("llama", tokenizer_nobos, name="tiny-llama")
    extract(decoder, synth_samples(24, seed=7), root / "cache.zarr", ExtractConfig(layers="1-2", token_budget=256),
            progress=False)
    assert (root / "cache.zarr" / MANIFEST).exists(), "extract() finalizes the cache"
    return root


def _manifest(cache: Path) -> dict:
    return json.loads((cache / MANIFEST).read_text())


def _files(cache: Path) -> dict[str, dict]:
    """Manifest files of a single-part ('.') cache: relpath -> {size, sha256}."""
    (part,) = _manifest(cache)["parts"]
    assert part["path"] == "."
    return part["files"]


def _copy(served: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the served tree (finalized files are read-only)."""
    root = tmp_path / "served"
    shutil.copytree(served, root)
    for p in root.rglob("*"):
        if p.is_file():
            os.chmod(p, stat.S_IRUSR | stat.S_IWUSR)
    return root


def _rewrite_manifest(cache: Path, edit) -> None:
    doc = _manifest(cache)
    edit(doc)
    (cache / MANIFEST).write_text(json.dumps(doc))


def _assert_identical(src: Path, dst: Path) -> None:
    for rel in _files(src):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert (dst / MANIFEST).read_bytes() == (src / MANIFEST).read_bytes()
    assert not (dst / STAGING).exists()


# ---------------------------------------------------------------------------------------------
# the test server itself


def _get(url: str, rng: str | None = None, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Range": rng} if rng else {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_server_ranges_head_and_404(tmp_path):
    (tmp_path / "f.bin").write_bytes(bytes(range(100)))
    (tmp_path / "d").mkdir()
    with serve(tmp_path) as (url, server):
        assert _get(f"{url}/f.bin")[::2] == (200, bytes(range(100)))
        status, headers, body = _get(f"{url}/f.bin", "bytes=10-19")
        assert (status, headers["Content-Range"], body) == (206, "bytes 10-19/100", bytes(range(10, 20)))
        assert _get(f"{url}/f.bin", "bytes=95-")[2] == bytes(range(95, 100))
        assert _get(f"{url}/f.bin", "bytes=-3")[2] == bytes(range(97, 100))
        status, headers, _ = _get(f"{url}/f.bin", "bytes=100-")
        assert (status, headers["Content-Range"]) == (416, "bytes */100")
        status, headers, body = _get(f"{url}/f.bin", method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, "100", b"")
        assert _get(f"{url}/missing")[0] == 404
        assert _get(f"{url}/d")[0] == 404
        assert _get(f"{url}/../etc/passwd")[0] == 404
        server.fail_once["f.bin"] = 40
        with pytest.raises(http.client.IncompleteRead):  # 40 of the promised 100 bytes, then the connection closes
            _get(f"{url}/f.bin")
        assert _get(f"{url}/f.bin")[2] == bytes(range(100))  # only once
        assert server.log[1] == ("GET", "f.bin", "bytes=10-19")


# ---------------------------------------------------------------------------------------------
# pull


def test_pull_is_byte_identical_and_a_rerun_downloads_nothing(served, tmp_path):
    src = served / "cache.zarr"
    dest = tmp_path / "pulled"
    with serve(served) as (url, server):
        first = pull(f"{url}/cache.zarr", dest, progress=False)
        _assert_identical(src, dest)
        assert first["files"] == len(_files(src)) and first["files_skipped"] == 0
        assert first["bytes_downloaded"] == sum(f["size"] for f in _files(src).values())
        server.log.clear()
        again = pull(f"{url}/cache.zarr", dest, progress=False)
    assert again["bytes_downloaded"] == 0 and again["files_skipped"] == again["files"]
    assert [p for m, p, _ in server.log if m == "GET"] == [f"cache.zarr/{MANIFEST}"]
    assert stat.S_IMODE((dest / "zarr.json").stat().st_mode) == 0o444  # read-only, like any finalized cache


def test_interrupted_pull_resumes_with_a_range_request(served, tmp_path):
    src = served / "cache.zarr"
    rel, meta = max(_files(src).items(), key=lambda kv: kv[1]["size"])
    assert meta["size"] > 4 * BLOCK, "the largest test file should span several range requests"
    cut = meta["size"] // 2 + 7  # mid-block, past at least one complete block
    dest = tmp_path / "pulled"
    with serve(served) as (url, server):
        server.fail_once[f"cache.zarr/{rel}"] = cut
        with pytest.raises(CacheError, match="rerun"):
            pull(f"{url}/cache.zarr", dest, progress=False, block_size=BLOCK)
        assert not (dest / rel).exists()  # nothing half-written at the final path
        assert not (dest / MANIFEST).exists()  # the directory does not claim to be a cache
        kept = (dest / STAGING / f"{rel}.part").stat().st_size
        assert kept == cut // BLOCK * BLOCK  # every complete block is kept
        server.log.clear()
        report = pull(f"{url}/cache.zarr", dest, progress=False, block_size=BLOCK)
    ranges = [r for m, p, r in server.log if m == "GET" and p == f"cache.zarr/{rel}"]
    assert ranges[0] == f"bytes={kept}-{kept + BLOCK - 1}"
    assert report["bytes_resumed"] == kept
    _assert_identical(src, dest)
    from kcache.cache import validate_cache

    assert validate_cache(dest) == []


def test_partials_of_another_version_are_not_resumed(served, tmp_path):
    root = _copy(served, tmp_path)
    cache = root / "cache.zarr"
    rel, meta = max(_files(cache).items(), key=lambda kv: kv[1]["size"])
    dest = tmp_path / "pulled"
    with serve(root) as (url, server):
        server.fail_once[f"cache.zarr/{rel}"] = meta["size"] // 2
        with pytest.raises(CacheError):
            pull(f"{url}/cache.zarr", dest, progress=False, block_size=BLOCK)
        assert (dest / STAGING / f"{rel}.part").stat().st_size > 0
        _rewrite_manifest(cache, lambda doc: doc.update(created="2030-01-01T00:00:00Z"))  # a new version
        server.log.clear()
        report = pull(f"{url}/cache.zarr", dest, progress=False, block_size=BLOCK)
    ranges = [r for m, p, r in server.log if m == "GET" and p == f"cache.zarr/{rel}"]
    assert ranges[0] == f"bytes=0-{BLOCK - 1}" and report["bytes_resumed"] == 0
    _assert_identical(cache, dest)


def test_manifest_paths_of_several_parts():
    doc = {"parts": [{"path": "rank0", "files": {"zarr.json": {"size": 1, "sha256": "a" * 64}}},
                     {"path": "rank1/x", "files": {"deltas/zarr.json": {"size": 2, "sha256": "b" * 64}}}]}
    assert [e.key for e in manifest_files(doc)] == ["rank0/zarr.json", "rank1/x/deltas/zarr.json"]
    clash = {"parts": [{"path": "a", "files": {"b/c": {"size": 1, "sha256": "a" * 64}}},
                       {"path": "a/b", "files": {"c": {"size": 1, "sha256": "a" * 64}}}]}
    with pytest.raises(CacheError, match="listed twice"):
        manifest_files(clash)
    for reserved in (MANIFEST, f"{STAGING}/x"):
        with pytest.raises(CacheError, match="reserved"):
            manifest_files({"parts": [{"path": ".", "files": {reserved: {"size": 1, "sha256": "a" * 64}}}]})


def test_pull_from_a_server_without_range_support(served, tmp_path):
    rel, meta = max(_files(served / "cache.zarr").items(), key=lambda kv: kv[1]["size"])
    dest = tmp_path / "pulled"
    with serve(served) as (url, server):
        server.fail_once[f"cache.zarr/{rel}"] = meta["size"] // 2
        with pytest.raises(CacheError):
            pull(f"{url}/cache.zarr", dest, progress=False, block_size=BLOCK)
        assert (dest / STAGING / f"{rel}.part").stat().st_size > 0
        server.ignore_ranges = True  # every answer is the whole file: the partial is replaced, not appended to
        report = pull(f"{url}/cache.zarr", dest, progress=False, block_size=BLOCK)
    assert report["bytes_resumed"] == 0
    _assert_identical(served / "cache.zarr", dest)


def test_pull_refuses_a_cache_without_manifest(served, tmp_path):
    root = _copy(served, tmp_path)
    (root / "cache.zarr" / MANIFEST).unlink()
    with serve(root) as (url, _), pytest.raises(CacheError, match="only finalized caches can be pulled"):
        pull(f"{url}/cache.zarr", tmp_path / "pulled", progress=False)


def _add_file(path: str):
    def edit(doc):
        doc["parts"][0]["files"][path] = {"size": 1, "sha256": "0" * 64}

    return edit


def _set_part_path(path: str):
    def edit(doc):
        doc["parts"][0]["path"] = path

    return edit


@pytest.mark.parametrize("edit", [_add_file("../x"), _add_file("deltas/../../x"), _add_file("/tmp/x"),
                                  _add_file("a//x"),
                                  _add_file("a\\..\\x"), _set_part_path("../x"), _set_part_path("/x")],
                         ids=["dotdot", "nested-dotdot", "absolute", "empty-component", "backslash", "part-dotdot",
                              "part-absolute"])
def test_pull_refuses_unsafe_paths(served, tmp_path, edit):
    root = _copy(served, tmp_path)
    _rewrite_manifest(root / "cache.zarr", edit)
    dest = tmp_path / "box" / "pulled"
    with serve(root) as (url, server), pytest.raises(CacheError, match="refusing unsafe|does not match schema"):
        pull(f"{url}/cache.zarr", dest, progress=False)
    assert not dest.exists()  # refused before anything was written
    assert not [m for m, p, _ in server.log if p != f"cache.zarr/{MANIFEST}"]


def test_pull_refuses_a_path_escaping_through_a_symlink(served, tmp_path):
    root = _copy(served, tmp_path)
    _rewrite_manifest(root / "cache.zarr", _add_file("link/x"))
    dest = tmp_path / "pulled"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "link").symlink_to(tmp_path / "elsewhere")
    with serve(root) as (url, _), pytest.raises(CacheError, match="symbolic link"):
        pull(f"{url}/cache.zarr", dest, progress=False)


def test_pull_refuses_content_that_does_not_match_the_manifest(served, tmp_path):
    root = _copy(served, tmp_path)
    cache = root / "cache.zarr"
    rel = "index.parquet"
    want = _files(cache)[rel]["sha256"]
    data = bytearray((cache / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    (cache / rel).write_bytes(bytes(data))
    dest = tmp_path / "pulled"
    with serve(root) as (url, _), pytest.raises(CacheError) as err:
        pull(f"{url}/cache.zarr", dest, progress=False)
    msg = str(err.value)
    assert rel in msg and want in msg and _sha(bytes(data)) in msg
    assert not (dest / rel).exists() and not (dest / STAGING / f"{rel}.part").exists()
    assert not (dest / MANIFEST).exists()


def test_pull_command(served, tmp_path):
    from kcache.cli import app

    runner = CliRunner()
    with serve(served) as (url, _):
        ok = runner.invoke(app, ["pull", f"{url}/cache.zarr", str(tmp_path / "pulled"), "--quiet"])
        bad = runner.invoke(app, ["pull", f"{url}/nothing-here", str(tmp_path / "other"), "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "bytes downloaded" in ok.output
    assert bad.exit_code == 2 and "error:" in bad.output and "only finalized caches" in bad.output


# ---------------------------------------------------------------------------------------------
# reading a cache by URL, without pulling it


def _memory_copy(cache: Path, name: str) -> str:
    import fsspec

    fs = fsspec.filesystem("memory")
    for rel in [*_files(cache), MANIFEST]:
        fs.pipe_file(f"/{name}/{rel}", (cache / rel).read_bytes())
    return f"memory://{name}"


def _assert_same_cache(local: Path, url: str) -> None:
    from kcache.cache import Cache

    here, there = Cache.open(local), Cache.open(url)
    assert there.index.equals(here.index)
    for i in range(here.num_samples):
        for layer in here.layers:
            np.testing.assert_array_equal(there.deltas(i, layer), here.deltas(i, layer),
                                          err_msg=f"sample {i} layer {layer}")
    assert (there.embeddings() == here.embeddings()).all()


def test_cache_reads_over_http(served):
    with serve(served) as (url, _):
        _assert_same_cache(served / "cache.zarr", f"{url}/cache.zarr")


def test_cache_reads_from_memory_filesystem(served):
    import fsspec

    try:
        _assert_same_cache(served / "cache.zarr", _memory_copy(served / "cache.zarr", "kcache-test-remote"))
    finally:  # the memory file system is global to the process
        fsspec.filesystem("memory").rm("/kcache-test-remote", recursive=True)


def test_validate_over_http(served):
    from kcache.cache import validate_cache

    with serve(served) as (url, _):
        assert validate_cache(f"{url}/cache.zarr") == []


def test_one_streaming_sha256_for_every_file_hash(tmp_path):
    import kcache.cache.integrity
    from kcache.paths import BLOCK, hash_regular, sha256_file

    data = os.urandom(2 * BLOCK + 123)  # spans several blocks
    f = tmp_path / "blob"
    f.write_bytes(data)
    link = tmp_path / "link"
    link.symlink_to(f)  # model files in the Hugging Face cache are links: sha256_file follows them
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(f) == sha256_file(link) == want
    assert hash_regular(f) == (len(data), want)
    assert hash_regular(f, 10) == (11, hashlib.sha256(data[:11]).hexdigest())  # stops after size + 1 bytes
    assert not hasattr(kcache.cache.integrity, "file_sha256")
