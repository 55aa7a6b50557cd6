"""DIEKÆ 3.4 editing: no knowledge reaches the encoders; ES / PS / NS on whole-string probabilities."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kcache.align import encode_input
from kcache.data.samples import samples_from_records
from kcache.data.synth import synth_records
from kcache.edit import EditConfig, edit, edit_metrics, full_string_logprobs

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def dec(tokenizer_nobos):
    from conftest import tiny_dec


    return tiny_dec("qwen2", tokenizer_nobos, name="tiny-qwen2")


def test_metrics_on_a_constructed_case():
    """Known log-probabilities: ES/PS/NS are fractions of strict wins, pooled over pairs."""
    lp = {
        ("s1", " new"): -1.0, ("s1", " old"): -2.0,      # edit 1 succeeds
        ("s2", " new2"): -3.0, ("s2", " old2"): -2.0,    # edit 2 fails
        ("p1a", " new"): -1.0, ("p1a", " old"): -1.5,    # paraphrases: 1 of 3 wins (tie is a failure)
        ("p1b", " new"): -4.0, ("p1b", " old"): -1.0,
        ("p2a", " new2"): -2.0, ("p2a", " old2"): -2.0,
        ("n1", " Paris."): -0.5, ("n1", " new"): -3.0,   # neighbours: 2 of 3 keep their answer
        ("n2", " Tokyo."): -0.5, ("n2", " new"): -0.1,
        ("n3", " Rome."): -0.2, ("n3", " new2"): -5.0,
    }
    edits = [
        {"source": "s1", "target": " new", "target_true": " old", "paraphrases": ["p1a", "p1b"],
         "neighbours": [{"prompt": "n1", "target": " Paris."}, {"prompt": "n2", "target": " Tokyo."}]},
        {"source": "s2", "target": " new2", "target_true": " old2", "paraphrases": ["p2a"],
         "neighbours": [{"prompt": "n3", "target": " Rome."}]},
    ]
    calls = []

    def score(prompts, targets):
        calls.append(len(prompts))
        return [lp[(p, t)] for p, t in zip(prompts, targets)]

    m = edit_metrics(score, edits)
    assert m["ES"] == pytest.approx(1 / 2) and m["PS"] == pytest.approx(1 / 3) and m["NS"] == pytest.approx(2 / 3)
    assert m["counts"] == {"edits": 2, "ES": 2, "PS": 3, "NS": 3}
    assert m["mean_margin"]["ES"] == pytest.approx(((-1 + 2) + (-3 + 2)) / 2)
    assert calls == [2 * 2 + 3 * 2 + 3 * 2]  # one batched call
    assert edit_metrics(score, [])["ES"] is None


def test_full_string_probability_sums_every_target_token(dec):
    prompt, target = "[USR] What is the capital of Zorbia? [SYS]", " Quelt Vranmark the Second."
    x, m = encode_input(dec.tokenizer, prompt, target)
    n_target = sum(m[1:])
    assert n_target >= 3  # a multi-token target
    with torch.no_grad():
        logp = dec.model(input_ids=torch.tensor([x])).logits[0].log_softmax(-1)
    per_tok = [logp[j - 1, x[j]].item() for j in range(1, len(x)) if m[j]]
    got = full_string_logprobs(dec, None, "mlp", [], [prompt, prompt], [target, " Paris."])
    assert got[0] == pytest.approx(sum(per_tok), abs=1e-4)
    assert got[0] != pytest.approx(per_tok[0], abs=1e-3)  # not the first token alone
    # batching / ordering does not change a pair's score
    alone = full_string_logprobs(dec, None, "mlp", [], [prompt], [target])
    assert alone[0] == pytest.approx(got[0], abs=1e-4)


def test_full_string_decides_where_first_token_would_not():
    """Two targets share their first token; only the whole-string probability separates them."""
    lp = {("p", " Ab"): math.log(0.5) + math.log(0.9), ("p", " Ac"): math.log(0.5) + math.log(0.1)}
    m = edit_metrics(lambda P, T: [lp[(a, b)] for a, b in zip(P, T)],
                     [{"source": "p", "target": " Ab", "target_true": " Ac", "paraphrases": [], "neighbours": []}])
    assert m["ES"] == 1.0


def _edit_table(n_train=4, n_test=2):
    recs = synth_records(n_train + n_test + 2, seed=11)
    rows = ([dict(r, split="train") for r in recs[:n_train]]
            + [dict(r, split="test") for r in recs[n_train:n_train + n_test]])
    return samples_from_records(rows)


def test_edit_feeds_no_knowledge_and_raises_es_on_trained_edits(dec, tmp_path, monkeypatch):
    import kcache.finetune as ft

    seen = []
    real = ft.trainable_additions

    def spy(decoder, stack, k_ids, x_ids, layers):
        seen.append([len(k) for k in k_ids])
        return real(decoder, stack, k_ids, x_ids, layers)

    monkeypatch.setattr(ft, "trainable_additions", spy)
    table = _edit_table()
    cfg = EditConfig(from_scratch=True, layers="1-2", epochs=40, batch_size=4, lr_max=1e-2, lr_min=1e-3,
                     warmup_fraction=0.0, max_steps=25, eval_every=5, **SMALL)
    out = tmp_path / "edit"
    res = edit(dec, table, out, None, cfg, progress=False)
    assert seen and all(n == 0 for batch in seen for n in batch)  # k_ids always empty: shift 0
    before, after = res["before"]["trained"], res["after"]["trained"]
    assert after["mean_margin"]["ES"] > before["mean_margin"]["ES"] + 1.0
    assert after["ES"] > before["ES"]
    assert res["after"]["held_out"]["counts"]["edits"] == 2
    for f in ("edit.json", "edit.md", "edit.png", "config.json", "encoders.safetensors", "history.json"):
        assert (out / f).exists()
    doc = json.loads((out / "config.json").read_text())
    assert doc["training"]["edited"] is True and doc["cache"] is None
    assert "held-out" in (out / "edit.md").read_text()
