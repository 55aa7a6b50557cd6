"""Compute precision (kcache.precision): bf16 autocast where the hardware has it, float32 master weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_fit import TINY, tiny_cache  # noqa: F401  (module-scoped fixture)

from kcache import precision
from kcache.encoders import attend, attention_mask
from kcache.fit import FitConfig, fit_encoders


def test_auto_follows_the_hardware_and_the_override(monkeypatch):
    monkeypatch.delenv("KCACHE_COMPUTE", raising=False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve_compute("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_compute("auto", "cpu") == torch.float32
    assert precision.resolve_compute(None, "cuda") == torch.bfloat16
    assert precision.resolve_compute("float32", "cuda") == torch.float32  # explicit wins over the hardware
    monkeypatch.setenv("KCACHE_COMPUTE", "bfloat16")
    assert precision.resolve_compute("auto", "cpu") == torch.bfloat16  # the override replaces "auto" only
    assert precision.resolve_compute("float32", "cpu") == torch.float32
    monkeypatch.delenv("KCACHE_COMPUTE")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    # frozen float32 weights (a float32 decoder in finetune) would be re-cast at every op on CPU
    assert precision.resolve_compute("auto", "cpu", frozen=torch.float32) == torch.float32
    assert precision.resolve_compute("auto", "cpu", frozen=torch.bfloat16) == torch.bfloat16
    assert precision.resolve_compute("auto", "cuda", frozen=torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="compute='fp8'"):
        precision.resolve_compute("fp8", "cpu")


def test_float32_compute_is_no_autocast_at_all():
    ctx = precision.autocast_for("cpu", "float32")
    with ctx():
        y = torch.randn(4, 8) @ torch.randn(8, 3)
    assert y.dtype == torch.float32
    with precision.autocast_for("cpu", "bfloat16")():
        y = torch.randn(4, 8) @ torch.randn(8, 3)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_equals_sdpa_with_padding(dtype):
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 3, 4, 7, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 5:] = False  # right padding
    valid[2, :2] = False  # left padding: the first queries see no valid key
    mask = attention_mask(valid, n)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    got = attend(q, k, v, mask).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    assert torch.isfinite(got).all()


def test_bf16_fit_tracks_float32(tiny_cache, tmp_path):  # noqa: F811
    """Same steps, same batches: bf16 compute lands on the same validation FVU within a small margin."""
    out = {}
    for comp in ("float32", "bfloat16"):
        cfg = FitConfig(epochs=3, batch_size=4, lr_max=1e-3, eval_every=1000, compute=comp, **TINY)
        out[comp] = fit_encoders(tiny_cache, tmp_path / comp, cfg, progress=False)
    for layer, r in out["float32"]["layers"].items():
        b = out["bfloat16"]["layers"][layer]
        assert r["val_fvu"] < r["fvu_zero_baseline"]  # it learned something, so the comparison means something
        assert abs(b["val_fvu"] - r["val_fvu"]) < 0.03 * r["val_fvu"], (layer, r["val_fvu"], b["val_fvu"])
    cfg = json.loads((tmp_path / "bfloat16" / "config.json").read_text())
    assert cfg["training"]["config"]["compute"] == "bfloat16"  # the bundle records what it was trained with


def test_bench_fit_runs_each_precision_side_by_side(tiny_cache, tmp_path):  # noqa: F811
    from kcache.bench.stages import bench_fit

    lines = []
    res = bench_fit(tiny_cache, steps=3, batch_size=4, out=tmp_path / "fit.json", log=lines.append,
                    computes=("float32", "bfloat16"))
    assert [r["resolved"] for r in res["runs"]] == ["float32", "bfloat16"]
    assert all(r["steps"] == 3 and r["steps_per_second"] > 0 for r in res["runs"])
    assert res["speedup"] == pytest.approx(res["runs"][1]["steps_per_second"] / res["runs"][0]["steps_per_second"])
    assert json.loads((tmp_path / "fit.json").read_text())["runs"][1]["compute"] == "bfloat16"
    assert (tmp_path / "fit.png").stat().st_size > 0
    assert any("bfloat16 vs float32" in l for l in lines)
