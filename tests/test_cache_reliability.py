"""Stage one reliability: resume after SIGKILL, refusal of changed settings, validation, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import relist, tiny_dec, unlock
from typer.testing import CliRunner

from kcache.cache import Cache, validate_cache
from kcache.cache.format import COMMIT_LOG, CacheError
from kcache.cli import app
from kcache.data.samples import write_samples
from kcache.data.synth import synth_samples
from kcache.extract import ExtractConfig, extract


def _cli(args, env):
    return [sys.executable, "-m", "kcache", "extract", *args], env


def _arrays_equal(a: Path, b: Path):
    ca, cb = Cache.open(a), Cache.open(b)
    assert ca.index.equals(cb.index)
    for name in ["tokens/ids", "tokens/offsets", "masks/loss", "masks/target",
                 "embeddings"] + [f"deltas/layer_{l:02d}" for l in ca.layers]:
        np.testing.assert_array_equal(ca.parts[0].array(name)[:], cb.parts[0].array(name)[:], err_msg=name)
    assert ca.attrs["stats"] == cb.attrs["stats"]


@pytest.mark.integration
def test_resume_after_sigkill_gives_identical_cache(saved_model, tmp_path):
    samples = tmp_path / "s.parquet"
    write_samples(synth_samples(300, seed=3), samples)
    env = {**os.environ, "KCACHE_HOME": os.environ["KCACHE_HOME"], "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    common = ["--model", str(saved_model), "--samples", str(samples), "--layers", "0-3", "--token-budget", "96",
              "--chunk-rows", "32", "--shard-rows", "64"]
    subprocess.run([sys.executable, "-m", "kcache", "extract", *common, "--out", str(tmp_path / "ref.zarr")], env=env,
                   check=True, capture_output=True)

    out = tmp_path / "killed.zarr"
    killed_at = None
    for attempt in range(3):  # the kill must land mid-run; retry if the machine was too fast
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "kcache", "extract", *common, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            log = out / COMMIT_LOG
            if log.exists() and log.read_bytes().count(b"\n") >= 3 + 2 * attempt:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = log.read_bytes().count(b"\n")
                break
            time.sleep(0.005)
        if killed_at is not None:
            break
        proc.wait()
    assert killed_at is not None, "extraction finished before it could be killed"
    with pytest.raises(CacheError, match="not complete"):
        Cache.open(out)
    res = subprocess.run([sys.executable, "-m", "kcache", "extract", *common, "--out", str(out)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed after row" in res.stdout
    _arrays_equal(out, tmp_path / "ref.zarr")
    assert validate_cache(out) == []


def test_changed_settings_are_refused(tiny_decoder, demo_samples, tmp_path):
    out = tmp_path / "c.zarr"
    extract(tiny_decoder, demo_samples, out, ExtractConfig(layers="1-2"), progress=False)
    with pytest.raises(CacheError, match=r"different settings \(cache vs asked: layers: \[1, 2\] vs \[1, 2, 3\]\)"):
        extract(tiny_decoder, demo_samples, out, ExtractConfig(layers="1-3"), progress=False)
    with pytest.raises(CacheError, match="site"):
        extract(tiny_decoder, demo_samples, out, ExtractConfig(layers="1-2", site="mlp"), progress=False)
    again = extract(tiny_decoder, demo_samples, out, ExtractConfig(layers="1-2"), progress=False)
    assert again.status == "already complete"
    # A finalized cache is immutable: --overwrite is refused and nothing is touched.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CacheError, match="immutable"):
        extract(tiny_decoder, demo_samples, out, ExtractConfig(layers="1-3"), overwrite=True, progress=False)
    with pytest.raises(CacheError, match="immutable"):
        extract(tiny_decoder, demo_samples, out, ExtractConfig(layers="1-2"), overwrite=True, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert all(not (p.stat().st_mode & 0o222) for p in before), "finalized files must be read-only"


@pytest.fixture
def good_cache(tokenizer_nobos, tmp_path):

    dec = tiny_dec("llama", tokenizer_nobos)
    out = tmp_path / "c.zarr"
    extract(dec, synth_samples(40, seed=1), out, ExtractConfig(layers="1-2", chunk_rows=64, shard_rows=128,
                                                               dtype="float32"), progress=False)
    assert validate_cache(out) == []
    return out


def test_validate_catches_deleted_shard(good_cache):
    shard = good_cache / "deltas" / "layer_02" / "c" / "1" / "0"
    assert shard.exists()
    unlock(good_cache)
    shard.unlink()
    problems = validate_cache(good_cache)
    assert any("deltas/layer_02" in p and "missing" in p for p in problems), problems
    res = CliRunner().invoke(app, ["validate", str(good_cache)])
    assert res.exit_code == 1


def test_validate_catches_flipped_offset(good_cache):
    unlock(good_cache)
    t = pq.read_table(good_cache / "index.parquet")
    off = t["row_offset"].to_pylist()
    off[5] += 1
    t = t.set_column(t.column_names.index("row_offset"), "row_offset", __import__("pyarrow").array(off, "int64"))
    pq.write_table(t, good_cache / "index.parquet")
    relist(good_cache, "index.parquet")
    problems = validate_cache(good_cache)
    assert any("row 5" in p and "row_offset" in p for p in problems), problems


def test_validate_catches_nan(good_cache):
    import zarr

    unlock(good_cache)
    arr = zarr.open_array(str(good_cache / "deltas" / "layer_01"), mode="r+")
    block = arr[0:128]
    block[17, 3] = np.nan
    arr[0:128] = block
    # The rewritten shard's size changed: relist it (an unlisted size change is refused on open, naming the file).
    relist(good_cache, *[p.relative_to(good_cache).as_posix()
                         for p in (good_cache / "deltas" / "layer_01" / "c").rglob("*") if p.is_file()])
    problems = validate_cache(good_cache)
    assert any("non-finite value at row 17" in p for p in problems), problems


def test_float16_overflow_is_a_clear_error():
    import torch

    from kcache.cache.format import encode_rows

    with pytest.raises(CacheError, match="bfloat16"):
        encode_rows(torch.tensor([[1e6, 0.0]]), "float16")
    bits = encode_rows(torch.tensor([[1e6, -3.5]]), "bfloat16")
    from kcache.cache.format import decode_rows

    assert decode_rows(bits, "bfloat16").tolist() == [[999424.0, -3.5]]  # bfloat16 rounding of 1e6, lossless bits


def test_bad_samples_are_skipped_with_reasons(tiny_decoder, tmp_path):
    rows = synth_samples(6, seed=2).to_pylist()
    rows[0]["knowledge"] = []
    rows[1]["knowledge"] = ["   "]
    rows[2]["source"] = "[USR] " + "very long question " * 200 + "[SYS]"
    rows[3]["knowledge"] = ["word " * 2000]
    from kcache.data.samples import samples_from_records

    table = samples_from_records(rows)
    rep = extract(tiny_decoder, table, tmp_path / "c.zarr", ExtractConfig(layers="1", max_length=256), progress=False)
    assert rep.samples == 3 and rep.skipped == 3
    assert rep.skip_reasons == {"empty knowledge": 2, "input alone": 1}
    cache = Cache.open(tmp_path / "c.zarr")
    assert cache.attrs["counts"]["truncated"] == 1
    trunc = cache.index.filter(cache.index["truncated"]).to_pylist()[0]
    assert trunc["sample_id"] == rows[3]["id"] and trunc["k_len"] + trunc["x_len"] == 256
    toks, shift = cache.encoder_tokens(trunc["sample_id"])
    # the template's closing part survives the cut
    assert tiny_decoder.tokenizer.decode(toks[:shift]).endswith(" }</s>")
    skipped = pq.read_table(tmp_path / "c.zarr" / "skipped.parquet").to_pylist()
    assert [s["sample_id"] for s in skipped] == [rows[0]["id"], rows[1]["id"], rows[2]["id"]]


def test_layers_out_of_range(tiny_decoder, demo_samples, tmp_path):
    with pytest.raises(ValueError, match="layer 9 out of range; this model has layers 0..3"):
        extract(tiny_decoder, demo_samples, tmp_path / "c.zarr", ExtractConfig(layers="2,9"), progress=False)
    assert not (tmp_path / "c.zarr").exists()
