"""Cache targets (independent / cascade / distilled) and the sink policy: the invariants.

* Cascade: injecting *all* cached deltas at once reproduces pass B's site activations at every
  injected layer, at every written position (``j >= sink``); nothing is added at the sink.
* Independent: the same fails for every injected layer above the first (each delta was computed
  against the clean pass A, not the injected one).
* Every layer injected at the block site with nothing left out (``sink = 0``): the logits at the
  input positions are ``D(K, x)``'s.
"""

from __future__ import annotations

import pytest
import torch

from kcache.align import pad_right, sink_of, targets_of
from kcache.cache import Cache
from kcache.data.synth import synth_samples
from kcache.extract import ExtractConfig, batch_deltas, capture, extract, kl_to_teacher, make_plan, run_blocks
from kcache.inject import Injector

LAYERS = [1, 2, 3]


def _site_acts(decoder, seqs, site, layers, injector=None, additions=None):
    ids, mask = pad_right(seqs, decoder.tokenizer.pad_token_id)
    ctx = injector.static(additions) if injector is not None else torch.no_grad()
    with torch.no_grad(), ctx, capture(decoder, site, layers, stop=False) as acts:
        run_blocks(decoder, ids, mask)
    return {l: acts[l].float() for l in layers}


def _oracle_errors(decoder, cache_dir, site, layers, sink):
    """Max relative error, per layer, between the oracle-injected pass A and pass B at written positions."""
    cache = Cache.open(cache_dir)
    oracle = Injector.oracle(decoder, cache)
    errs = {l: 0.0 for l in layers}
    for i in range(cache.num_samples):
        toks, shift = cache.encoder_tokens(i)
        toks = toks.tolist()
        x = toks[shift:]
        b = _site_acts(decoder, [toks], site, layers)
        add, _ = oracle.oracle_additions([i], [x])
        for l in layers:
            assert torch.all(add[l][0, :sink] == 0), "something was written at the sink"
        a = _site_acts(decoder, [x], site, layers, oracle, add)
        for l in layers:
            want = b[l][0, shift:][sink:]
            got = a[l][0][sink:]
            errs[l] = max(errs[l], ((got - want).abs().max() / want.abs().max()).item())
    return errs


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_cascade_deltas_reproduce_pass_b_at_every_injected_layer(tiny_decoder, tmp_path, site):
    cfg = ExtractConfig(layers=LAYERS, site=site, dtype="float32", targets="cascade", sink=1, token_budget=512)
    extract(tiny_decoder, synth_samples(6, seed=3), tmp_path / "c.zarr", cfg, progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    assert targets_of(cache.settings) == "cascade" and sink_of(cache.settings) == 1
    errs = _oracle_errors(tiny_decoder, tmp_path / "c.zarr", site, LAYERS, sink=1)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_independent_deltas_fail_when_injected_together(tiny_decoder, tmp_path, site):
    cfg = ExtractConfig(layers=LAYERS, site=site, dtype="float32", targets="independent", sink=0, token_budget=512)
    extract(tiny_decoder, synth_samples(6, seed=3), tmp_path / "c.zarr", cfg, progress=False)
    errs = _oracle_errors(tiny_decoder, tmp_path / "c.zarr", site, LAYERS, sink=0)
    assert errs[LAYERS[0]] < 1e-4, errs  # the lowest layer sees nothing injected below it: exact
    failing = [l for l in LAYERS if errs[l] > 1e-2]
    assert len(failing) >= 2, errs


def test_every_layer_injected_gives_the_logits_of_d_k_x(tiny_decoder, tmp_path):
    n_layers = tiny_decoder.layers.num_layers
    cfg = ExtractConfig(layers="all", site="block", dtype="float32", targets="cascade", sink=0, token_budget=512)
    extract(tiny_decoder, synth_samples(5, seed=4), tmp_path / "c.zarr", cfg, progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    assert cache.layers == list(range(n_layers))
    oracle = Injector.oracle(tiny_decoder, cache)
    model = tiny_decoder.model
    for i in range(cache.num_samples):
        toks, shift = cache.encoder_tokens(i)
        toks = toks.tolist()
        x = toks[shift:]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([toks])).logits[0, shift:].float()
            plain = model(input_ids=torch.tensor([x])).logits[0].float()
        got = oracle.forward(None, [x], samples=[i])[0].float()
        scale = want.abs().max()
        assert (got - want).abs().max() < 1e-4 * scale
        assert (plain - want).abs().max() > 1e-2 * scale  # without injection the logits really differ


def test_distilled_deltas_lower_the_kl_to_d_k_x(tiny_decoder):
    """Distillation starts from the cascade deltas and keeps the best step: its KL to D(K,x) over
    the input positions is never above the cascade's, and here clearly below it."""
    samples = synth_samples(4, seed=5)
    cfg = ExtractConfig(layers=[1, 2], sink=1)
    plan = make_plan(tiny_decoder.tokenizer, samples, cfg)
    items = plan.encoded
    layers = [1, 2]

    def kl(deltas):
        model = tiny_decoder.model
        total = 0.0
        row = 0
        for e in items:
            n = len(e.x_ids)
            add = {l: deltas[l][row : row + n][None] for l in layers}
            row += n
            with torch.no_grad():
                kx_logits = model(input_ids=torch.tensor([e.k_ids + e.x_ids])).logits
                teacher = kx_logits[:, len(e.k_ids):].float().log_softmax(-1)
                inj = Injector(tiny_decoder, "mlp", layers)
                with inj.static(add):
                    logits = model(input_ids=torch.tensor([e.x_ids])).logits
            total += float(kl_to_teacher(logits, teacher, torch.ones(1, n, dtype=torch.bool))[0])
        return total / len(items)

    cascade = batch_deltas(tiny_decoder, items, "mlp", layers, "cascade", 1)
    distilled = batch_deltas(tiny_decoder, items, "mlp", layers, "distilled", 1,
                             {"steps": 6, "lr": 0.2, "tokens": 4096})
    for l in layers:
        assert distilled[l].shape == cascade[l].shape
    k_c, k_d = kl(cascade), kl(distilled)
    assert k_d <= k_c * (1 + 1e-3)  # each sample keeps its best step (step 0 = cascade); padding changes rounding only
    assert k_d < 0.9 * k_c, (k_c, k_d)


def test_bundles_carry_targets_and_sink(tiny_decoder, tmp_path):
    from kcache.encoders import read_bundle_config
    from kcache.fit import FitConfig, fit_encoders

    extract(tiny_decoder, synth_samples(12, seed=6), tmp_path / "c.zarr",
            ExtractConfig(layers=[1, 2], dtype="float32", sink=2), progress=False)
    fit_encoders(tmp_path / "c.zarr", tmp_path / "enc",
                 FitConfig(epochs=1, batch_size=4, hidden_size=16, intermediate_size=32, num_heads=2, num_layers=1),
                 progress=False)
    doc = read_bundle_config(tmp_path / "enc")
    assert doc["targets"] == "cascade" and doc["sink"] == 2
    inj = Injector.from_bundle(tiny_decoder, tmp_path / "enc")
    assert inj.sink == 2 and inj.info.targets == "cascade"
    cache = Cache.open(tmp_path / "c.zarr")
    toks, shift = cache.encoder_tokens(0)
    add = inj.additions([toks[:shift].tolist()], [toks[shift:].tolist()])
    for l in (1, 2):
        assert torch.all(add[l][0, :2] == 0) and add[l][0, 2:].abs().sum() > 0
    # the loss never reads the sink positions
    assert not cache.loss_mask(0)[:2].any() and cache.loss_mask(0)[2:].all()
