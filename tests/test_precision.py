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
    assert all(r["steps_only_per_second"] > 0 for r in res["runs"])  # step 1 to step 2
    assert res["speedup_steps_only"] == pytest.approx(
        res["runs"][1]["steps_only_per_second"] / res["runs"][0]["steps_only_per_second"])
    assert res["speedup"] == pytest.approx(res["runs"][1]["steps_per_second"] / res["runs"][0]["steps_per_second"])
    assert json.loads((tmp_path / "fit.json").read_text())["runs"][1]["compute"] == "bfloat16"
    assert (tmp_path / "fit.png").stat().st_size > 0
    assert any("bfloat16 vs float32" in l for l in lines)


def test_model_dtype_auto_follows_the_hardware_and_the_override(monkeypatch):
    from kcache.models import resolve_dtype

    monkeypatch.delenv("KCACHE_COMPUTE", raising=False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype(None, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # one flag away
    monkeypatch.setenv("KCACHE_COMPUTE", "float32")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    monkeypatch.delenv("KCACHE_COMPUTE")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setenv("KCACHE_COMPUTE", "bfloat16")  # one switch for both dtypes, either way
    assert resolve_dtype(None, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("KCACHE_COMPUTE", "fp16")
    with pytest.raises(ValueError, match="KCACHE_COMPUTE='fp16'"):
        resolve_dtype(None, torch.device("cpu"))


@pytest.mark.parametrize("shape", [dict(hidden_size=32, num_heads=4, intermediate_size=48, num_layers=2),
                                   dict(hidden_size=24, num_heads=3, intermediate_size=40, num_layers=3)])
def test_the_batched_stack_forward_is_the_per_encoder_forward(shape):
    """One batched pass over all encoders (kcache.encoders.stacked_forward) computes what each
    encoder computes alone, with and without the shift to input positions, and the same gradients."""
    from kcache.encoders import EncoderConfig, EncoderStack

    stack = EncoderStack(EncoderConfig(d_model=40, **shape), [1, 3, 4], seed=2)
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_(0.0, 0.2)  # up_proj starts at zero: give every weight something to do
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 11, 40, generator=g)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, 8:] = False
    shifts = torch.tensor([2, 4, 1])
    # length 9 reaches past the end of row 1 (shift 4): those rows are zero on both paths
    for kw in ({}, {"shifts": shifts, "length": 7}, {"shifts": shifts, "length": 9}, {"shifts": shifts}):
        alone = {l: stack.encoder(l)(emb, valid, **kw) for l in stack.layers}
        batched = stack(emb, valid, **kw)
        for l in stack.layers:
            torch.testing.assert_close(batched[l], alone[l], rtol=1e-5, atol=1e-6)
    sum(o.square().sum() for o in stack(emb, valid, shifts=shifts, length=7).values()).backward()
    grads = [p.grad.clone() for p in stack.parameters()]
    stack.zero_grad()
    sum(stack.encoder(l)(emb, valid, shifts=shifts, length=7).square().sum() for l in stack.layers).backward()
    for a, b in zip(grads, (p.grad for p in stack.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kept_stacked_weights_train_exactly_as_stacking_every_step():
    """EncoderStack keeps its stacked weights (encoders.FusedWeights; the parameters view them).
    Forward, gradients (two accumulated backwards, then again after zero_grad), AdamW updates and
    the rebuild after load_state_dict(assign=True), requires_grad_ and a dtype change equal, bit
    for bit, stacking the parameters afresh at every forward."""
    from kcache.encoders import EncoderConfig, EncoderStack, stacked_forward
    from kcache.train import OptimConfig, adamw, optimizer_step

    cfg = EncoderConfig(d_model=40, hidden_size=32, num_heads=4, intermediate_size=48, num_layers=2)
    kept, fresh = EncoderStack(cfg, [1, 3, 4], seed=2), EncoderStack(cfg, [1, 3, 4], seed=2)
    for s in (kept, fresh):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in s.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 11, 40, generator=g)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, 8:] = False
    shifts = torch.tensor([2, 4, 1])

    def run(s, dtype=torch.float32):
        if s is kept:
            out = s(emb.to(dtype), valid, shifts=shifts, length=7)
            return torch.stack([out[l] for l in s.layers])
        return stacked_forward([s.encoder(l) for l in s.layers], emb.to(dtype), valid, shifts=shifts, length=7)

    opts = {id(s): adamw(s.parameters(), OptimConfig(lr_max=1e-2)) for s in (kept, fresh)}
    params = {id(s): {l: list(s.encoder(l).parameters()) for l in s.layers} for s in (kept, fresh)}
    with torch.inference_mode():  # a first forward in inference mode must not leave inference tensors
        run(kept)
    ptrs = [p.data_ptr() for p in kept.parameters()]
    for step in range(4):
        for s in (kept, fresh):
            if step % 2:  # gradients zeroed in place (not None), then accumulated into
                run(s).sum().backward()
                opts[id(s)].zero_grad(set_to_none=False)
            for _micro in range(2):
                run(s).square().sum().backward()
        for a, b in zip(kept.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)
        for s in (kept, fresh):  # per-encoder clipping, then AdamW
            optimizer_step(opts[id(s)], params[id(s)], 0.5, 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(kept.parameters(), fresh.parameters(), strict=True))
    assert torch.equal(run(kept), run(fresh))
    assert [p.data_ptr() for p in kept.parameters()] == ptrs  # the kept weights were reused, not rebuilt
    qkv = kept.stacked_weights()["0.qkv"]  # (E, 3h, h): encoder 3's k rows are what its k.weight views
    assert kept.encoder(3).blocks[0].k.weight.data_ptr() == qkv[1, 32:64].data_ptr()

    # a frozen encoder among trained ones: it gets no gradient, the others theirs
    kept.encoder(1).requires_grad_(False)
    fresh.encoder(1).requires_grad_(False)
    for s in (kept, fresh):
        s.zero_grad()
        run(s).sum().backward()
    for a, b in zip(kept.parameters(), fresh.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))
    assert all(p.grad is None for p in kept.encoder(1).parameters())
    assert all(p.grad is not None for p in kept.encoder(3).parameters())
    kept.requires_grad_(True)
    fresh.requires_grad_(True)

    # replaced parameters (assign=True), frozen ones, and another dtype: rebuilt, still equal
    new = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in fresh.state_dict().items()}
    kept.load_state_dict(new, assign=True)
    fresh.load_state_dict(new)
    kept.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(run(kept), run(fresh))
    kept.requires_grad_(True)
    for s in (kept, fresh):
        s.zero_grad()
        run(s).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(kept.parameters(), fresh.parameters(), strict=True))
    kept.double()
    fresh.double()
    with torch.no_grad():
        got = run(kept, torch.float64)
        assert got.dtype == torch.float64 and torch.equal(got, run(fresh, torch.float64))


def test_bench_finetune_runs_each_decoder_dtype_side_by_side(saved_model, tmp_path):
    from kcache.bench.stages import bench_finetune

    lines = []
    res = bench_finetune(str(saved_model), n=40, steps=4, batch_size=4, layers="1-2", dtypes=("float32", "bfloat16"),
                         out=tmp_path / "ft.json", log=lines.append)
    assert [r["model_dtype"] for r in res["runs"]] == ["float32", "bfloat16"]
    assert res["runs"][0]["compute"] == "float32" and all(r["steps"] == 4 for r in res["runs"])
    assert res["ratio_seconds_per_step"] == pytest.approx(
        res["runs"][1]["seconds_per_step"] / res["runs"][0]["seconds_per_step"])
    assert res["val_nll_change"] == pytest.approx(res["runs"][1]["val_nll_end"] - res["runs"][0]["val_nll_end"])
    assert json.loads((tmp_path / "ft.json").read_text())["steps"] == 4 and (tmp_path / "ft.png").exists()
    assert any("seconds per step" in line for line in lines)


def test_bench_extract_compares_decoder_dtypes(saved_model, tmp_path):
    from kcache.bench.stages import bench_extract_dtypes

    res = bench_extract_dtypes(str(saved_model), ("bfloat16", "float32"), n=12, layers="1-2", out=tmp_path / "x.json",
                               log=lambda m: None)
    assert [res["runs"][d]["model_dtype"] for d in ("bfloat16", "float32")] == ["bfloat16", "float32"]
    got = res["ratio_bfloat16_vs_float32"]
    assert got == pytest.approx(res["runs"]["bfloat16"]["seconds"]["kcache_extract"]
                                / res["runs"]["float32"]["seconds"]["kcache_extract"])
    assert (tmp_path / "x.png").exists()


def test_training_through_a_bf16_cpu_decoder_uses_eager_attention_and_restores_it(saved_model):
    from kcache.models import backward_attention, load_decoder

    for dtype, inside in (("bfloat16", "eager"), ("float32", "sdpa")):
        dec = load_decoder(str(saved_model), device="cpu", dtype=dtype)
        assert dec.model.config._attn_implementation == "sdpa"
        with backward_attention(dec):
            assert dec.model.config._attn_implementation == inside
        assert dec.model.config._attn_implementation == "sdpa"


def test_an_encoder_needs_a_block_and_whole_heads():
    from kcache.encoders import EncoderConfig

    with pytest.raises(ValueError, match="num_layers must be >= 1, not 0"):
        EncoderConfig(d_model=8, num_layers=0)
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        EncoderConfig(d_model=8, hidden_size=32, num_heads=3)
