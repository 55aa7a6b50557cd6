"""Lossy storage options (kcache/cache/lossy.py) and ``kcache bench store``: properties, no timings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kcache.cache.lossy import (
    ErrorAccumulator,
    bitround_float16,
    decode_block,
    dequantize_int8_rows,
    encode_block,
    parse_storage,
    quantize_int8_rows,
    storage_spec,
)

ALL_F16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # every float16 bit pattern
FINITE = ALL_F16[np.isfinite(ALL_F16)]
MAX_F16 = np.float16(65504)


def _exponent(x: np.ndarray) -> np.ndarray:
    """Unbiased exponent of float16 values from their bits (-14 for subnormals and zero)."""
    biased = (x.view(np.uint16) >> 10) & 0x1F
    return np.maximum(biased.astype(np.int64), 1) - 15


# --------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("spec, want", [
    ("lossless", {"kind": "lossless"}),
    ("int8", {"kind": "int8"}),
    ("bitround:1", {"kind": "bitround", "keepbits": 1}),
    ("bitround:9", {"kind": "bitround", "keepbits": 9}),
    (" Bitround:6 ", {"kind": "bitround", "keepbits": 6}),
])
def test_parse_storage(spec, want):
    assert parse_storage(spec) == want
    assert parse_storage(storage_spec(want)) == want


@pytest.mark.parametrize("spec", ["bitround:0", "bitround:10", "bitround:", "bitround:x", "bitround:-3", "int4", "",
                                  "float8"])
def test_parse_storage_rejects_and_lists_valid(spec):
    with pytest.raises(ValueError) as e:
        parse_storage(spec)
    msg = str(e.value)
    assert repr(spec) in msg
    for v in ("lossless", "bitround", "int8"):
        assert v in msg


# --------------------------------------------------------------------------------------------- bitround


@pytest.mark.parametrize("keepbits", range(1, 10))
def test_bitround_keeps_exactly_keepbits_and_bounds_error(keepbits):
    r = bitround_float16(FINITE, keepbits)
    assert r.dtype == np.float16 and r.shape == FINITE.shape
    drop = 10 - keepbits
    assert not (r.view(np.uint16) & ((1 << drop) - 1)).any(), "dropped mantissa bits must be zero"
    assert np.isfinite(r).all(), "a finite value became inf/NaN"
    err = np.abs(r.astype(np.float64) - FINITE.astype(np.float64))
    bound = np.exp2(_exponent(FINITE) - keepbits - 1.0)
    # The only values allowed past half a kept ulp are those clamped below 65504 instead of rounding to inf.
    top = float((MAX_F16.view(np.uint16) & np.uint16((0xFFFF << drop) & 0xFFFF)).view(np.float16))
    clamped = np.abs(r.astype(np.float64)) == top
    assert (err[~clamped] <= bound[~clamped]).all()
    assert (err[clamped] < 2 * bound[clamped]).all()
    # Sign is preserved (zeros included) and the rounding is monotone.
    assert (np.signbit(r) == np.signbit(FINITE)).all()
    pos = np.sort(FINITE[FINITE >= 0])
    assert (np.diff(bitround_float16(pos, keepbits).astype(np.float64)) >= 0).all()


@pytest.mark.parametrize("keepbits", [1, 4, 6, 8, 9])
def test_bitround_ties_to_even_matches_float64_reference(keepbits):
    ulp = np.exp2(_exponent(FINITE) - float(keepbits))
    ref = np.round(FINITE.astype(np.float64) / ulp) * ulp  # np.round: half to even
    x, ref = FINITE[np.abs(ref) <= 65504], ref[np.abs(ref) <= 65504]  # not the values clamped below inf
    np.testing.assert_array_equal(bitround_float16(x, keepbits).astype(np.float64), ref)


@pytest.mark.parametrize("keepbits", [1, 5, 9])
def test_bitround_max_finite_special_values_and_idempotence(keepbits):
    special = np.array([65504, -65504, 65472, np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 6e-8, -6e-8],
                       dtype=np.float16)
    r = bitround_float16(special, keepbits)
    assert np.isfinite(r[:3]).all() and r[0] > 0 and r[1] < 0
    assert r[3] == np.inf and r[4] == -np.inf
    assert np.isnan(r[5:7]).all()
    assert not (r[5:7].view(np.uint16) & ((1 << (10 - keepbits)) - 1)).any()
    assert r[7] == 0 and not np.signbit(r[7]) and r[8] == 0 and np.signbit(r[8])
    np.testing.assert_array_equal(bitround_float16(ALL_F16, keepbits).view(np.uint16),
                                  bitround_float16(bitround_float16(ALL_F16, keepbits), keepbits).view(np.uint16))
    assert not np.isinf(bitround_float16(FINITE, keepbits)).any()


def test_bitround_rejects_wrong_dtype_and_keepbits():
    with pytest.raises(TypeError):
        bitround_float16(np.zeros(3, np.float32), 4)
    with pytest.raises(ValueError):
        bitround_float16(np.zeros(3, np.float16), 0)
    x = np.arange(10, dtype=np.float16)
    np.testing.assert_array_equal(bitround_float16(x, 10), x)


# --------------------------------------------------------------------------------------------- int8


def test_int8_roundtrip_error_at_most_half_a_step():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 48)) * np.exp(rng.uniform(-8, 8, (64, 1)))).astype(np.float32)
    x[3] = 0.0
    x[5, 7] = 1e4  # an outlier row: its step is large, the others are unaffected
    q, scale = quantize_int8_rows(x)
    assert q.dtype == np.int8 and q.shape == x.shape and scale.dtype == np.float32 and scale.shape == (64,)
    assert q.min() >= -127 and q.max() <= 127
    assert scale[3] == 0 and not q[3].any()
    np.testing.assert_allclose(scale, np.abs(x).max(1) / 127, rtol=1e-6)
    assert (np.abs(q).max(1)[scale > 0] == 127).all(), "each non-zero row uses the full range"
    back = dequantize_int8_rows(q, scale)
    assert back.dtype == np.float32 and back.shape == x.shape
    err = np.abs(back.astype(np.float64) - x)
    assert (err <= scale[:, None] * (0.5 + 1e-5) + 1e-30).all()
    assert not back[3].any()


def test_int8_rounds_half_to_even_and_is_symmetric():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0]], np.float32)  # scale 1
    q, scale = quantize_int8_rows(x)
    assert scale[0] == 1.0
    np.testing.assert_array_equal(q[0], [127, 0, 2, 2, 0, -2, -127])
    np.testing.assert_array_equal(quantize_int8_rows(-x)[0], -q)


def test_int8_edge_shapes_and_errors():
    q, s = quantize_int8_rows(np.zeros((0, 8), np.float32))
    assert q.shape == (0, 8) and s.shape == (0,)
    with pytest.raises(ValueError):
        quantize_int8_rows(np.array([[1.0, np.inf]], np.float32))
    with pytest.raises(ValueError):
        quantize_int8_rows(np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        dequantize_int8_rows(np.zeros((2, 3), np.int8), np.zeros(3, np.float32))


# --------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("spec", ["lossless", "bitround:8", "bitround:3", "int8"])
def test_encode_decode_block(spec):
    st = parse_storage(spec)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((40, 32)) * 3).astype(np.float32)
    enc = encode_block(x, st, "float16")
    assert set(enc) == ({"values", "scale"} if spec == "int8" else {"values"})
    assert enc["values"].dtype == (np.int8 if spec == "int8" else np.float16)
    back = decode_block(enc, st, "float16")
    assert back.dtype == np.float32 and back.shape == x.shape
    if spec == "lossless":
        np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))
    elif spec.startswith("bitround"):
        np.testing.assert_array_equal(back, bitround_float16(x.astype(np.float16), st["keepbits"]).astype(np.float32))


def test_encode_block_dtype_rules():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="float16"):
        encode_block(x, parse_storage("bitround:6"), "float32")
    assert encode_block(x, parse_storage("lossless"), "float32")["values"].dtype == np.float32
    with pytest.raises(ValueError, match="65504"):
        encode_block(x * 1e5, parse_storage("bitround:6"), "float16")  # overflow is an error, never inf


# --------------------------------------------------------------------------------------------- errors


def test_error_accumulator_state_roundtrip_and_analytic_error():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((30, 16)).astype(np.float32)
    b = rng.standard_normal((20, 16)).astype(np.float32)
    # A perturbation of exactly eps * reference has relative RMSE eps, whatever the data.
    eps = 0.01
    acc = ErrorAccumulator([3, 4])
    acc.update(3, a[:10], a[:10] * (1 + eps))
    state = json.loads(json.dumps(acc.state()))  # as it would come back from commits.jsonl
    resumed = ErrorAccumulator([3, 4], state)
    for x in (acc, resumed):
        x.update(3, a[10:], a[10:] * (1 + eps))
        x.update(4, b, b + 0.5)
    assert resumed.summary() == acc.summary()
    assert ErrorAccumulator.from_state(acc.state()).summary() == acc.summary()
    s = acc.summary()
    assert set(s) == {"3", "4"}
    a64 = a.astype(np.float64)
    want3 = math.sqrt(np.sum((a * np.float32(1 + eps) - a).astype(np.float64) ** 2) / np.sum(a64**2))
    assert s["3"]["relative_rmse"] == pytest.approx(want3, rel=1e-12)
    assert s["3"]["relative_rmse"] == pytest.approx(eps, rel=1e-5)
    # A constant offset c: sqrt(n c^2 / sum b^2).
    err4 = (b + np.float32(0.5)).astype(np.float64) - b
    assert s["4"]["relative_rmse"] == pytest.approx(math.sqrt(np.sum(err4**2) / np.sum(b.astype(np.float64) ** 2)),
                                                    rel=1e-12)
    assert s["4"]["max_abs_error"] == pytest.approx(0.5, abs=1e-6)
    json.dumps(acc.summary())


def test_error_accumulator_zeros_and_bad_state():
    acc = ErrorAccumulator([0])
    acc.update(0, np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    assert acc.summary() == {"0": {"relative_rmse": 0.0, "max_abs_error": 0.0}}
    with pytest.raises(ValueError):
        ErrorAccumulator([1], {"2": {"sse": 0, "ssr": 0, "max_abs": 0, "n": 0}})
    with pytest.raises(ValueError):
        acc.update(0, np.zeros((2, 3)), np.zeros((3, 2)))


# --------------------------------------------------------------------------------------------- bench


@pytest.mark.parametrize("tiny_decoder", ["llama"], indirect=True)
def test_bench_store_on_a_small_cache(tiny_decoder, demo_samples, tmp_path):
    from kcache.bench.storage import bench_store
    from kcache.extract import ExtractConfig, extract

    extract(tiny_decoder, demo_samples, tmp_path / "c.zarr", ExtractConfig(layers="1-2"), progress=False)
    out = tmp_path / "bench" / "store.json"
    res = bench_store(tmp_path / "c.zarr", rows=10_000, out_json=out, out_png=tmp_path / "bench" / "store.png",
                      repeats=1, progress=False, log=lambda *a: None)
    doc = json.loads(out.read_text())
    assert doc["layers"] == [1, 2] and doc["hidden"] == 64 and doc["rows"] == res["rows"] > 0
    for key in ("platform", "cpu_count", "torch", "zarr"):
        assert key in doc["machine"]
    r = doc["results"]
    assert list(r) == ["lossless", "bitround:8", "bitround:6", "bitround:4", "int8"]
    assert r["lossless"]["relative_rmse"] == 0 and r["lossless"]["max_abs_error"] == 0
    assert r["int8"]["bytes_per_token_layer"] < r["lossless"]["bytes_per_token_layer"]
    # Fewer kept bits: never more error, and the zeroed bits compress.
    assert 0 < r["bitround:8"]["relative_rmse"] <= r["bitround:6"]["relative_rmse"] <= r["bitround:4"]["relative_rmse"]
    assert r["bitround:4"]["bytes_per_token_layer"] < r["lossless"]["bytes_per_token_layer"]
    for x in r.values():
        assert x["ratio_vs_float32"] == pytest.approx(2 * x["ratio_vs_float16"])
        assert x["bytes_per_token_layer"] * doc["rows"] * 2 == pytest.approx(x["bytes"])
        assert x["write_mb_per_s"] > 0 and x["read_mb_per_s"] > 0
        assert set(x["per_layer"]) == {"1", "2"}
    assert (tmp_path / "bench" / "store.png").stat().st_size > 0


def test_bench_store_rejects_bad_option_before_work(tmp_path):
    from kcache.bench.storage import bench_store

    with pytest.raises(ValueError, match="int4"):
        bench_store(tmp_path / "missing.zarr", options=("lossless", "int4"), progress=False, log=lambda *a: None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_encoding_rows_refuses_non_finite_values_and_float16_overflow(dtype):
    import torch

    from kcache.cache.format import CacheError, encode_rows

    ok = torch.tensor([[1.5, -2.0], [0.0, 3.0]])
    assert encode_rows(ok, dtype).shape == (2, 2)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(CacheError, match="layer 4: non-finite"):
            encode_rows(torch.tensor([[1.0, bad]]), dtype, "layer 4")
    big = torch.tensor([[7.0e4, 1.0]])
    if dtype == "float16":
        with pytest.raises(CacheError, match="outside the float16 range"):
            encode_rows(big, dtype)
    else:
        assert encode_rows(big, dtype).shape == (1, 2)
