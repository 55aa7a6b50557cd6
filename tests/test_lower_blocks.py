"""Sharing the decoder's un-injected lower blocks between evaluation methods (kcache.lower_blocks)."""

from __future__ import annotations

import pytest
import torch

from kcache.align import pad_right, sink_of
from kcache.data.synth import synth_samples
from kcache.encoders import EncoderConfig, EncoderStack
from kcache.evaluate import evaluate, markdown_report
from kcache.lower_blocks import LowerBlocks, untouched_blocks

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def _random_stack(decoder, layers):
    """A stack whose additions are not zero (a fresh one's up-projection is)."""
    stack = EncoderStack(EncoderConfig(d_model=decoder.layers.hidden_size, **SMALL), list(layers))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in stack.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return stack


def _bundle(decoder, stack, site):
    return stack, {"site": site, "layers": stack.layers, "model": decoder.fingerprint.to_dict(), "max_length": 512}


def _backbone(decoder, seqs):
    ids, mask = pad_right(seqs, 3)
    return decoder.layers.backbone()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def test_untouched_blocks_by_site():
    assert untouched_blocks("block", [3, 4, 5]) == 4  # the addition is made to block 3's output
    assert untouched_blocks("mlp", [5, 3]) == 3  # inside block 3


@pytest.mark.parametrize("site", ["block", "mlp"])
def test_sharing_changes_no_score(tiny_decoder, tmp_path, site):
    """Every method and every knowledge control scores the same with and without the shared lower
    blocks (float32; the oracle's deltas and the encoders inject at layers 1-2)."""
    from kcache.cache import Cache
    from kcache.extract import ExtractConfig, extract

    table = synth_samples(8, seed=4)
    extract(tiny_decoder, table, tmp_path / "c.zarr", ExtractConfig(layers=[1, 2], site="block", dtype="float32"),
            progress=False)
    stack = _random_stack(tiny_decoder, (1, 2))
    stack.sink = sink_of(Cache.open(tmp_path / "c.zarr").settings)  # encoders write where the oracle does
    bundle = _bundle(tiny_decoder, stack, site)
    methods = ["x", "kx", "ekx", "oracle"]
    on = evaluate(tiny_decoder, table, bundle, methods, cache=tmp_path / "c.zarr")
    off = evaluate(tiny_decoder, table, bundle, methods, cache=tmp_path / "c.zarr", share_lower_blocks=False)
    shared = on["settings"]["shared_lower_blocks"]
    # the oracle (site block, layer 1) leaves blocks 0-1; encoders at site mlp only block 0
    assert shared["blocks"] == (2 if site == "block" else 1)
    assert shared["methods"] == ["ekx", "oracle", "x"] and shared["inputs"] == 8
    assert off["settings"]["shared_lower_blocks"] is None
    for m in methods:
        a, b = on["results"]["all"][m], off["results"]["all"][m]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5), m
        assert a["tokens"] == b["tokens"]
        assert on["methods"][m]["lower_blocks_seconds"] == (shared["seconds"] if m != "kx" else 0.0)
    for m in ("kx", "ekx"):
        ca, cb = on["controls"][m], off["controls"][m]
        for kind in ("other", "empty"):
            assert ca[kind]["perplexity"] == pytest.approx(cb[kind]["perplexity"], rel=1e-5), (m, kind)
    # the injection changes the scores, so equality above is not D(x) three times
    assert abs(on["results"]["all"]["ekx"]["perplexity"] / on["results"]["all"]["x"]["perplexity"] - 1) > 1e-3
    assert "start from the decoder's blocks 0-" in markdown_report(on)


def test_no_sharing_for_a_single_pass_or_over_budget(tiny_decoder):
    table = synth_samples(4, seed=2)
    assert evaluate(tiny_decoder, table, None, ["x", "kx"])["settings"]["shared_lower_blocks"] is None  # one pass
    res = evaluate(tiny_decoder, table, _bundle(tiny_decoder, _random_stack(tiny_decoder, (2,)), "block"),
                   ["x", "ekx"], lower_blocks_max_bytes=0)
    assert res["settings"]["shared_lower_blocks"] is None
    assert res["methods"]["ekx"]["lower_blocks_seconds"] == 0.0


def test_replay_starts_above_the_kept_blocks_and_falls_back(tiny_decoder):
    dec = tiny_decoder
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    plain = _backbone(dec, seqs[:2])
    lower = LowerBlocks(dec, 2)
    assert lower.fill(seqs[:2], [[0, 1]], 3) == 2 and lower.fill(seqs[:2], [[0, 1]], 3) == 0
    assert set(lower.states) == {tuple(s) for s in seqs[:2]} and lower.states[(10, 11, 12)].shape[0] == 3
    calls = []
    hooks = [dec.layers.mlp(i).register_forward_hook(lambda m, i, o, k=i: calls.append(k)) for i in range(2)]
    try:
        with lower.replay():
            # kept inputs, in another batch and padding: blocks 0-1 do not run, the output is the same
            for batch in (seqs[:2], seqs[1::-1], [seqs[1]]):
                calls.clear()
                got = _backbone(dec, batch)
                assert calls == []
                for i, s in enumerate(batch):
                    j = seqs.index(s)
                    torch.testing.assert_close(got[i, : len(s)], plain[j, : len(s)], atol=1e-5, rtol=1e-5)
            # one input not kept: the whole call runs as usual
            calls.clear()
            got = _backbone(dec, [seqs[0], seqs[2]])
            assert calls == [0, 1]
        torch.testing.assert_close(got, _backbone(dec, [seqs[0], seqs[2]]))
    finally:
        for h in hooks:
            h.remove()
    assert all("forward" not in dec.layers.block(i).__dict__ for i in range(2))


def test_replay_keeps_an_instance_forward_and_left_padding_runs(tiny_decoder):
    """A block's own ``forward`` attribute (accelerate's device hooks set one) is put back; a
    left-padded call is not matched and runs as usual."""
    dec = tiny_decoder
    block = dec.layers.block(0)
    seen = []
    original = block.forward

    def wrapped(*a, **k):
        seen.append(1)
        return original(*a, **k)

    block.forward = wrapped
    try:
        lower = LowerBlocks(dec, 1)
        lower.fill([[5, 6, 7], [8, 9]], [[0, 1]], 3)
        with lower.replay():
            seen.clear()
            ids = torch.tensor([[5, 6, 7], [3, 8, 9]])
            mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
            dec.layers.backbone()(input_ids=ids, attention_mask=mask, use_cache=False)
            assert seen == [1]
        assert block.__dict__["forward"] is wrapped
    finally:
        del block.forward


def test_record_keeps_inputs_on_first_sight_within_max_bytes(tiny_decoder):
    """``replay(record=True)``: the first call over an input runs every block and keeps its states
    (the block's own output, before a hook adds to it), the next one starts above them; inputs past
    ``max_bytes`` are not kept."""
    dec = tiny_decoder
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12], [5, 6, 7, 8, 9]]
    plain = _backbone(dec, seqs)
    row = dec.layers.hidden_size * dec.dtype.itemsize
    lower = LowerBlocks(dec, 2, max_bytes=7 * row)  # room for 7 token rows: the first input (5), not both (8)
    calls = []
    hooks = [dec.layers.mlp(0).register_forward_hook(lambda *a: calls.append(1)),
             dec.layers.block(1).register_forward_hook(lambda m, a, o: (o[0] if isinstance(o, tuple) else o) + 1.0)]
    try:
        with lower.replay(record=True):
            first = _backbone(dec, seqs)
            assert calls == [1] and set(lower.states) == {tuple(seqs[0])} and lower.kept_bytes == 5 * row
            calls.clear()
            again = _backbone(dec, [seqs[0]])
            assert calls == []
        torch.testing.assert_close(again[0], first[0, :5])
    finally:
        for h in hooks:
            h.remove()
    assert not torch.allclose(first[0, :5], plain[0, :5])  # the hook on block 1 applied, kept or not


def test_only_plain_calls_start_from_kept_states(tiny_decoder):
    """A call that builds a KV cache (``use_cache`` not False: generation), gives positions, asks for
    every block's hidden states or passes a 4-D mask runs every block, even over a kept input; a
    nested ``replay`` leaves the outer one recording."""
    dec = tiny_decoder
    seq = [5, 6, 7, 8]
    lower = LowerBlocks(dec, 2)
    lower.fill([seq], [[0]], 3)
    ids, mask = torch.tensor([seq]), torch.ones(1, 4, dtype=torch.long)
    calls = []
    hook = dec.layers.mlp(0).register_forward_hook(lambda *a: calls.append(1))
    bb = dec.layers.backbone()
    try:
        with lower.replay(record=True):
            for kw in ({}, {"use_cache": True}, {"use_cache": False, "position_ids": torch.arange(4)[None]},
                       {"use_cache": False, "output_hidden_states": True}):
                calls.clear()
                bb(input_ids=ids, attention_mask=mask, **kw)
                assert calls == [1], kw
            calls.clear()
            bb(input_ids=ids, attention_mask=mask, use_cache=False)
            assert calls == []
            calls.clear()
            bb(input_ids=ids, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool), use_cache=False)
            assert calls == [1]
            with lower.replay():
                pass
            calls.clear()
            _backbone(dec, [[9, 10, 11]])  # not kept yet: runs, and the outer context keeps it
            assert calls == [1] and (9, 10, 11) in lower.states
    finally:
        hook.remove()


def test_blocks_must_be_in_range(tiny_decoder):
    with pytest.raises(ValueError, match="blocks must be in 1.."):
        LowerBlocks(tiny_decoder, 0)
    with pytest.raises(ValueError, match="blocks must be in 1.."):
        LowerBlocks(tiny_decoder, tiny_decoder.layers.num_layers + 1)
