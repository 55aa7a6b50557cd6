"""LoRA / KaSA / SFT baselines, KaSA's regulariser and weight recovery, multiple-choice scoring
and the CLI, on tiny fixtures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, tiny_dec
from torch import nn

from kcache.align import TemplateSpec
from kcache.methods import baselines as B
from kcache.models import ModelError


@pytest.fixture(scope="module")
def samples():
    from kcache.data.synth import synth_samples

    return synth_samples(8, seed=3)


def _decoder(tok, seed=0):
    return tiny_dec("llama", tok, seed=seed, name="tiny")


def _losses(model, tok, samples):
    ex, _ = B.encode_examples(tok, samples.to_pylist(), TemplateSpec(), 1024)
    return B.mean_target_loss(model, ex, B.pad_id(tok), batch_size=3)


@pytest.mark.parametrize("method,lr", [("lora", 2e-2), ("kasa", 2e-2), ("sft", 2e-3)])
def test_training_reduces_loss_and_reloads_identically(method, lr, tokenizer_bos, samples, tmp_path):
    tok = tokenizer_bos
    dec = _decoder(tok)
    before = _losses(dec.model, tok, samples)
    res = B.train_baseline(dec, samples, method, tmp_path / method, steps=8, batch_size=4, lr=lr, rank=4, alpha=8,
                           warmup=0.0, log=lambda s: None)
    after = _losses(res.model, tok, samples)
    assert sum(after) < sum(before) - 0.1
    assert 0 < res.trainable_params <= res.total_params
    if method == "sft":
        assert res.trainable_params == res.total_params and (tmp_path / method / B.SFT_WEIGHTS).exists()
    else:
        assert res.trainable_params < res.total_params / 10
        assert (tmp_path / method / B.ADAPTER_DIR / "adapter_model.safetensors").exists()
    assert res.config["model"] == dec.fingerprint.to_dict()
    reloaded = B.load_baseline(tmp_path / method, _decoder(tok))
    assert _losses(reloaded, tok, samples) == after
    with pytest.raises(ModelError, match="differs"):  # another model
        B.load_baseline(tmp_path / method, _decoder(tok, seed=1))


def test_kasa_regulariser_added_and_weighted(tokenizer_nobos, samples, tmp_path):
    from peft import get_peft_model

    tok = tokenizer_nobos
    regs = {}
    for beta, gamma in [(0.0, 0.0), (1e-2, 0.0), (0.0, 1e-2), (1e-2, 1e-2)]:
        torch.manual_seed(0)
        pm = get_peft_model(make_model("llama", len(tok)),
                            B.lora_config("kasa", rank=4, alpha=8, dropout=0.0, targets=B.DEFAULT_TARGETS,
                                          layers=None, kasa_beta=beta, kasa_gamma=gamma))
        regs[beta, gamma] = float(B.kasa_loss(pm).detach())
    assert regs[0.0, 0.0] == 0 and regs[1e-2, 0.0] > 0 and regs[0.0, 1e-2] > 0 and regs[1e-2, 0.0] != regs[0.0, 1e-2]
    assert regs[1e-2, 1e-2] == pytest.approx(regs[1e-2, 0.0] + regs[0.0, 1e-2], rel=1e-5)
    # in training every step's loss is the task loss plus the regulariser
    res = B.train_baseline(_decoder(tok), samples, "kasa", tmp_path / "k", steps=3, batch_size=4, rank=4, alpha=8,
                           kasa_beta=1e-2, kasa_gamma=1e-2, log=lambda s: None)
    for h in res.history:
        assert h["reg_loss"] > 0 and h["loss"] == pytest.approx(h["task_loss"] + h["reg_loss"], rel=1e-5)
    res0 = B.train_baseline(_decoder(tok), samples, "lora", tmp_path / "l", steps=1, batch_size=4, rank=4, alpha=8,
                            log=lambda s: None)
    assert res0.history[0]["reg_loss"] == 0


def test_kasa_original_weights_recoverable(tokenizer_nobos, samples, tmp_path):
    tok = tokenizer_nobos
    fresh = make_model("llama", len(tok))
    dec = _decoder(tok)
    res = B.train_baseline(dec, samples, "kasa", tmp_path / "k", steps=2, batch_size=4, rank=4, alpha=8,
                           log=lambda s: None)
    names = B.target_linear_names(fresh, B.DEFAULT_TARGETS)
    trunc = B._base_linear(dec.model, names[0]).weight.detach().clone()
    orig = fresh.get_submodule(names[0]).weight.detach()
    assert not torch.allclose(trunc, orig)  # KaSA truncated the base in place
    assert torch.linalg.matrix_rank(trunc) == min(trunc.shape) - 4
    # reloading onto an already truncated base (whose stale fingerprint still matches) is refused
    stale = SimpleNamespace(model=_truncated_copy(tok, res), tokenizer=tok, fingerprint=dec.fingerprint)
    with pytest.raises(ModelError, match="targeted base weights"):
        B.load_baseline(tmp_path / "k", stale)
    assert B.restore_original_weights(res.model, tmp_path / "k" / B.ORIGINAL_WEIGHTS) == len(names)
    for n in names:
        assert torch.equal(B._base_linear(dec.model, n).weight, fresh.get_submodule(n).weight)
    base = res.model.unload()  # drop the adapter: the original model again
    ids = torch.randint(4, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, fresh(input_ids=ids).logits)


def _truncated_copy(tok, res):
    """A plain model whose targeted weights are the KaSA-truncated ones of ``res``."""
    m = make_model("llama", len(tok))
    for n in B.target_linear_names(m, B.DEFAULT_TARGETS):
        with torch.no_grad():
            m.get_submodule(n).weight.copy_(B._base_linear(res.model, n).weight)
    return m


class _FavouringLM(nn.Module):
    """Predicts the token ids in ``favoured`` with high probability, every position."""

    def __init__(self, vocab: int, favoured: list[int]):
        super().__init__()
        self.vocab, self.favoured = vocab, favoured
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favoured] = 8.0
        return SimpleNamespace(logits=logits)


def test_multiple_choice_constructed_case(tokenizer_nobos):
    tok = tokenizer_nobos
    src = "[USR] What is the capital of Zorb? [SYS]"
    options = [" Velnor.", " Tokyo and more words here.", " Brask."]
    good = [t for t, m in zip(*B.encode_input(tok, src, options[1])) if m]
    recs = [{"id": "q1", "source": src, "target": options[1], "options": options, "label": 1},
            {"id": "q2", "source": src, "target": options[0], "options": options, "label": 0},
            {"id": "q3", "source": src, "target": options[1], "options": options}]  # unlabelled: scored, not counted
    lm = _FavouringLM(len(tok), good)
    acc, det = B.multiple_choice_accuracy(lm, tok, recs, batch_size=2, return_details=True)
    assert det["predictions"] == [1, 1, 1] and acc == 0.5
    assert len(det["scores"]) == 3 and all(len(s) == 3 for s in det["scores"])
    # the longest option wins on *mean* loss although its summed loss is not the smallest
    assert det["scores"][0][1] < det["scores"][0][0]
    with pytest.raises(ValueError, match="no options"):
        B.multiple_choice_accuracy(lm, tok, [{"id": "x", "source": src, "target": " a"}])


def test_multiple_choice_batching_invariant(tokenizer_bos, samples):
    tok = tokenizer_bos
    model = make_model("llama", len(tok))
    recs = [dict(r, options=[r["target"], r["target_true"], " no idea at all."], label=0) for r in samples.to_pylist()]
    s1 = B.multiple_choice_scores(model, tok, recs, batch_size=1)
    s2 = B.multiple_choice_scores(model, tok, recs, batch_size=7)
    assert torch.allclose(torch.tensor(s1), torch.tensor(s2), atol=1e-5)


def test_lr_schedule_shape():
    lrs = [B.lr_at(s, 20, 1e-4, 0.1) for s in range(20)]
    assert lrs[0] == pytest.approx(1e-5) and max(lrs) == pytest.approx(1e-4) and lrs[-1] < 2e-5


def test_cli_train_and_eval(tokenizer_nobos, samples, tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from kcache.cli import mount
    from kcache.data.samples import write_samples

    tok = tokenizer_nobos
    model_dir = tmp_path / "tiny-model"
    make_model("llama", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    recs = [dict(r, options=[r["target"], r["target_true"]], label=0) for r in samples.to_pylist()]
    write_samples(recs, tmp_path / "s.jsonl")
    app = typer.Typer()
    mount(app, names=("train-baseline", "eval-choice", "knowla"))
    run = CliRunner().invoke
    r = run(app, ["train-baseline", "--method", "lora", "--samples", str(tmp_path / "s.jsonl"), "--out",
                  str(tmp_path / "out"),
                  "--model", str(model_dir), "--steps", "2", "--rank", "4", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "trainable parameters" in r.output and (tmp_path / "out" / B.CONFIG_FILE).exists()
    r = run(app, ["eval-choice", "--samples", str(tmp_path / "s.jsonl"), "--baseline", str(tmp_path / "out"), "--model",
                  str(model_dir), "--device", "cpu", "--report", str(tmp_path / "rep.json")])
    assert r.exit_code == 0, r.output
    assert "accuracy " in r.output and json.loads((tmp_path / "rep.json").read_text())["samples"] == len(recs)
    r = run(app, ["train-baseline", "--method", "nope", "--samples", str(tmp_path / "s.jsonl"), "--out",
                  str(tmp_path / "o2"), "--model", str(model_dir)])
    assert r.exit_code == 2 and "unknown method" in r.output
