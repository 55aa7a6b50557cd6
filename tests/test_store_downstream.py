"""``kcache bench store --downstream``: storage options judged by the fit and the injected perplexity.

The tiny caches are a random 4-layer Llama's (hidden 64) on 24 synthetic samples; fits run a few
steps, so every test takes seconds. Floats from separate runs are compared with tolerances; the
one exact comparison is lossless against itself (same data, same seed, same process).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_dec
from typer.testing import CliRunner

from kcache.bench.downstream import (
    DownstreamConfig,
    bench_store_downstream,
    option_list,
    parse_tolerance,
    recommend,
    relative_change,
    table_rows,
)
from kcache.cache import CacheError
from kcache.cache.reader import Cache
from kcache.cli import app
from kcache.extract import ExtractConfig, extract


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_nobos):
    """A decoder, its samples and lossless, bitround:4 and int8 caches of layers 1-2 extracted from them."""
    from kcache.data.synth import synth_samples

    root = tmp_path_factory.mktemp("downstream")
    dec = tiny_dec("llama", tokenizer_nobos, name="tiny-llama")
    samples = synth_samples(24, seed=7)
    caches = {}
    for spec in ("lossless", "bitround:4", "int8"):
        caches[spec] = root / f"{spec.replace(':', '-')}.zarr"
        extract(dec, samples, caches[spec], ExtractConfig(layers="1-2", storage=spec), progress=False)
    return dec, samples, caches, root


# ---------------------------------------------------------------------------------------------
# the view: what is measured is what a --storage cache holds


def test_stored_as_reads_what_a_lossy_extraction_stores(tiny):
    _dec, _samples, caches, _ = tiny
    src = Cache.open(caches["lossless"])
    n = src.total_rows
    for layer in src.layers:
        # lossless: the round trip through float16 changes nothing
        assert np.array_equal(src.stored_as({"kind": "lossless"}).read_rows(layer, 0, n), src.read_rows(layer, 0, n))
        # bitround rounds the same float16 values the extractor rounded: bit for bit
        real = Cache.open(caches["bitround:4"])
        view = src.stored_as({"kind": "bitround", "keepbits": 4})
        assert np.array_equal(view.read_rows(layer, 0, n), real.read_rows(layer, 0, n))
        assert np.array_equal(view.read_rows(layer, 5, 17), real.read_rows(layer, 5, 17))  # any row range
        # int8 quantizes the float16 values rather than the float32 deltas: a value can round to the
        # neighbouring code (one step), and the row's scale moves by float16's rounding of its absmax
        # (<= 2^-11 relative, so <= 127 * 2^-11 = 0.062 step at the largest code).
        real8 = Cache.open(caches["int8"])
        got, want = src.stored_as({"kind": "int8"}).read_rows(layer, 0, n), real8.read_rows(layer, 0, n)
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got - want) <= step * 1.07)
        # ... small beside int8's own error
        rms = lambda a: float(np.sqrt(np.mean(np.square(a))))  # noqa: E731
        assert rms(got - want) < 0.5 * rms(want - src.read_rows(layer, 0, n))
    assert view.fingerprint() == real.fingerprint() != src.fingerprint()
    assert view.storage == {"kind": "lossless"} and "bitround:4" in str(view)


def test_stored_as_refuses_a_lossy_source_and_an_option_the_dtype_cannot_hold(tiny, tmp_path):
    dec, samples, caches, _ = tiny
    with pytest.raises(CacheError, match="only be simulated from a lossless cache"):
        Cache.open(caches["int8"]).stored_as({"kind": "lossless"})
    extract(dec, samples.slice(0, 4), tmp_path / "f32.zarr", ExtractConfig(layers="1", dtype="float32"),
            progress=False)
    with pytest.raises(ValueError, match="bitround"):
        Cache.open(tmp_path / "f32.zarr").stored_as({"kind": "bitround", "keepbits": 4})


# ---------------------------------------------------------------------------------------------
# the bench


def test_downstream_bench_on_a_small_cache(tiny, tmp_path):
    from kcache.fit import FitConfig, fit_encoders

    dec, samples, caches, _ = tiny
    cfg = DownstreamConfig(steps=3, batch_size=4, test_samples=3, max_ppl_change=0.5, seed_control=True)
    out = tmp_path / "bench" / "d.json"
    res = bench_store_downstream(caches["lossless"], samples, decoder=dec, options=("bitround:2",),
                                 rows=10_000, repeats=1, cfg=cfg, out_json=out, out_png=out.with_suffix(".png"),
                                 progress=False, log=lambda *a: None)
    d = json.loads(out.read_text())["downstream"]
    assert out.with_suffix(".png").stat().st_size > 0
    # The reference is added first; the seed control comes last.
    assert [r["storage"] for r in d["rows"]] == ["lossless", "bitround:2", "lossless (seed 1)"]
    assert len(d["held_out"]) == 3 and set(d["runs"]["lossless"]["ppl"]) == {"x", "kx", "ekx", "oracle"}
    rows = {r["storage"]: r for r in d["rows"]}
    # Lossless against itself: the same data, seed and batches give exactly the same fit and scores.
    lossless = rows["lossless"]
    assert lossless["val_fvu_change"] == 0.0 and lossless["val_fvu_stored_change"] == 0.0
    assert lossless["ppl_change"]["ekx"] == 0.0 and lossless["ppl_change"]["oracle"] == 0.0
    assert lossless["val_fvu"] == lossless["val_fvu_stored"]  # its stored targets are the lossless ones
    # A coarse option changes the targets, hence the fit, the injected perplexity and the oracle.
    coarse = rows["bitround:2"]
    assert coarse["val_fvu_change"] != 0 and coarse["val_fvu_stored_change"] != 0
    assert coarse["ppl_change"]["ekx"] != 0 and coarse["ppl_change"]["oracle"] != 0
    assert coarse["relative_rmse"] > 0 and coarse["bytes_per_token_layer"] < lossless["bytes_per_token_layer"]
    for r in d["rows"]:
        assert r["bytes_per_value"] == pytest.approx(r["bytes_per_token_layer"] / 64)
        assert set(d["runs"][r["storage"]]["per_layer"]) == {"1", "2"}
    # The control sits beside the options (another seed moves the fit with no storage error) but is never judged.
    control = rows["lossless (seed 1)"]
    assert control["bytes_per_token_layer"] == lossless["bytes_per_token_layer"] and control["val_fvu_change"] != 0
    want = recommend(res["downstream"]["rows"][:2], 0.5, ("ekx",), res["downstream"]["rows"][2])
    assert d["recommendation"] == json.loads(json.dumps(want))
    # The view is transparent: a plain fit from the cache's path ends at the lossless row's figures.
    s = fit_encoders(caches["lossless"], tmp_path / "enc", FitConfig(**d["config"]["fit"]), progress=False)
    fvu = np.mean([v["val_fvu"] for v in s["layers"].values()])
    assert fvu == pytest.approx(lossless["val_fvu"], rel=1e-6)


def test_downstream_refuses_samples_that_are_not_the_caches(tiny):
    from kcache.data.synth import synth_samples

    dec, _samples, caches, _ = tiny
    with pytest.raises(ValueError, match="none of the 3 test samples"):
        bench_store_downstream(caches["lossless"], synth_samples(6, seed=99).slice(0, 0), decoder=dec,
                               progress=False, log=lambda *a: None)


# ---------------------------------------------------------------------------------------------
# pure pieces


def _row(spec, nbytes, ekx, oracle=0.0):
    return {"storage": spec, "bytes_per_token_layer": nbytes, "ppl_change": {"ekx": ekx, "oracle": oracle}}


def test_recommend_picks_the_cheapest_option_within_tolerance():
    rows = [_row("lossless", 1000, 0.0), _row("bitround:6", 800, 0.002), _row("bitround:4", 600, -0.009),
            _row("int8", 500, 0.011, 0.5), _row("bitround:1", 350, None)]
    r = recommend(rows, 0.01)
    assert r["recommended"] == "bitround:4"  # a decrease counts by its size too
    assert r["within"] == ["lossless", "bitround:6", "bitround:4"]
    assert set(r["not_within"]) == {"int8", "bitround:1"}
    assert "+1.10%" in r["not_within"]["int8"] and "not measured" in r["not_within"]["bitround:1"]
    assert r["max_ppl_change"] == 0.01 and r["judged_on"] == ["ekx"]
    # Judged on the oracle too, int8 is out for a second reason; the boundary itself is within.
    assert recommend(rows, 0.011, ("ekx", "oracle"))["recommended"] == "bitround:4"
    assert recommend(rows, 0.011)["recommended"] == "int8"
    # Ties in size go to the first listed.
    assert recommend([_row("a", 10, 0.0), _row("b", 10, 0.0)], 0.01)["recommended"] == "a"


def test_recommend_warns_when_a_rerun_moves_more_than_the_tolerance():
    rows = [_row("lossless", 1000, 0.0, 0.0), _row("int8", 500, 0.005, 0.02)]
    quiet = recommend(rows, 0.01, control=_row("seed 1", 1000, 0.002, 0.0))
    assert quiet["recommended"] == "int8" and "warning" not in quiet
    loud = recommend(rows, 0.01, control=_row("seed 1", 1000, -0.01, 0.0))  # at the tolerance: already noise
    assert loud["recommended"] == "int8" and "-1.00%" in loud["warning"] and "run-to-run" in loud["warning"]
    # Only judged perplexities count: the oracle does not depend on the seed.
    assert "warning" not in recommend(rows, 0.03, ("oracle",), control=_row("seed 1", 1000, -0.05, 0.0))


def test_recommend_none_within_tolerance():
    r = recommend([_row("bitround:4", 600, 0.02), _row("int8", 500, -0.05)], 0.01)
    assert r["recommended"] is None and r["within"] == [] and list(r["not_within"]) == ["bitround:4", "int8"]
    assert recommend([], 0.01)["recommended"] is None


def test_table_rows_changes_are_against_the_reference():
    sizes = {s: {"bytes_per_token_layer": b, "bytes_per_value": b / 4, "relative_rmse": e}
             for s, b, e in (("lossless", 8.0, 0.0), ("int8", 4.0, 0.02))}
    runs = {"lossless": {"val_fvu": 0.9, "val_fvu_stored": 0.9, "ppl": {"x": 30.0, "ekx": 20.0, "oracle": 10.0}},
            "int8": {"val_fvu": 0.95, "val_fvu_stored": 1.0, "ppl": {"ekx": 21.0, "oracle": 9.0}},
            "bitround:1": {"val_fvu": 1.0, "val_fvu_stored": 1.0, "ppl": {"ekx": 20.0, "oracle": 10.0}},
            "seed 1": {"val_fvu": 0.8, "val_fvu_stored": 0.8, "ppl": {"ekx": 19.0}, "sizes": "lossless"}}
    rows = table_rows(sizes, runs)
    # An option without sizes (skipped) is left out; a run may borrow another's sizes.
    assert [r["storage"] for r in rows] == ["lossless", "int8", "seed 1"]
    assert rows[2]["bytes_per_token_layer"] == 8.0 and rows[2]["ppl_change"] == pytest.approx({"ekx": -0.05})
    assert rows[0]["ppl_change"] == {"x": 0.0, "ekx": 0.0, "oracle": 0.0}
    assert rows[1]["val_fvu_change"] == pytest.approx(0.05) and rows[1]["val_fvu_stored_change"] == pytest.approx(0.1)
    assert rows[1]["ppl_change"] == pytest.approx({"ekx": 0.05, "oracle": -0.1})
    assert relative_change(1.0, 0.0) is None and relative_change(float("nan"), 1.0) is None
    assert relative_change(None, 1.0) is None and relative_change(3.0, 2.0) == 0.5


def test_option_list_puts_the_reference_first_once():
    assert [s for s, _ in option_list(("int8", "BITROUND:4", "lossless", "int8"))] == ["lossless", "int8", "bitround:4"]
    with pytest.raises(ValueError, match="int4"):
        option_list(("int4",))


@pytest.mark.parametrize("text,want", [("1%", 0.01), (" 0.5 % ", 0.005), ("0.01", 0.01), ("0", 0.0), ("0%", 0.0),
                                       ("150%", 1.5)])
def test_parse_tolerance(text, want):
    assert parse_tolerance(text) == pytest.approx(want)


@pytest.mark.parametrize("text,fragment", [("abc", "not a number"), ("", "not a number"), ("1", "ambiguous"),
                                           ("-1%", ">= 0"), ("nan", ">= 0"), ("inf%", ">= 0"), ("1%%", "not a number")])
def test_parse_tolerance_rejects_with_the_accepted_forms(text, fragment):
    with pytest.raises(ValueError, match="--max-ppl-change") as e:
        parse_tolerance(text)
    assert fragment in str(e.value) and "1%" in str(e.value)


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="--judge"):
        DownstreamConfig(judge=("ekx", "accuracy"))
    with pytest.raises(ValueError, match="--judge"):
        DownstreamConfig(judge=())
    with pytest.raises(ValueError, match="--max-ppl-change"):
        DownstreamConfig(max_ppl_change=-0.01)
    with pytest.raises(ValueError, match="--steps"):
        DownstreamConfig(steps=0)


@pytest.mark.parametrize("extra,fragment", [
    (["--max-ppl-change", "abc"], "--max-ppl-change 'abc': not a number"),
    (["--max-ppl-change", "2"], "ambiguous"),
    (["--judge", "bleu"], "--judge"),
    ([], "--downstream needs --samples"),
])
def test_cli_reports_bad_downstream_input_before_any_work(tmp_path, extra, fragment):
    args = ["bench", "store", "--cache", str(tmp_path / "missing.zarr"), "--downstream", *extra]
    if extra:
        args += ["--samples", str(tmp_path / "missing.parquet")]
    r = CliRunner().invoke(app, args, terminal_width=300)
    assert r.exit_code == 2, (r.output, r.exception)
    lines = [l for l in r.output.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and fragment in lines[0], r.output
    assert not (tmp_path / "docs").exists()
