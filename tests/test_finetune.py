"""DIEKÆ 3.3 fine-tuning through the frozen decoder, and the finetune/evaluate pipeline stages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kcache.align import TemplateSpec
from kcache.data.samples import samples_from_records
from kcache.data.synth import synth_records
from kcache.encoders import (
    BundleError,
    EncoderConfig,
    EncoderStack,
    load_bundle,
    save_bundle,
)
from kcache.finetune import (
    FinetuneConfig,
    autocast_for,
    finetune,
    knowledge_items,
    mean_nll,
    scored_logprobs,
)

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def dec(tokenizer_bos):
    from conftest import tiny_dec


    return tiny_dec("llama", tokenizer_bos, name="tiny-llama")


@pytest.fixture(scope="module")
def table():
    """6 training samples, and the same 6 again as the validation split (so selection sees training progress)."""
    recs = synth_records(9, seed=3)
    train = [dict(r, split="train") for r in recs[:6]]
    val = [dict(r, split="validation", id=r["id"] + "-v") for r in recs[:6]]
    test = [dict(r, split="test") for r in recs[6:]]
    return samples_from_records(train + val + test)


def _stack(d, layers=(1, 2), seed=0, random_up=False):
    st = EncoderStack(EncoderConfig(d_model=d.layers.hidden_size, **SMALL), list(layers), seed=seed)
    if random_up:
        g = torch.Generator().manual_seed(seed + 11)
        with torch.no_grad():
            for l in st.layers:
                st.encoder(l).up_proj.weight.normal_(0, 0.05, generator=g)
    return st


def _meta(d, layers=(1, 2)):
    t = TemplateSpec()
    return {"site": "mlp", "layers": list(layers), "model": d.fingerprint.to_dict(), "max_length": 512, "cache": None,
            "template": {"template": t.template, "separator": t.separator, "end": t.end}}


def _bundle(d, path, **kw):
    st = _stack(d, **kw)
    save_bundle(path, st, _meta(d))
    return path


def _cfg(**kw):
    base = dict(epochs=20, batch_size=3, lr_max=3e-3, lr_min=1e-4, eval_every=4, patience=100, max_steps=12,
                val_max_samples=64)
    return FinetuneConfig(**(base | kw))


def test_finetune_lowers_target_ce_and_trains_only_the_encoders(dec, table, tmp_path):
    src = _bundle(dec, tmp_path / "fit", random_up=True)
    before_dec = {k: v.clone() for k, v in dec.model.state_dict().items()}
    s0, _ = load_bundle(src)
    out = tmp_path / "ft"
    s = finetune(dec, table, src, out, _cfg(max_steps=8), progress=False)
    assert s["steps"] == 8 and s["best_step"] > 0
    assert s["val_nll_best"] < s["val_nll_start"] - 0.05
    # target CE on the training samples, measured independently with the saved bundle
    spec = TemplateSpec()
    items, _ = knowledge_items(dec.tokenizer, [r for r in table.to_pylist() if r["split"] == "train"], spec, 512)
    s1, meta = load_bundle(out, dec.fingerprint.to_dict())
    ac = autocast_for(dec.device)
    ce0, ce1 = mean_nll(dec, s0, "mlp", [1, 2], items, 8, ac), mean_nll(dec, s1, "mlp", [1, 2], items, 8, ac)
    assert ce1 < ce0 - 0.05
    # decoder bitwise untouched, frozen, no gradients
    after = dec.model.state_dict()
    assert all(torch.equal(before_dec[k], after[k]) for k in before_dec)
    assert all(p.grad is None and not p.requires_grad for p in dec.model.parameters())
    # encoder parameters moved
    changed = [k for k, v in s1.state_dict().items() if not torch.equal(v, s0.state_dict()[k])]
    assert changed and any("up_proj" in k for k in changed)
    # provenance and files
    tr = meta["training"]
    assert tr["finetuned"] is True and tr["start"]["from"] == str(src) and tr["step"] >= s["best_step"]
    assert (out / "history.json").exists() and (out / "curves.png").exists() and (out / "summary.json").exists()
    hist = json.loads((out / "history.json").read_text())
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 8


def test_bundle_fingerprint_is_checked(dec, table, tmp_path, tokenizer_bos):
    from conftest import tiny_dec

    from kcache.inject import Injector

    src = _bundle(dec, tmp_path / "fit")
    out = tmp_path / "ft"
    finetune(dec, table, src, out, _cfg(max_steps=2, eval_every=2), progress=False)
    load_bundle(out, dec.fingerprint.to_dict())
    Injector.from_bundle(dec, out)
    other = tiny_dec("llama", tokenizer_bos, seed=1, name="other")
    with pytest.raises(BundleError):
        Injector.from_bundle(other, out)
    with pytest.raises(Exception, match="another model"):
        finetune(other, table, src, tmp_path / "x", _cfg(max_steps=1), progress=False)
    # same settings again: complete, skipped
    again = finetune(dec, table, src, out, _cfg(max_steps=2, eval_every=2), progress=False)
    assert again["skipped"] is True


def test_loss_counts_target_tokens_only(dec):
    """scored_logprobs == log-softmax of a plain injected forward, gathered at target positions only."""
    from kcache.align import encode_sample
    from kcache.inject import add_at_site, encoder_additions

    st = _stack(dec, random_up=True)
    recs = synth_records(3, seed=4)
    encs = [encode_sample(dec.tokenizer, r["knowledge"], r["source"], r["target"], TemplateSpec(), 512) for r in recs]
    k, x, m = [e.k_ids for e in encs], [e.x_ids for e in encs], [e.target_mask for e in encs]
    lp, _ = scored_logprobs(dec, st, "mlp", [1, 2], k, x, m)
    assert lp.requires_grad  # differentiable w.r.t. the encoders
    want = []
    for i in range(3):
        add = encoder_additions(dec, st, [k[i]], [x[i]], [1, 2])
        with torch.no_grad(), add_at_site(dec, "mlp", add):
            logp = dec.model(input_ids=torch.tensor([x[i]])).logits[0].log_softmax(-1)
        want += [logp[j - 1, x[i][j]].item() for j in range(1, len(x[i])) if m[i][j]]
    assert len(want) == lp.numel() == sum(sum(mm[1:]) for mm in m)
    assert torch.allclose(lp.detach(), torch.tensor(want), atol=1e-4)
    # source tokens are not scored: marking everything as target adds terms
    lp_all, _ = scored_logprobs(dec, st, "mlp", [1, 2], k, x, [[True] * len(xx) for xx in x])
    assert lp_all.numel() > lp.numel()
    # gradients reach every encoder
    (-lp.mean()).backward()
    for l in (1, 2):
        assert st.encoder(l).up_proj.weight.grad is not None and st.encoder(l).up_proj.weight.grad.abs().sum() > 0


def test_training_nll_matches_evaluate_ekx(dec, table):
    """The fine-tuning objective is exactly evaluate's ekx log-perplexity."""
    from kcache.evaluate import evaluate

    st = _stack(dec, random_up=True)
    res = evaluate(dec, table, (st, _meta(dec)), ["ekx"], split="train", token_budget=512)
    items, _ = knowledge_items(dec.tokenizer, [r for r in table.to_pylist() if r["split"] == "train"],
                               TemplateSpec(), 512)
    nll = mean_nll(dec, st, "mlp", [1, 2], items, 4, autocast_for(dec.device))
    assert nll == pytest.approx(res["results"]["all"]["ekx"]["nll"], rel=1e-5)


def test_from_scratch(dec, table, tmp_path):
    out = tmp_path / "scratch"
    cfg = _cfg(from_scratch=True, layers="1-2", max_steps=6, **SMALL)
    s = finetune(dec, table, None, out, cfg, progress=False)
    st, meta = load_bundle(out, dec.fingerprint.to_dict())
    assert st.layers == [1, 2] and meta["cache"] is None and meta["training"]["start"]["from"] == "scratch"
    assert meta["site"] == "block" and st.config.hidden_size == 32
    # fresh encoders inject nothing at step 0, so the start equals D(x)
    items, _ = knowledge_items(dec.tokenizer, [r for r in table.to_pylist() if r["split"] == "validation"],
                               TemplateSpec(), 1024)
    assert s["val_nll_start"] == pytest.approx(mean_nll(dec, None, "mlp", [], items, 8, autocast_for(dec.device)),
                                               rel=1e-5)


def test_stage_evaluate_writes_reports_and_gap(dec, table, tmp_path):
    from kcache.stages import run_stage

    run = tmp_path / "run"
    _bundle(dec, run / "encoders", random_up=True)
    _bundle(dec, run / "encoders-ft", random_up=True, seed=5)
    logs = []
    cfg = {"run": {"dir": str(run)}, "evaluate": {"split": "test", "token_budget": 512}}
    s = run_stage("evaluate", cfg, run, lambda: dec, table, None, logs.append)
    for f in ("evaluation.json", "evaluation.md", "evaluation.png"):
        assert (run / "eval" / f).exists()
    res = json.loads((run / "eval" / "evaluation.json").read_text())
    assert res["settings"]["methods"] == ["x", "kx", "ekx_fit", "ekx_ft"]
    r = res["results"]["all"]
    for m in ("ekx_fit", "ekx_ft"):
        want = None
        if r["x"]["nll"] > r["kx"]["nll"]:
            want = (r["x"]["nll"] - r[m]["nll"]) / (r["x"]["nll"] - r["kx"]["nll"])
        got = res["gap_closed"]["all"][m]
        assert (got is None and want is None) or got == pytest.approx(want)
        assert s["gap_closed"][m] == got
    assert math.exp(r["x"]["nll"]) == pytest.approx(s["perplexity"]["x"])
    assert r["ekx_fit"]["nll"] != r["ekx_ft"]["nll"]  # two bundles, labelled apart
    md = (run / "eval" / "evaluation.md").read_text()
    assert "after fit" in md and "after finetune" in md and "gap" in md
    assert s["skipped"] is False
    assert run_stage("evaluate", cfg, run, lambda: dec, table, None, logs.append)["skipped"] is True


def test_stage_finetune(dec, table, tmp_path):
    from kcache.stages import run_stage

    run = tmp_path / "run"
    _bundle(dec, run / "encoders", random_up=True)
    cfg = {"run": {"dir": str(run)}, "finetune": {"epochs": 1, "batch_size": 3, "lr": 1e-3, "eval_every": 1,
                                                  "max_steps": 2}}
    s = run_stage("finetune", cfg, run, lambda: dec, table, None, lambda m: None)
    assert s["steps"] == 2 and (run / "encoders-ft" / "config.json").exists()
    assert run_stage("finetune", cfg, run, lambda: dec, table, None, lambda m: None)["skipped"] is True
    with pytest.raises(ValueError, match=r"\[finetune\] unknown key 'bogus'"):
        run_stage("finetune", {"finetune": {"bogus": 1}}, run, lambda: dec, table, None, lambda m: None)


def test_cli_finetune_and_edit(dec, table, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import kcache.models
    from kcache.cli import mount

    monkeypatch.setattr(kcache.models, "load_decoder", lambda *a, **k: dec)
    samples = tmp_path / "s.parquet"
    from kcache.data.samples import write_samples

    write_samples(table, samples)
    src = _bundle(dec, tmp_path / "fit", random_up=True)
    app = typer.Typer()
    mount(app, names=("finetune", "edit"))
    r = CliRunner().invoke(app, ["finetune", "--samples", str(samples), "--encoders", str(src), "--out",
                                 str(tmp_path / "ft"), "--max-steps", "2", "--eval-every", "1", "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    assert "validation perplexity" in r.output and (tmp_path / "ft" / "config.json").exists()
    r = CliRunner().invoke(app, ["finetune", "--samples", str(samples), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--from-scratch" in r.output
    r = CliRunner().invoke(app, ["edit", "--samples", str(samples), "--encoders", str(src), "--out",
                                 str(tmp_path / "ed"), "--max-steps", "1", "--max-edits", "2", "--max-eval-edits", "1"])
    assert r.exit_code == 0, r.output
    assert "ES" in r.output and (tmp_path / "ed" / "edit.json").exists()


def test_kl_objective_is_the_kl_to_d_k_x_at_every_input_position(dec, table):
    """With encoders that add nothing, batch_kl is KL(D(K,x) || D(x)) summed over every input
    position that predicts a next input token, computed here directly from the two models' logits."""
    from kcache.finetune import batch_kl

    spec = TemplateSpec()
    items, _ = knowledge_items(dec.tokenizer, [r for r in table.to_pylist() if r["split"] == "train"], spec, 512)
    zero = _stack(dec)  # up-projection starts at zero: injects nothing
    total, n = batch_kl(dec, zero, "mlp", [1, 2], items[:3], autocast_for(dec.device))
    want, m = 0.0, 0
    with torch.no_grad():
        for it in items[:3]:
            t = dec.model(input_ids=torch.tensor([it.k_ids + it.x_ids])).logits[0, len(it.k_ids):-1]
            t = t.float().log_softmax(-1)
            s = dec.model(input_ids=torch.tensor([it.x_ids])).logits[0, :-1].float().log_softmax(-1)
            want += float((t.exp() * (t - s)).sum())
            m += len(it.x_ids) - 1
    total = float(total.detach())
    assert n == m and total == pytest.approx(want, rel=1e-4)
    assert total > 0


def test_kl_objective_trains_and_bad_objective_is_refused(dec, table, tmp_path):
    src = _bundle(dec, tmp_path / "fit", random_up=True)
    s = finetune(dec, table, src, tmp_path / "ft", _cfg(max_steps=4, objective="kl"), progress=False)
    assert s["steps"] == 4 and math.isfinite(s["val_nll_best"])
    with pytest.raises(ValueError, match="objective must be one of"):
        finetune(dec, table, src, tmp_path / "ft2", _cfg(objective="mse"), progress=False)


def test_backward_stops_at_the_lowest_injected_layer(dec, table):
    """Blocks below the lowest injected layer do not depend on the encoders: their outputs carry no
    graph, so a finetune step's backward runs from the top down to that layer and no further."""
    from kcache.finetune import _split_rows

    items, _ = knowledge_items(dec.tokenizer, _split_rows(table, "train"), TemplateSpec(), 1024)
    stack = _stack(dec, layers=(2, 3), random_up=True)
    graph = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: graph.__setitem__(i, (o[0] if isinstance(o, tuple) else o)
                                                                              .requires_grad))
             for i, blk in ((i, dec.layers.block(i)) for i in range(dec.layers.num_layers))]
    try:
        lp, _ = scored_logprobs(dec, stack, "block", [2, 3], [it.k_ids for it in items[:3]],
                                [it.x_ids for it in items[:3]], [it.mask for it in items[:3]])
    finally:
        for h in hooks:
            h.remove()
    assert lp.requires_grad
    # block 2's own output is computed before the addition (site "block": added to its output)
    assert graph == {0: False, 1: False, 2: False, 3: True}


def test_kept_lower_blocks_change_no_step(dec, table, tmp_path, monkeypatch):
    """Finetune starts each step and evaluation above the blocks the encoders cannot change
    (computed once per input, ``_lower_blocks``): the same history as running them every time,
    with block 0 run only while they are computed (site mlp at layers 1-2: block 0 is kept)."""
    import kcache.finetune as ft

    src = _bundle(dec, tmp_path / "fit", random_up=True)
    calls = []
    hook = dec.layers.mlp(0).register_forward_hook(lambda *a: calls.append(1))
    try:
        kept = finetune(dec, table, src, tmp_path / "kept", _cfg(max_steps=6, eval_every=3), progress=False)
        kept_calls = len(calls)
        monkeypatch.setattr(ft, "LOWER_BLOCKS_MAX_BYTES", 0)
        calls.clear()
        plain = finetune(dec, table, src, tmp_path / "plain", _cfg(max_steps=6, eval_every=3), progress=False)
    finally:
        hook.remove()
    # kept: one batch, as this table's validation inputs are its training inputs (kept once);
    # plain: 6 steps of batch 3 and 3 evaluations of the 6 validation samples in one batch each
    assert kept_calls == 1 and len(calls) == 6 + 3
    a = json.loads((tmp_path / "kept" / "history.json").read_text())
    b = json.loads((tmp_path / "plain" / "history.json").read_text())
    assert [h["step"] for h in a] == [h["step"] for h in b] == [0, 3, 6]
    for x, y in zip(a, b):
        assert x["val_nll"] == pytest.approx(y["val_nll"], rel=1e-5, abs=1e-6)
        assert (x["train_nll"] is None) == (y["train_nll"] is None)
        if x["train_nll"] is not None:
            assert x["train_nll"] == pytest.approx(y["train_nll"], rel=1e-5, abs=1e-6)
    assert kept["val_nll_best"] == pytest.approx(plain["val_nll_best"], rel=1e-5)


def test_mlp_site_at_layer_0_has_no_lower_blocks_to_keep(dec, table, tmp_path):
    """Encoders at site mlp of layer 0 change block 0 itself: nothing is kept, training runs."""
    cfg = _cfg(max_steps=2, eval_every=2, from_scratch=True, layers="0-1", site="mlp")
    s = finetune(dec, table, None, tmp_path / "ft", cfg, progress=False)
    assert s["steps"] == 2


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_batched_training_forward_equals_each_sequence_alone(tiny_decoder, site):
    """scored_logprobs on a right-padded batch: on every architecture each sequence's log-probabilities
    and the encoders' gradients equal those of the sequence run alone, injected."""
    from kcache.inject import add_at_site, stack_additions

    dec = tiny_decoder
    st = _stack(dec, random_up=True)
    g = torch.Generator().manual_seed(3)
    lens = [(4, 9), (7, 3), (2, 12), (5, 6)]  # |K|, |x|: lengths that differ, one x of 3 tokens
    k = [torch.randint(3, 60, (a,), generator=g).tolist() for a, _ in lens]
    x = [torch.randint(3, 60, (b,), generator=g).tolist() for _, b in lens]
    m = [[j % 2 == 1 for j in range(len(xx))] for xx in x]
    lp, owner = scored_logprobs(dec, st, site, [1, 2], k, x, m)
    (-lp.sum()).backward()
    grad = st.encoder(1).up_proj.weight.grad.clone()
    st.zero_grad()
    want, total = [], 0.0
    for i in range(len(x)):
        add = stack_additions(dec, st, [k[i]], [x[i]], [1, 2])
        with add_at_site(dec, site, add):
            logp = dec.model(input_ids=torch.tensor([x[i]])).logits[0].float().log_softmax(-1)
        terms = [logp[j - 1, x[i][j]] for j in range(1, len(x[i])) if m[i][j]]
        want += [t.item() for t in terms]
        total = total - sum(terms)
    total.backward()
    assert owner == [i for i in range(len(x)) for j in range(1, len(x[i])) if m[i][j]]
    torch.testing.assert_close(lp.detach(), torch.tensor(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, st.encoder(1).up_proj.weight.grad, atol=1e-5, rtol=1e-4)
