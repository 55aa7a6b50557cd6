"""KnowLA: the adaptation layer's equations, its hooks (forward and generate), link collation
and a train / save / reload round trip, on tiny fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_dec

from kcache.align import TemplateSpec
from kcache.methods import baselines as B
from kcache.methods import knowla as K
from kcache.models import ModelError

H, D, N_ENT = 64, 8, 12


@pytest.fixture(scope="module")
def table():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(N_ENT, D, generator=g)
    has = torch.ones(N_ENT, dtype=torch.bool)
    has[5] = False  # an entity without a vector
    return vectors, has


def _layer(gate=0.5, seed=0):
    torch.manual_seed(seed)
    return K.KnowLALayer(H, D, intermediate_size=32, gate_init=gate)


def _links():
    # example 0: words at [2,4) and [6,7); example 1: one word at [1,3); example 2: none
    return K.collate_links([
        (np.array([[2, 4], [6, 7]]), np.array([[1, 2, -1], [3, -1, -1]])),
        (np.array([[1, 3]]), np.array([[5, 4, 0]])),
        None,
    ], k=3)


def _h(b=3, t=9, seed=1):
    return torch.randn(b, t, H, generator=torch.Generator().manual_seed(seed))


def test_zero_gate_is_identity(table):
    layer = _layer(gate=0.0)
    h = _h()
    out = layer(h, _links(), torch.arange(h.shape[1]), *table)
    assert torch.equal(out, h)


def test_only_linked_subtokens_change(table):
    layer = _layer()
    h = _h()
    with torch.no_grad():
        out = layer(h, _links(), torch.arange(h.shape[1]), *table)
    changed = (out - h).abs().sum(-1) > 0
    expect = torch.zeros_like(changed)
    expect[0, [2, 3, 6]] = True
    expect[1, [1, 2]] = True
    assert torch.equal(changed, expect)


def test_masked_slots_get_zero_weight(table):
    layer = _layer()
    h = _h()
    links = _links()
    pos = torch.arange(h.shape[1])
    member = (pos >= links.spans[..., :1]) & (pos < links.spans[..., 1:])
    with torch.no_grad():
        w, _ = layer.attention(layer.norm(h), member, links.entity_ids, *table)
    assert w.shape == (3, 2, 4)  # k entity slots + the sentinel
    assert torch.allclose(w.sum(-1), torch.ones(3, 2))
    assert w[0, 0, 2] == 0 and (w[0, 1, 1:3] == 0).all()  # -1 padding
    assert w[1, 0, 0] == 0  # entity 5 has no vector
    assert (w[0, 0, :2] > 0).all() and (w[..., 3] > 0).all()  # real entities and the sentinel take weight


def test_batched_equals_per_example(table):
    layer = _layer()
    h = _h()
    links = _links()
    lengths = [9, 5, 7]
    with torch.no_grad():
        batched = layer(h, links, torch.arange(9), *table)
        for i, n in enumerate(lengths):
            one = K.LinkBatch(links.spans[i : i + 1], links.entity_ids[i : i + 1])
            single = layer(h[i : i + 1, :n], one, torch.arange(n), *table)
            assert torch.allclose(batched[i, :n], single[0], atol=1e-6)


def test_knowla_hooks_on_a_model_change_only_causal_future(tokenizer_nobos, table):
    model = make_model("llama", len(tokenizer_nobos))
    ids = torch.randint(4, len(tokenizer_nobos), (1, 10), generator=torch.Generator().manual_seed(3))
    links = K.collate_links([(np.array([[4, 6]]), np.array([[1, 2, -1]]))], k=3)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        torch.manual_seed(0)
        kl = K.KnowLA(table[0], H, [1], has_vector=table[1], intermediate_size=32).attach(model)
        same = model(input_ids=ids).logits  # no links set: identity
        with kl.use(links):
            new = model(input_ids=ids).logits
        kl.detach()
        after = model(input_ids=ids).logits
    assert torch.equal(same, base) and torch.equal(after, base)
    diff = (new - base).abs().amax(-1)[0]
    assert (diff[:4] == 0).all() and (diff[4:] > 0).all()  # positions before the word see nothing
    # a zero gate through the hooks is exactly the frozen model
    kl0 = K.KnowLA(table[0], H, [1, 2], has_vector=table[1], intermediate_size=32, gate_init=0.0).attach(model)
    with torch.no_grad(), kl0.use(links):
        assert torch.equal(model(input_ids=ids).logits, base)
    kl0.detach()


TOL = 1e-4  # float32 rounding between the KV-cache and recompute paths is ~1e-6


def _recompute_logits(model, kl, links, seq, mask):
    """Teacher-forced logits without a KV cache: the whole sequence in one pass, with injection."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), kl.use(links):
        return model(input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()


def test_generate_prefill_injects_decode_skips(tokenizer_nobos, table):
    model = make_model("llama", len(tokenizer_nobos), seed=2)
    torch.manual_seed(1)
    kl = K.KnowLA(table[0], H, [0, 2], has_vector=table[1], intermediate_size=32, gate_init=2.0).attach(model)
    g = torch.Generator().manual_seed(5)
    # two prompts of lengths 8 and 6, left-padded; the second row's spans move by its 2 pads
    ids = torch.randint(4, len(tokenizer_nobos), (2, 8), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 3, 0
    links = K.collate_links([(np.array([[1, 3], [5, 6]]), np.array([[0, 1, -1], [2, -1, -1]])),
                             (np.array([[0 + 2, 2 + 2]]), np.array([[3, 4, 6]]))], k=3)
    steps = 6
    with torch.no_grad(), kl.use(links):
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=3,
                             output_logits=True, return_dict_in_generate=True)
    out, logits = gen.sequences, torch.stack(gen.logits, 1).float()  # (2, 8 + steps), (2, steps, V)
    # Teacher-forced: the generated tokens fed back without a KV cache give the same logits at every
    # step (greedy tokens themselves are not compared: a random model has near-ties that rounding flips)
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], 1)
    ref = _recompute_logits(model, kl, links, out, full_mask)[:, ids.shape[1] - 1 : -1]
    err = (logits - ref).abs().max().item()
    assert err <= TOL, f"KV-cache logits differ from the recompute path by {err:.2e}"
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * TOL
    assert decisive.sum() >= steps, "too few decisive steps for the argmax check"
    assert torch.equal(out[:, ids.shape[1]:][decisive], ref.argmax(-1)[decisive])
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=3,
                               output_scores=True, return_dict_in_generate=True)
        with kl.use(links):
            inj = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=3,
                                 output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(plain.scores[0], inj.scores[0])  # the prefill saw the knowledge
    kl.detach()


def test_link_index_shifts_spans_past_knowledge_and_bos(tokenizer_bos):
    import pyarrow as pa

    from kcache.kg.tables import LINKS, conform

    tok = tokenizer_bos
    rec = {"id": "a", "knowledge": ["The capital of Zorb is Vel."],
           "source": "[USR] What is the capital of Zorb? [SYS]", "target": " Vel."}
    src = rec["source"]
    enc = tok(src, add_special_tokens=False, return_offsets_mapping=True)
    s0 = src.index("capital")
    t0 = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > s0)
    t1 = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b >= s0 + 7) + 1
    links = pa.table({"sample_id": ["a", "a"], "word": ["capital", "ghost"], "char_start": [s0, 0],
                      "char_end": [s0 + 7, 1],
                      "token_start": [t0, len(enc["input_ids"]) + 5], "token_end": [t1, len(enc["input_ids"]) + 6],
                      "match": ["capital", "x"], "rule": ["exact", "exact"], "num_candidates": [1, 1]})
    links = links.append_column("entity_ids", pa.FixedSizeListArray.from_arrays(pa.array([4, -1, 1, -1]), 2))
    links = conform(links, LINKS, "<t>", metadata={"kcache.kg.fingerprint": "sha256:x"}, k=2)
    ex = B.encode_example(tok, rec, TemplateSpec(), 1024)
    assert ex.source_offset == ex.input_ids.index(tok.bos_token_id, 1) + 1  # after k_ids and x's own BOS
    idx = K.LinkIndex(links)
    spans, ids = idx.for_example("a", ex.input_ids, ex.source_offset, enc["input_ids"], bos=1)
    assert idx.dropped == 1 and ids.tolist() == [[4, -1]]  # the span past the source is dropped
    assert tok.decode(ex.input_ids[spans[0, 0] : spans[0, 1]]).strip() == "capital"
    assert idx.for_example("nope", ex.input_ids, 0, []) is None


def _tiny_kg_links(tok, samples, tmp_path):
    from kcache.kg.importers import kg_from_numpy
    from kcache.kg.link import link_texts

    names = ["capital", "language", "currency", "president", "animal", "city", "official", "name", "money", "people"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((len(names), D)).astype(np.float32))
    kg, emb = kg_from_numpy(tmp_path / "v.npy", tmp_path / "names.txt", model="test")
    links, _ = link_texts(samples["id"].to_pylist(), samples["source"].to_pylist(), kg, tok, k=3)
    return links, emb


def test_train_save_reload_and_random_vectors(tokenizer_bos, tmp_path):
    from kcache.data.synth import synth_samples
    from kcache.kg.tables import KGCompatibilityError, embeddings_table

    tok = tokenizer_bos
    samples = synth_samples(12, seed=4)
    links, emb = _tiny_kg_links(tok, samples, tmp_path)
    assert links.num_rows > 0
    dec = tiny_dec("llama", tok)
    ex, _ = B.encode_examples(tok, samples.to_pylist(), TemplateSpec(), 1024)
    res = K.train_knowla(dec, samples, links, emb, tmp_path / "run", steps=6, batch_size=4, lr=5e-3, lora_r=4,
                         lora_alpha=4, intermediate_size=16, log=lambda s: None)
    kl = res.knowla
    assert res.config["knowla_params"] > 0 and res.config["lora_params"] > 0
    assert res.config["train"]["links_dropped_misaligned"] == 0
    assert all(not p.requires_grad for p in dec.model.parameters())  # decoder frozen afterwards too
    assert float(kl.layers["2"].gate) != 0.5  # the gate was trained
    records = [dict(r, options=[r["target"], r["target_true"]], label=0) for r in samples.to_pylist()]
    s1 = K.multiple_choice_accuracy(res.model, kl, tok, records, links, return_details=True)[1]["scores"]
    dec2 = tiny_dec("llama", tok)
    m2, kl2 = K.load_knowla(tmp_path / "run", dec2, emb)
    s2 = K.multiple_choice_accuracy(m2, kl2, tok, records, links, return_details=True)[1]["scores"]
    assert s1 == s2
    # random vectors: same KG and ids, other values; a run refuses them unless strict=False
    rnd = K.random_embeddings(emb, seed=1)
    assert rnd.num_rows == emb.num_rows and not np.allclose(rnd["vector"].to_pylist(), emb["vector"].to_pylist())
    with pytest.raises(ModelError, match="random"):
        K.load_knowla(tmp_path / "run", tiny_dec("llama", tok), rnd)
    other = embeddings_table(np.zeros((3, D), np.float32), kg_name="other", kg_fingerprint="sha256:" + "0" * 64,
                             model="test")
    with pytest.raises(KGCompatibilityError):
        K.load_knowla(tmp_path / "run", tiny_dec("llama", tok), other)
