"""Fixtures: tiny randomly initialised decoders of three architectures and a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fit/finetune/edit pick bf16 on CPUs that have it ("auto"); tests must not depend on the CPU.
os.environ.setdefault("KCACHE_COMPUTE", "float32")
# In-process CLI calls would otherwise set torch's threads from the machine's load at that moment.
os.environ.setdefault("KCACHE_THREADS", "1")
# Tiny models run fastest single-threaded (and do not fight over cores); the SmolLM2 tests raise it.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Every test starts single-threaded, whatever ran before it (the order is shuffled under
    pytest-randomly) and whatever OMP_NUM_THREADS says: results compared bit for bit within a test
    are then computed at one thread count. Subprocesses get OMP_NUM_THREADS=1 from the tests that
    compare their output (docs/cache-format.md, "What is bit-identical to what"). Tests marked
    slow (the real SmolLM2) keep the count their fixtures choose."""
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield


def _corpus():
    from kcache.data.synth import synth_records

    text = []
    for r in synth_records(300, seed=123):
        text += r["knowledge"] + [r["source"] + r["target"]] + r["paraphrases"]
    text += ["Imagine that { ", " } ", " [SEP] ", "[USR]", "[SYS]"]
    return text


def make_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer_nobos():
    return make_tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def tokenizer_bos():
    return make_tokenizer(add_bos=True)


def make_model(arch: str, vocab: int, layers: int = 4, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=3)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2"]


def tiny_dec(arch: str, tok, seed: int = 0, name: str = "in-memory"):
    """A tiny randomly initialised ``arch`` decoder wrapped with ``tok`` (one place, so every test builds it alike)."""
    from kcache.models import wrap_decoder

    return wrap_decoder(make_model(arch, len(tok), seed=seed), tok, name=name)


@pytest.fixture(params=ARCHS)
def tiny_decoder(request, tokenizer_bos, tokenizer_nobos):
    """A tiny decoder per architecture (llama with a BOS-adding tokenizer, the others without)."""
    tok = tokenizer_bos if request.param == "llama" else tokenizer_nobos
    return tiny_dec(request.param, tok, name=f"tiny-{request.param}")


@pytest.fixture
def demo_samples():
    from kcache.data.synth import synth_samples

    return synth_samples(24, seed=7)


def unlock(root: Path) -> None:
    """Give back the write bits that finalizing took away (tests that corrupt caches on purpose)."""
    for p in Path(root).rglob("*"):
        if p.is_file():
            p.chmod(p.stat().st_mode | 0o200)


def relist(root: Path, *rels: str, part: str = ".") -> None:
    """Record edited files' new size and sha256 in the manifest, as a forger would.

    Readers never read a file past its manifest size; tests of the checks behind that (shapes,
    offsets, codecs) edit a file and then the manifest, like a hostile cache would.
    """
    import hashlib
    import json

    man = Path(root) / "manifest.json"
    doc = json.loads(man.read_text())
    (p,) = [q for q in doc["parts"] if q["path"] == part]
    for rel in rels:
        data = (Path(root) / part / rel).read_bytes()
        p["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    man.chmod(0o644)
    man.write_text(json.dumps(doc))


def cli_env(home) -> dict:
    """Environment for ``kcache`` run in a subprocess: one thread (results comparable across
    processes), unbuffered output, its own ``KCACHE_HOME``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KCACHE_HOME": str(home),
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_nobos):
    """A tiny Llama saved as an HF directory, shared by a module's subprocess tests."""
    d = tmp_path_factory.mktemp("model") / "tiny-llama"
    make_model("llama", len(tokenizer_nobos), layers=4).save_pretrained(d)
    tokenizer_nobos.save_pretrained(d)
    return d


@pytest.fixture
def saved_model(tmp_path, tokenizer_nobos, monkeypatch):
    """A tiny Llama saved as an HF directory (for commands run in subprocesses)."""
    monkeypatch.setenv("KCACHE_HOME", str(tmp_path / "home"))
    d = tmp_path / "tiny-llama"
    model = make_model("llama", len(tokenizer_nobos), layers=4)
    model.save_pretrained(d)
    tokenizer_nobos.save_pretrained(d)
    return d
