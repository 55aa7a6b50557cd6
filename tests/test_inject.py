"""Stage three: the injection runtime (oracle exactness, batch/padding invariance, generation with
the decoder KV cache, fingerprint checks, kcache generate)."""

from __future__ import annotations

import pytest
import torch

from kcache.align import TemplateSpec, encode_sample, pad_right
from kcache.cache import Cache
from kcache.data.synth import synth_records, synth_samples
from kcache.encoders import BundleError, EncoderConfig, EncoderStack, save_bundle
from kcache.extract import ExtractConfig, capture, extract, run_blocks
from kcache.inject import InjectError, Injector, encoder_additions, generate_tokens

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def _stack(decoder, layers=(1, 2), std=0.5, seed=0):
    stack = EncoderStack(EncoderConfig(d_model=decoder.layers.hidden_size, **SMALL), list(layers), seed=seed)
    g = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        for enc in stack.encoders.values():
            enc.up_proj.weight.normal_(0.0, std, generator=g)
    return stack


def _injector(decoder, **kw):
    stack = _stack(decoder, **kw)
    return Injector.from_stack(decoder, stack, {"site": "mlp", "layers": stack.layers,
                                                "model": decoder.fingerprint.to_dict()})


def _encoded(decoder, n=4, seed=1, with_target=True):
    out = []
    for i, r in enumerate(synth_records(n, seed=seed)):
        e = encode_sample(decoder.tokenizer, r["knowledge"][: 1 + i % len(r["knowledge"])], r["source"],
                          r["target"] if with_target else "", TemplateSpec(), 512)
        out.append(e)
    return [e.k_ids for e in out], [e.x_ids for e in out]


# ---------------------------------------------------------------------------------------------
# oracle: injecting cached deltas reproduces pass B


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_oracle_injection_reproduces_pass_b(tiny_decoder, tmp_path, site):
    layer = 2
    extract(tiny_decoder, synth_samples(8, seed=7), tmp_path / "c.zarr",
            ExtractConfig(layers=[layer], site=site, dtype="float32", token_budget=256, sink=0), progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    oracle = Injector.oracle(tiny_decoder, cache)
    assert oracle.site == site and oracle.layers == [layer] and oracle.info.source == "oracle"
    pad = tiny_decoder.tokenizer.pad_token_id
    samples = list(range(cache.num_samples))
    toks = [cache.encoder_tokens(i) for i in samples]
    x_ids = [t[s:].tolist() for t, s in toks]
    # pass B, one sample at a time
    act_b = []
    for t, s in toks:
        ids, mask = pad_right([t.tolist()], pad)
        with torch.no_grad(), capture(tiny_decoder, site, [layer], stop=False) as acts:
            run_blocks(tiny_decoder, ids, mask)
        act_b.append(acts[layer][0, s:].float())
    # the oracle, batched (mixed lengths, right-padded); capture registered after: sees the injected output
    add, covered = oracle.oracle_additions(samples, x_ids)
    assert covered == [len(x) for x in x_ids]
    ids, mask = pad_right(x_ids, pad)
    with torch.no_grad(), oracle.static(add), capture(tiny_decoder, site, [layer], stop=False) as acts:
        run_blocks(tiny_decoder, ids, mask)
    injected = acts[layer].float()
    with torch.no_grad(), capture(tiny_decoder, site, [layer], stop=False) as acts:
        run_blocks(tiny_decoder, ids, mask)
    plain = acts[layer].float()
    for i, x in enumerate(x_ids):
        n = len(x)
        err = (injected[i, :n] - act_b[i]).abs().max().item()
        scale = act_b[i].abs().max().item()
        assert err <= 1e-5 * scale, (i, err, scale)
        assert (plain[i, :n] - act_b[i]).abs().max().item() > 100 * (err + 1e-7)
    # hooks are gone after the context
    with torch.no_grad(), capture(tiny_decoder, site, [layer], stop=False) as acts:
        run_blocks(tiny_decoder, ids, mask)
    assert torch.equal(acts[layer].float(), plain)


def test_oracle_rows_cover_common_prefix_only(tiny_decoder, tmp_path):
    extract(tiny_decoder, synth_samples(3, seed=2), tmp_path / "c.zarr", ExtractConfig(layers=[1], dtype="float32"),
            progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    inj = Injector.oracle(tiny_decoder, cache)
    toks, s = cache.encoder_tokens(0)
    x = toks[s:].tolist()
    other = x[:3] + [x[3] + 1] + x[4:]
    add, covered = inj.oracle_additions([0, 0], [x, other])
    assert covered == [len(x), 3]
    assert add[1][1, 3:].abs().sum() == 0 and add[1][1, :3].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# batch and padding invariance


def test_injection_is_batch_and_padding_invariant(tiny_decoder):
    inj = _injector(tiny_decoder)
    k, x = _encoded(tiny_decoder, 4)
    assert len({len(a) for a in x}) > 1 and len({len(a) for a in k}) > 1  # mixed lengths
    batched = inj.forward(k, x)
    other_pad = inj.forward(k, x, pad_id=7)
    plain = tiny_decoder.model(input_ids=torch.tensor([x[0]])).logits[0]
    for i in range(4):
        n = len(x[i])
        alone = inj.forward([k[i]], [x[i]])[0]
        torch.testing.assert_close(batched[i, :n], alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(other_pad[i, :n], alone, atol=1e-4, rtol=1e-4)
    assert (inj.forward([k[0]], [x[0]])[0] - plain).abs().max() > 1e-2  # the injection does something
    # encoder padding: other pad ids, same additions; zero at padding positions
    a = encoder_additions(tiny_decoder, inj.stack, k, x, pad_id=0)
    b = encoder_additions(tiny_decoder, inj.stack, k, x, pad_id=5)
    for l in inj.layers:
        torch.testing.assert_close(a[l], b[l], atol=1e-5, rtol=1e-5)
        for i, xi in enumerate(x):
            assert a[l][i, len(xi):].abs().sum() == 0


def test_session_matches_one_shot_additions(tiny_decoder):
    """The incremental path (knowledge first, then x in the decoder's layout) adds what the
    one-shot shift_left path adds, for left padding too (one layer, so the MLP output moves by
    exactly the addition)."""
    inj = _injector(tiny_decoder, layers=(2,))
    k, x = _encoded(tiny_decoder, 3)
    one = inj.additions(k, x)
    from kcache.inject import pad_left

    ids, mask = pad_left(x, tiny_decoder.tokenizer.pad_token_id)
    seen = {}
    hook = tiny_decoder.layers.site_module("mlp", 2).register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))
    try:
        with torch.no_grad(), inj.session(k):
            tiny_decoder.model(input_ids=ids, attention_mask=mask)
        with_inj = seen["o"]
        tiny_decoder.model(input_ids=ids, attention_mask=mask)
        without = seen["o"]
    finally:
        hook.remove()
    n = ids.shape[1]
    for i, xi in enumerate(x):
        got = (with_inj - without)[i, n - len(xi):]
        torch.testing.assert_close(got, one[2][i, : len(xi)], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# generation with the KV caches


# Random tiny models have near-ties between their top logits (gaps of 1e-4 happen), so greedy
# tokens of two numerically different paths (KV cache vs recompute, batched vs alone, another
# thread count or CPU load) may legitimately differ. The paths are compared teacher-forced instead:
# each run's own tokens are fed through the recompute path, the logits of every step must agree
# within TOL, and the chosen token must be the reference argmax wherever the reference's top-2
# margin exceeds 2 * TOL (where it cannot flip by rounding).
TOL = 1e-4


class _RecordLogits:
    """A logits processor that records the scores of every generation step, unchanged."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.detach().float().clone())
        return scores


def _generate_recording(inj, k, x, steps, **kw):
    """``inj.generate`` (the code under test) -> (new tokens per sample, logits (B, steps, V))."""
    from transformers import LogitsProcessorList

    rec = _RecordLogits()
    tokens = inj.generate(k, x, max_new_tokens=steps, eos_token_id=None,
                          logits_processor=LogitsProcessorList([rec]), **kw)
    return tokens, torch.stack(rec.steps, 1)


def _teacher_forced(forward, x, new):
    """Recompute-path logits predicting each new token: rows len(x)-1 .. len(x)+len(new)-2 of forward(x + new)."""
    logits = forward(list(x) + list(new)).float()
    return logits[len(x) - 1 : len(x) - 1 + len(new)]


def _assert_matches_recompute(tokens, logits, ref, what):
    """``logits`` (steps, V) of a run that chose ``tokens`` agree with the recompute path's ``ref``."""
    err = (logits - ref).abs().max().item()
    assert err <= TOL, f"{what}: logits differ from the recompute path by {err:.2e} (> {TOL})"
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * TOL
    chosen, best = torch.tensor(tokens), ref.argmax(-1)
    assert torch.equal(chosen[decisive], best[decisive]), f"{what}: greedy token differs where the margin is decisive"
    return int(decisive.sum())


def test_generation_with_kv_cache_matches_recompute(tiny_decoder):
    inj = _injector(tiny_decoder, std=0.3)
    k, x = _encoded(tiny_decoder, 3, with_target=False)
    steps = 6  # eos_token_id=None: no early stop, every step is compared
    decisive = 0
    injected_vs_plain = 0.0
    for ki, xi in zip(k, x):
        def injected(seq, ki=ki):
            return inj.forward([ki], [seq])[0]

        cached, logits = _generate_recording(inj, [ki], [xi], steps)
        assert len(cached[0]) == steps
        decisive += _assert_matches_recompute(cached[0], logits[0], _teacher_forced(injected, xi, cached[0]),
                                              "KV cache")
        # without the decoder cache every step re-sends the sequence: the encoder cache rolls back
        nocache, logits = _generate_recording(inj, [ki], [xi], steps, use_cache=False)
        _assert_matches_recompute(nocache[0], logits[0], _teacher_forced(injected, xi, nocache[0]), "use_cache=False")
        # the injection changes the predictions (same tokens, through the plain decoder)
        with torch.no_grad():
            plain = _teacher_forced(lambda seq: tiny_decoder.model(input_ids=torch.tensor([seq])).logits[0], xi,
                                    cached[0])
        injected_vs_plain = max(injected_vs_plain,
                                (plain - _teacher_forced(injected, xi, cached[0])).abs().max().item())
    assert decisive >= steps, "too few decisive steps: the argmax check would be vacuous"
    assert injected_vs_plain > 1000 * TOL, "the injection should change the logits"
    # batch > 1 (left-padded): every row agrees with the recompute path on its own tokens
    batched, logits = _generate_recording(inj, k, x, steps)
    for i, (ki, xi) in enumerate(zip(k, x)):
        ref = _teacher_forced(lambda seq, ki=ki: inj.forward([ki], [seq])[0], xi, batched[i])
        _assert_matches_recompute(batched[i], logits[i], ref, f"batched row {i}")


def test_teacher_forced_check_catches_a_wrong_path(tiny_decoder):
    """The comparison above can fail: generation without injection does not match the injected recompute path."""
    inj = _injector(tiny_decoder, std=0.3)
    k, x = _encoded(tiny_decoder, 1, with_target=False)
    rec = _RecordLogits()
    from transformers import LogitsProcessorList

    plain = generate_tokens(tiny_decoder, x, 4, eos_token_id=None, logits_processor=LogitsProcessorList([rec]))[0]
    ref = _teacher_forced(lambda seq: inj.forward([k[0]], [seq])[0], x[0], plain)
    with pytest.raises(AssertionError, match="logits differ"):
        _assert_matches_recompute(plain, torch.stack(rec.steps, 1)[0], ref, "plain decoder")


def test_session_refuses_beam_search_and_foreign_batches(tiny_decoder):
    inj = _injector(tiny_decoder)
    k, x = _encoded(tiny_decoder, 2, with_target=False)
    with pytest.raises(InjectError, match="beam"):
        inj.generate(k, x, max_new_tokens=2, num_beams=2)
    with pytest.raises(InjectError, match="batch"):
        with torch.no_grad(), inj.session(k):
            tiny_decoder.model(input_ids=torch.tensor([x[0]]))


# ---------------------------------------------------------------------------------------------
# fingerprints


def test_fingerprint_mismatch_is_refused(tiny_decoder, tokenizer_nobos, tmp_path):
    from conftest import tiny_dec


    other = tiny_dec("llama", tokenizer_nobos, seed=1, name="tiny-other")
    stack = _stack(tiny_decoder)
    meta = {"site": "mlp", "layers": stack.layers, "model": other.fingerprint.to_dict()}
    with pytest.raises(InjectError) as e:
        Injector.from_stack(tiny_decoder, stack, meta)
    assert "tiny-other" in str(e.value) and tiny_decoder.fingerprint.name in str(e.value)
    bundle_meta = {"site": "mlp", "template": {"template": TemplateSpec.template, "separator": TemplateSpec.separator,
                                               "end": "eos"},
                   "max_length": 512, "model": other.fingerprint.to_dict(), "cache": None}
    save_bundle(tmp_path / "enc", stack, bundle_meta)
    with pytest.raises(BundleError, match="another model") as e:
        Injector.from_bundle(tiny_decoder, tmp_path / "enc")
    assert "tiny-other" in str(e.value) and tiny_decoder.fingerprint.name in str(e.value)
    # the right model loads it
    inj = Injector.from_bundle(other, tmp_path / "enc")
    assert inj.layers == stack.layers and inj.info.max_length == 512


# ---------------------------------------------------------------------------------------------
# kcache generate


def test_generate_command_end_to_end(tmp_path, monkeypatch, tokenizer_nobos):
    """A tiny model saved as a Hugging Face directory, a bundle for it, ``kcache generate --compare``."""
    import typer
    from conftest import make_model
    from typer.testing import CliRunner

    from kcache.cli import mount
    from kcache.generate import generate, side_by_side
    from kcache.models import load_decoder

    monkeypatch.setenv("KCACHE_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "tiny"
    make_model("llama", len(tokenizer_nobos)).save_pretrained(model_dir)
    tokenizer_nobos.save_pretrained(model_dir)
    dec = load_decoder(str(model_dir), device="cpu")
    stack = _stack(dec, std=0.3)
    meta = {"site": "mlp", "template": {"template": TemplateSpec.template, "separator": TemplateSpec.separator,
                                        "end": "eos"},
            "max_length": 256, "model": dec.fingerprint.to_dict(), "cache": None}
    save_bundle(tmp_path / "enc", stack, meta)

    g = generate(dec, Injector.from_bundle(dec, tmp_path / "enc"), "The capital of Zorbia is Quelt.",
                 "[USR] What is the capital of Zorbia? [SYS]", max_new_tokens=5, compare=True)
    assert g.plain is not None and g.in_context is not None and g.knowledge_tokens > 5
    assert len(g.tokens["injected"]) <= 5
    assert "│" in side_by_side(g.columns(), 90)

    app = typer.Typer()
    mount(app, names=("generate", "evaluate", "bench"))
    args = ["generate", "--model", str(model_dir), "--encoders", str(tmp_path / "enc"), "--knowledge",
            "The capital of Zorbia is Quelt.",
            "--prompt", "[USR] What is the capital of Zorbia? [SYS]", "--max-new-tokens", "4", "--compare",
            "--device", "cpu"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "D(x): no knowledge" in r.output and "D(K,x): knowledge in context" in r.output and "injected" in r.output
    r = CliRunner().invoke(app, args[:3] + ["--encoders", str(tmp_path / "missing")] + args[5:])
    assert r.exit_code == 2 and "error:" in r.output


def test_encoders_run_in_bf16_next_to_a_bf16_decoder(tiny_decoder, monkeypatch):
    """Injection at inference runs the encoders in the compute precision "auto" resolves to next to the
    decoder: bf16 autocast for a bf16 decoder where bf16 is native (forced here with KCACHE_COMPUTE), as
    fit and finetune train them; float32 for a float32 decoder or under KCACHE_COMPUTE=float32. The
    additions agree up to bf16 rounding."""
    import copy
    import dataclasses

    from kcache.inject import inference_autocast

    inj = _injector(tiny_decoder, layers=(1, 2))
    k, x = _encoded(tiny_decoder, 3)
    f32 = inj.additions(k, x)
    assert all(a.dtype == torch.float32 for a in f32.values())
    dec16 = dataclasses.replace(tiny_decoder, model=copy.deepcopy(tiny_decoder.model).to(torch.bfloat16))
    monkeypatch.setenv("KCACHE_COMPUTE", "float32")
    with inference_autocast(dec16):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv("KCACHE_COMPUTE", "bfloat16")
    with inference_autocast(dec16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with inference_autocast(tiny_decoder):
        assert not torch.is_autocast_enabled("cpu")
    from kcache.inject import encoder_additions

    b16 = encoder_additions(dec16, inj.stack, k, x, [1, 2], sink=inj.sink)
    for l in (1, 2):
        assert b16[l].dtype == torch.bfloat16
        scale = f32[l].abs().max()
        assert scale > 0
        torch.testing.assert_close(b16[l].float(), f32[l], atol=0.05 * float(scale), rtol=0.05)
