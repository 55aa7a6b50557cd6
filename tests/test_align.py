"""The alignment math: shifts, masks, layer specs, batching, tokenisation with truncation."""

from __future__ import annotations

import pytest
import torch

from kcache.align import (
    TemplateSpec,
    encode_input,
    encode_sample,
    length_mask,
    loss_mask,
    parse_layers,
    plan_batches,
    prefix_parts,
    shift_left,
    shift_right,
)


def test_shift_left_aligns_knowledge_positions_to_input_positions():
    t = torch.arange(2 * 6).view(2, 6, 1).float()  # sample 0: k=2, sample 1: k=4
    out = shift_left(t, torch.tensor([2, 4]), length=4)
    assert out[0, :, 0].tolist() == [2, 3, 4, 5]
    assert out[1, :, 0].tolist() == [10, 11, 0, 0]  # past the end -> zero


def test_shift_right_is_the_inverse_on_valid_positions():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    k = torch.tensor([0, 2, 7])
    back = shift_left(shift_right(x, k), k, length=5)
    assert torch.equal(back, x)
    r = shift_right(x, k)
    assert r.shape == (3, 12, 4) and torch.all(r[2, :7] == 0)


def test_masks():
    assert length_mask(torch.tensor([1, 3]), 4).tolist() == [[True, False, False, False], [True, True, True, False]]
    assert loss_mask(3, skip_first=True) == [False, True, True]
    assert loss_mask(3, skip_first=False) == [True, True, True]


@pytest.mark.parametrize("spec, want", [("3-8", [3, 4, 5, 6, 7, 8]), ("3,5,7", [3, 5, 7]),
                                        ("all", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), ("8,3-4", [3, 4, 8])])
def test_parse_layers(spec, want):
    assert parse_layers(spec, 10) == want


@pytest.mark.parametrize("spec, match", [("3-12", "layer 10 out of range; this model has layers 0..9"),
                                         ("x", "cannot parse"), ("5-3", "empty range"), ("", "no layers")])
def test_parse_layers_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_layers(spec, 10)


def test_plan_batches_respects_budget_and_covers_everything():
    lengths = [5, 50, 7, 30, 30, 8, 100, 2]
    batches = plan_batches(lengths, token_budget=64)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(8))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1
    assert batches[-1] == [6]  # over budget alone


def test_encode_sample_truncates_knowledge_not_input(tokenizer_bos):
    tok = tokenizer_bos
    spec = TemplateSpec()
    x_ids, tmask = encode_input(tok, "[USR] What is the capital of Quelm? [SYS]", " Zorb.")
    full = encode_sample(tok, ["The capital of Quelm is Zorb."] * 20, "[USR] What is the capital of Quelm? [SYS]",
                         " Zorb.", spec, 10_000)
    assert not full.truncated and full.x_ids == x_ids and full.target_mask == tmask
    # x is encoded on its own (BOS first, and the same ids as in pass A)
    assert full.x_ids[0] == tok.bos_token_id
    assert full.k_ids[0] == tok.bos_token_id and full.k_ids[-1] == tok.eos_token_id
    limit = len(full.k_ids) + len(full.x_ids) - 17
    cut = encode_sample(tok, ["The capital of Quelm is Zorb."] * 20, "[USR] What is the capital of Quelm? [SYS]",
                        " Zorb.", spec, limit)
    assert cut.truncated and cut.knowledge_tokens_dropped == 17
    assert cut.x_ids == full.x_ids and len(cut.k_ids) + len(cut.x_ids) == limit
    assert tok.decode(cut.k_ids).endswith(" }</s>")  # the template's closing part is kept
    assert tok.decode([i for i, m in zip(cut.x_ids, cut.target_mask) if m]).strip() == "Zorb."


@pytest.mark.parametrize("end", ["eos", "none"])
def test_a_precomputed_prefix_encodes_every_sample_as_without_it(tokenizer_bos, tokenizer_nobos, end):
    """Loops over samples tokenise the template once (``prefix``); each sample's ids, masks,
    truncation and skip reason are what the per-sample path gives, with and without BOS."""
    cases = [(["The capital of Quelm is Zorb."] * 6, "[USR] What is the capital of Quelm? [SYS]", " Zorb.", 10_000),
             (["The capital of Quelm is Zorb."] * 6, "[USR] What is the capital of Quelm? [SYS]", " Zorb.", 40),
             ([" lead", "second"], "q", " a", 100), ([], "q", " a", 100), (["k"], "word " * 300, " a", 100)]
    for tok in (tokenizer_bos, tokenizer_nobos):
        spec = TemplateSpec(separator=" | ", end=end)
        prefix = prefix_parts(tok, spec)
        for knowledge, source, target, max_length in cases:
            assert (encode_sample(tok, knowledge, source, target, spec, max_length, prefix)
                    == encode_sample(tok, knowledge, source, target, spec, max_length))
    # ... and the prefix given is the one used
    marked = encode_sample(tokenizer_nobos, ["k"], "q", " a", TemplateSpec(), 100, ([7], [8, 9], ""))
    assert marked.k_ids[0] == 7 and marked.k_ids[-2:] == [8, 9]


def test_encode_sample_skip_reasons(tokenizer_nobos):
    spec = TemplateSpec()
    assert encode_sample(tokenizer_nobos, [], "q", " a", spec, 100).skip_reason == "empty knowledge"
    assert encode_sample(tokenizer_nobos, ["k"], "  ", " a", spec, 100).skip_reason == "empty source"
    long_input = encode_sample(tokenizer_nobos, ["k"], "word " * 300, " a", spec, 100)
    assert long_input.skip_reason.startswith("input alone has")
    from kcache.align import scaffold_length

    n = len(encode_input(tokenizer_nobos, "capital " * 5, " a")[0])
    tight = n + scaffold_length(tokenizer_nobos, spec)
    no_room = encode_sample(tokenizer_nobos, ["k"], "capital " * 5, " a", spec, tight)
    assert no_room.skip_reason.startswith("no room for knowledge")
    assert not encode_sample(tokenizer_nobos, ["capital"], "capital " * 5, " a", spec, tight + 1).skip_reason


def test_template_spec_validation():
    with pytest.raises(ValueError, match="exactly once"):
        TemplateSpec(template="no slot")
    assert TemplateSpec().head == "Imagine that { " and TemplateSpec().tail == " } "
