"""Model loading helpers: fingerprints, the layer adapter, device/dtype defaults."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_model

from kcache.models import (
    LayerAdapter,
    ModelError,
    fingerprint,
    load_decoder,
    resolve_device,
    resolve_dtype,
    wrap_decoder,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_adapter(arch, tokenizer_nobos):
    model = make_model(arch, len(tokenizer_nobos), layers=3)
    ad = LayerAdapter(model)
    assert ad.num_layers == 3 and ad.hidden_size == 64
    assert ad.site_module("mlp", 2) is model.model.layers[2].mlp
    assert ad.site_module("block", 0) is model.model.layers[0]
    assert ad.embed_tokens() is model.model.embed_tokens
    with pytest.raises(ModelError, match="layer 3 out of range: this model has layers 0..2"):
        ad.site_module("mlp", 3)
    with pytest.raises(ModelError, match="unknown site"):
        ad.site_module("attn", 0)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        LayerAdapter(m)


def test_fingerprint_stable_and_sensitive(tokenizer_nobos):
    a = make_model("llama", len(tokenizer_nobos), seed=1)
    b = make_model("llama", len(tokenizer_nobos), seed=1)
    fa, fb = fingerprint(a, tokenizer_nobos), fingerprint(b, tokenizer_nobos)
    assert fa == fb and fa.matches(fb)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    fb2 = fingerprint(b, tokenizer_nobos)
    assert not fa.matches(fb2) and fa.diff(fb2) == ["weights_hash"]
    c = make_model("mistral", len(tokenizer_nobos), seed=1)
    assert fingerprint(c, tokenizer_nobos).diff(fa)[:2] == ["architecture", "config_hash"]


def test_fingerprint_from_files_and_load(tmp_path, tokenizer_nobos, monkeypatch):
    monkeypatch.setenv("KCACHE_HOME", str(tmp_path / "home"))
    m = make_model("qwen2", len(tokenizer_nobos), seed=2)
    m.save_pretrained(tmp_path / "m")
    tokenizer_nobos.save_pretrained(tmp_path / "m")
    d1 = load_decoder(str(tmp_path / "m"), device="cpu")
    d2 = load_decoder(str(tmp_path / "m"), device="cpu", dtype="bfloat16")
    assert d1.fingerprint.matches(d2.fingerprint)  # identity of the checkpoint, not of the load dtype
    assert d2.dtype == torch.bfloat16 and not any(p.requires_grad
                                                  for p in d1.model.parameters()) and not d1.model.training
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    m.save_pretrained(tmp_path / "m")
    d3 = load_decoder(str(tmp_path / "m"), device="cpu")
    assert d3.fingerprint.diff(d1.fingerprint) == ["weights_hash"]


def test_bad_specs(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_decoder(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_decoder(str(tmp_path / "empty"))


def test_device_dtype_defaults(monkeypatch):
    dev = resolve_device(None)
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # the suite pins KCACHE_COMPUTE=float32: float32 whatever the hardware (test_precision covers "auto")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float32
    monkeypatch.delenv("KCACHE_COMPUTE")
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype("int8", dev)


def test_wrap_decoder_freezes(tokenizer_nobos):
    m = make_model("llama", len(tokenizer_nobos)).train()
    d = wrap_decoder(m, tokenizer_nobos)
    assert not d.model.training and all(not p.requires_grad for p in d.model.parameters())
