"""LoRA / KaSA / SFT baselines scored through ``kcache.evaluate`` (``kcache.methods.scoring``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model, tiny_dec

from kcache.data.synth import synth_samples
from kcache.evaluate import METHODS, evaluate
from kcache.methods import baselines as B
from kcache.methods.scoring import register_baseline_methods, release


def _decoder(tok, seed=0):
    return tiny_dec("llama", tok, seed=seed, name="tiny")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tokenizer_nobos, tmp_path_factory):
    """Baselines trained for 2 steps with a large lr on a fresh copy of the tiny model."""
    root = tmp_path_factory.mktemp("bl")
    samples = synth_samples(8, seed=3)
    out = {}
    torch.set_num_threads(1)
    for method, lr in (("lora", 5e-2),):
        B.train_baseline(_decoder(tokenizer_nobos), samples, method, root / method, steps=2, batch_size=4, lr=lr,
                         rank=4, alpha=8, warmup=0.0, log=lambda s: None)
        out[method] = root / method
    return out


def test_baseline_method_runs_through_evaluate_and_leaves_decoder_alone(tokenizer_nobos, trained):
    dec = _decoder(tokenizer_nobos)
    before = _state(dec.model)
    table = synth_samples(6, seed=5)
    plain = evaluate(dec, table, None, ["x", "kx"], token_budget=256)
    names = register_baseline_methods([trained["lora"]])
    assert names == ["base_lora"] and METHODS["base_lora"].label == "LoRA D(K,x)"
    try:
        res = evaluate(dec, table, None, ["kx", "base_lora", "x"], token_budget=256)
    finally:
        release()
    a, p = res["results"]["all"], plain["results"]["all"]
    # kx and x are computed on the untouched decoder, before and after the baseline method
    assert a["kx"]["perplexity"] == p["kx"]["perplexity"] and a["x"]["perplexity"] == p["x"]["perplexity"]
    assert a["base_lora"]["tokens"] == a["kx"]["tokens"] and a["base_lora"]["samples"] == a["kx"]["samples"]
    assert math.isfinite(a["base_lora"]["perplexity"])
    assert abs(a["base_lora"]["perplexity"] - a["kx"]["perplexity"]) > 1e-3
    after = _state(dec.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not B._has_adapters(dec.model)
    # the score equals the baseline loaded the documented way on a fresh decoder
    ref = B.load_baseline(trained["lora"], _decoder(tokenizer_nobos))
    register_baseline_methods([trained["lora"]])
    direct = evaluate(_decoder(tokenizer_nobos), table, None, ["kx"], token_budget=256)
    assert direct["results"]["all"]["kx"]["perplexity"] == p["kx"]["perplexity"]
    from kcache.evaluate import register_method, score_sequences

    register_method("test-ref-lora",
                    lambda d, b: score_sequences(d, [it.k_ids + it.x_ids for it in b.items],
                                                 [len(it.k_ids) for it in b.items], b.items, model=ref))
    refres = evaluate(dec, table, None, ["test-ref-lora"], token_budget=256)
    ref_ppl = refres["results"]["all"]["test-ref-lora"]["perplexity"]
    assert ref_ppl == pytest.approx(a["base_lora"]["perplexity"], rel=1e-6)
    release()


def test_sft_baseline_and_cli(tokenizer_nobos, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from kcache.cli import mount
    from kcache.data.samples import write_samples

    monkeypatch.setenv("KCACHE_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "tiny"
    make_model("llama", len(tokenizer_nobos)).save_pretrained(model_dir)
    tokenizer_nobos.save_pretrained(model_dir)
    write_samples(synth_samples(12, seed=4), tmp_path / "s.parquet")
    from kcache.models import load_decoder

    dirs = {}  # trained on the saved model (its fingerprint is the one the command loads)
    for method, lr in (("lora", 5e-2), ("sft", 5e-3)):
        B.train_baseline(load_decoder(str(model_dir), device="cpu"), synth_samples(8, seed=3), method,
                         tmp_path / method, steps=2,
                         batch_size=4, lr=lr, rank=4, alpha=8, warmup=0.0, log=lambda s: None)
        dirs[method] = tmp_path / method
    app = typer.Typer()
    mount(app, names=("evaluate-baselines",))

    @app.command("noop")
    def _noop():  # a second command so typer keeps sub-command names
        pass

    r = CliRunner().invoke(app, ["evaluate-baselines", "--samples", str(tmp_path / "s.parquet"), "--baselines",
                                 str(dirs["lora"]),
                                 "--baselines", str(dirs["sft"]), "--model", str(model_dir), "--split", "train",
                                 "--limit", "4", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert doc["settings"]["methods"] == ["x", "kx", "base_lora", "base_sft"]
    assert doc["settings"]["trainable_params"]["base_lora"] < doc["settings"]["trainable_params"]["base_sft"]
    res = doc["results"]["all"]
    assert res["base_sft"]["perplexity"] != res["kx"]["perplexity"]
    assert res["base_lora"]["perplexity"] != res["kx"]["perplexity"]
    md = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "LoRA D(K,x)" in md and "SFT D(K,x)" in md and (tmp_path / "ev" / "evaluation.png").exists()
