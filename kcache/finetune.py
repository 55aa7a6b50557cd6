"""DIEKÆ section 3.3: fine-tune the encoders end to end through the frozen decoder.

Objective: cross-entropy of the target tokens of ``D(E(K, x) + x)`` - the encoders read
``k_ids + x_ids``, their outputs (shifted left by ``|K|``) are added at the bundle's site of each
injected layer, the decoder reads ``x_ids`` and predicts. The decoder's weights are frozen
(``requires_grad=False``, eval mode) and receive no gradients; the gradients of the loss flow
*through* its activations back into the encoders, which are the only trainable parameters.

Conventions (shared with ``kcache.evaluate``):

* Scored tokens = target tokens (``align.encode_input``'s mask) at input positions ``j > 0``;
  the loss is the mean of ``-log p(token)`` over every scored token of the batch (pooled, so a
  batch's loss is its log-perplexity). Source tokens, knowledge and padding never count.
* Learning rate and optimizer exactly as ``kcache.fit``: AdamW, linear warm-up from ``lr_min``
  to ``lr_max`` over ``warmup_fraction`` of the optimizer steps, cosine back to ``lr_min``
  (``train.lr_at``), per-encoder gradient clipping.
* ``train`` split for training, ``validation`` split for picking the best step (lowest
  validation NLL, evaluated every ``eval_every`` steps and at step 0, so the output is never
  worse on validation than the bundle it started from). ``test`` is never read.
* bf16 autocast where the hardware has it (``compute``, kcache.precision), float32 master weights; ``seed`` fixes the
encoder init (``--from-scratch``)
  and the sample order; reruns resume from ``out/checkpoint`` (``train.save_checkpoint``, fit's format).

Helpers used by ``kcache.edit`` too: ``trainable_additions`` (``inject.encoder_additions``
without ``no_grad``), ``scored_logprobs``, ``train_encoders``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from kcache._io import now, pyplot, save_png, sha256_file
from kcache.align import (
    DEFAULT_SINK,
    TemplateSpec,
    encode_sample,
    pad_right,
    prefix_parts,
    sink_of,
    targets_of,
)
from kcache.encoders import EncoderConfig, EncoderStack, load_bundle, publish_bundle
from kcache.inject import add_at_site, check_fingerprint, stack_additions
from kcache.lower_blocks import LowerBlocks, untouched_blocks
from kcache.models import Decoder, backward_attention
from kcache.precision import autocast_for
from kcache.train import (
    OptimConfig,
    adamw,
    length_grouped_batches,
    load_checkpoint,
    lr_at,
    new_state,
    optimizer_step,
    run_settings,
    save_checkpoint,
    schedule_steps,
)


@dataclasses.dataclass
class FinetuneConfig(OptimConfig):
    epochs: int = 1
    max_train_samples: int | None = None  # first N usable train samples (demo budget)
    val_max_samples: int = 256
    # --from-scratch (paper 6.2): fresh encoders; these say where and how
    from_scratch: bool = False
    layers: list[int] | str | None = None  # default "3-8" when from scratch
    site: str = "block"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    template: str = TemplateSpec.template
    separator: str = TemplateSpec.separator
    template_end: str = "eos"
    sink: int = DEFAULT_SINK  # from scratch: leading input positions never written (a bundle brings its own)
    max_length: int | None = None  # default: the bundle's (1024 from scratch)
    checkpoint_every: int = 50
    # "ce": the target tokens' cross-entropy (DIEKÆ 3.3); "kl": KL to D(K,x)'s next-token
    # distributions at every input position (batch_kl); "ce+kl": their sum. Validation: target NLL.
    objective: str = "ce"


# ---------------------------------------------------------------------------------------------
# the differentiable forward


def trainable_additions(decoder: Decoder, stack: EncoderStack, k_ids: list[list[int]], x_ids: list[list[int]],
                        layers: list[int]) -> dict[int, torch.Tensor]:
    """``inject.encoder_additions`` with gradients: ``{layer: (B, max len(x), hidden)}``,
    right-padded, encoder output shifted left by ``len(k_ids[i])``, padding rows and the first
    ``stack.sink`` input positions zero."""
    return stack_additions(decoder, stack, k_ids, x_ids, layers)


def scored_positions(masks: list[list[bool]]) -> list[tuple[int, int]]:
    """(item, input position j) of every scored token: target tokens at ``j > 0``."""
    return [(i, j) for i, m in enumerate(masks) for j, v in enumerate(m) if v and j > 0]


def scored_logprobs(decoder: Decoder, stack: EncoderStack | None, site: str, layers: list[int], k_ids: list[list[int]],
                    x_ids: list[list[int]], masks: list[list[bool]],
                    pad_id: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """``log p(x_ids[i][j] | x_ids[i][:j])`` under ``D(E(K, x) + x)`` for every scored token,
    flat ``(N,)`` float32 (differentiable w.r.t. the encoders), and the item of each entry.

    ``stack=None`` scores the plain decoder ``D(x)``. The LM head runs only on the rows that
    predict a scored token.
    """
    dev = decoder.device
    if pad_id is None:
        t = decoder.tokenizer
        pad_id = t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)
    pos = scored_positions(masks)
    if not pos:
        return torch.zeros(0, device=dev), []
    ids, am = pad_right([list(x) for x in x_ids], pad_id)
    add = trainable_additions(decoder, stack, k_ids, x_ids, layers) if stack is not None else {}
    with add_at_site(decoder, site, add):
        hidden = decoder.layers.backbone()(input_ids=ids.to(dev), attention_mask=am.to(dev),
                                           use_cache=False).last_hidden_state
    rows = torch.tensor([i for i, _ in pos], device=dev)
    cols = torch.tensor([j - 1 for _, j in pos], device=dev)
    toks = torch.tensor([x_ids[i][j] for i, j in pos], device=dev)
    logits = decoder.model.get_output_embeddings()(hidden[rows, cols]).float()
    lp = logits.log_softmax(-1).gather(1, toks[:, None])[:, 0]
    return lp, [i for i, _ in pos]


OBJECTIVES = ("ce", "kl", "ce+kl")


def kl_positions(x_ids: list[list[int]]) -> list[tuple[int, int]]:
    """(item, input position j) of every position that predicts a next input token: ``j < len(x) - 1``."""
    return [(i, j) for i, x in enumerate(x_ids) for j in range(len(x) - 1)]


def batch_kl(decoder: Decoder, stack: EncoderStack, site: str, layers: list[int], items: list[Item],
             autocast) -> tuple[torch.Tensor, int]:
    """(sum over positions of ``KL(D(K,x) || D(E(K,x)+x))``, position count): the next-token
    distributions at every input position that predicts a next input token (source and target).

    The teacher ``D(K, x)`` reads the knowledge in context; the student only through the encoders.
    Unlike the target CE, this cannot be lowered by learning the targets' style alone: at every
    position the teacher's distribution says what *this* knowledge changes.
    """
    dev = decoder.device
    t = decoder.tokenizer
    pad = t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)
    k_ids, x_ids = [it.k_ids for it in items], [it.x_ids for it in items]
    pos = kl_positions(x_ids)
    if not pos:
        return torch.zeros((), device=dev), 0
    rows = torch.tensor([i for i, _ in pos], device=dev)
    head = decoder.model.get_output_embeddings()
    backbone = decoder.layers.backbone()
    ids_b, am_b = pad_right([list(k) + list(x) for k, x in zip(k_ids, x_ids)], pad)
    with torch.no_grad(), autocast():
        hb = backbone(input_ids=ids_b.to(dev), attention_mask=am_b.to(dev), use_cache=False).last_hidden_state
        cols_b = torch.tensor([len(k_ids[i]) + j for i, j in pos], device=dev)
        teacher = head(hb[rows, cols_b]).float().log_softmax(-1)
    ids, am = pad_right([list(x) for x in x_ids], pad)
    add = trainable_additions(decoder, stack, k_ids, x_ids, layers)
    with autocast(), add_at_site(decoder, site, add):
        h = backbone(input_ids=ids.to(dev), attention_mask=am.to(dev), use_cache=False).last_hidden_state
        student = head(h[rows, torch.tensor([j for _, j in pos], device=dev)]).float().log_softmax(-1)
    kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return kl.sum(), len(pos)


@dataclasses.dataclass
class Item:
    """One training/validation sequence: knowledge prefix, input, target mask."""

    k_ids: list[int]
    x_ids: list[int]
    mask: list[bool]
    sample_id: str = ""


def batch_nll(decoder, stack, site, layers, items: list[Item], autocast) -> tuple[torch.Tensor, int]:
    """(sum of -log p over the batch's scored tokens, token count)."""
    with autocast():
        lp, _ = scored_logprobs(decoder, stack, site, layers, [it.k_ids for it in items], [it.x_ids for it in items],
                                [it.mask for it in items])
    return -lp.sum(), int(lp.numel())


@torch.no_grad()
def mean_nll(decoder, stack, site, layers, items: list[Item], batch_size: int, autocast) -> float:
    """Pooled mean NLL over all scored tokens of ``items`` (its exp is the perplexity)."""
    if stack is not None:
        was = stack.training
        stack.eval()
    total, n = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i].k_ids) + len(items[i].x_ids))
    for a in range(0, len(order), batch_size):
        s, c = batch_nll(decoder, stack, site, layers, [items[i] for i in order[a : a + batch_size]], autocast)
        total += float(s)
        n += c
    if stack is not None and was:
        stack.train()
    return total / n if n else float("nan")


# ---------------------------------------------------------------------------------------------
# data


def _split_rows(table, split: str) -> list[dict]:
    return [r for r in table.to_pylist() if r.get("split") == split]


def knowledge_items(tokenizer, rows: list[dict], spec: TemplateSpec, max_length: int) -> tuple[list[Item], int]:
    """Tokenise samples as stage one does (``align.encode_sample``); -> (items, skipped)."""
    items, skipped = [], 0
    prefix = prefix_parts(tokenizer, spec)
    for r in rows:
        e = encode_sample(tokenizer, r["knowledge"] or [], r["source"], r["target"], spec, max_length, prefix)
        if e.skip_reason or not any(m for j, m in enumerate(e.target_mask) if j > 0):
            skipped += 1
            continue
        items.append(Item(e.k_ids, e.x_ids, e.target_mask, r["id"]))
    return items, skipped


# ---------------------------------------------------------------------------------------------
# the training loop (fine-tuning and editing)


def train_encoders(decoder: Decoder, stack: EncoderStack, *, site: str, layers: list[int], train: list[Item],
                   val: list[Item] | None,
                   cfg, out: Path, run_id: dict, save_meta, progress: bool = True, on_step=None, log=None) -> dict:
    """AdamW + warm-up/cosine (``train.lr_at``) on the target CE of ``train``; every ``eval_every``
    steps (and at step 0) the validation NLL picks the best weights, written with
    ``save_meta(state) -> meta`` as a bundle in ``out``. Without ``val`` the last step is kept.
    Resumes from ``out/checkpoint`` when it holds the same ``run_id``. -> final state dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    autocast, opt = _make_trainable(decoder, stack, cfg)
    total_steps, warmup = schedule_steps(cfg, len(train))
    run_id = json.loads(json.dumps(run_id, default=str))
    state, resumed = _resume_or_start(out, stack, opt, run_id)
    run = _TrainRun(decoder, stack, site, layers, train, val, cfg, out, save_meta, autocast, opt, total_steps,
                    warmup, state,
                    params={l: list(stack.encoder(l).parameters()) for l in layers}, vbs=max(cfg.batch_size, 8))
    lower = _lower_blocks(run)
    with backward_attention(decoder), (lower.replay(record=True) if lower else contextlib.nullcontext()):
        if not state["history"]:
            e = run.evaluate_now(0, None, None)
            if log and val:
                log(f"step 0: validation NLL {e['val_nll']:.4f} (ppl {e['val_ppl'] or float('inf'):.3f})")
        t0 = time.perf_counter()
        tokens = _train_steps(run, progress, on_step, log)
    _finish_training(run, resumed, t0, tokens)
    return state


LOWER_BLOCKS_MAX_BYTES = 1 << 30  # kept lower-block states (validation first, then training inputs) up to this


def _lower_blocks(run: _TrainRun) -> LowerBlocks | None:
    """The decoder's blocks below the first injected one, kept per input the first time a step or
    an evaluation runs them (within ``LOWER_BLOCKS_MAX_BYTES``): the encoders cannot change them,
    so later epochs and evaluations start above them (``kcache.lower_blocks``). None when there are
    none (site ``mlp`` at layer 0)."""
    dec = run.decoder
    blocks = min(untouched_blocks(run.site, run.layers), dec.layers.num_layers)
    return LowerBlocks(dec, blocks, max_bytes=LOWER_BLOCKS_MAX_BYTES) if blocks > 0 else None


def _make_trainable(decoder: Decoder, stack: EncoderStack, cfg):
    """Seed; freeze the decoder (eval mode, no gradients, whatever the caller did); move the
    encoders to its device in train mode with gradients. -> (autocast, AdamW optimizer)."""
    dev = decoder.device
    autocast = autocast_for(dev, cfg.compute, frozen=decoder.dtype)
    torch.manual_seed(cfg.seed)
    decoder.model.eval()
    for p in decoder.model.parameters():  # frozen, whatever the caller did
        p.requires_grad_(False)
    stack.to(dev)
    for p in stack.parameters():
        p.requires_grad_(True)
    stack.train()
    opt = adamw(stack.parameters(), cfg)
    return autocast, opt


def _resume_or_start(out: Path, stack: EncoderStack, opt, run_id: dict) -> tuple[dict, bool]:
    """Resume logic: load ``out/checkpoint`` into the encoders and optimizer (refused when it holds
    another run), or start fresh. -> (state, resumed)."""
    state = load_checkpoint(out, stack, opt)
    if state and state.get("run") != run_id:
        raise ValueError(f"{out}/checkpoint: a checkpoint of a different run (other samples, "
                         "encoders or settings) is there; use another --out or delete it")
    resumed = state is not None
    return state or new_state(run_id), resumed


@dataclasses.dataclass
class _TrainRun:
    """What the fine-tuning/editing loop works on: the frozen decoder, the encoders being
    trained, the data, the optimizer and schedule, and ``state`` (what a checkpoint holds)."""

    decoder: Decoder
    stack: EncoderStack
    site: str
    layers: list[int]
    train: list[Item]
    val: list[Item] | None
    cfg: object
    out: Path
    save_meta: object
    autocast: object
    opt: torch.optim.Optimizer
    total_steps: int
    warmup: int
    state: dict
    params: dict
    vbs: int

    def evaluate_now(self, step, lr, train_nll) -> dict:
        """Validation NLL, recorded in the history; with ``val``, the best weights so far are
        published as the bundle. -> the history entry."""
        state, val = self.state, self.val
        v = mean_nll(self.decoder, self.stack, self.site, self.layers, val, self.vbs,
                     self.autocast) if val else float("nan")
        entry = {"step": step, "lr": lr, "train_nll": train_nll, "val_nll": v,
                 "val_ppl": math.exp(v) if v == v and v < 700 else None}
        state["history"].append(entry)
        if not val:
            return entry
        if state["best"] is None or v < state["best"]:
            state.update(best=v, best_step=step, bad_evals=0)
            publish_bundle(self.out, self.stack, self.save_meta(state))
        else:
            state["bad_evals"] += 1
        return entry


def _train_steps(run: _TrainRun, progress: bool, on_step, log) -> int:
    """The loop, from ``run.state`` (epoch, batch in epoch, step) to the last step or an early
    stop: a seeded shuffle per epoch, an optimizer step every ``grad_accum`` batches, evaluation
    every ``eval_every`` steps, a checkpoint every ``checkpoint_every``. -> tokens seen."""
    from tqdm.auto import tqdm

    cfg, state, train = run.cfg, run.state, run.train
    step = state["step"]
    stop = step >= run.total_steps
    bar = tqdm(total=run.total_steps, initial=step, desc="finetune", unit="step", disable=not progress,
               dynamic_ncols=True)
    tokens = 0
    acc_loss, acc_tok = 0.0, 0
    while not stop:
        epoch = state["epoch"]
        rng = np.random.default_rng([cfg.seed, epoch])
        # Grouped by the input's length (the decoder's pass), then the knowledge's (the encoders').
        batches = length_grouped_batches(rng.permutation(len(train)),
                                         [(len(it.x_ids), len(it.k_ids)) for it in train],
                                         cfg.batch_size, cfg.length_groups, rng)
        micro = 0
        for bi in range(state["batch_in_epoch"], len(batches)):
            items = [train[i] for i in batches[bi]]
            s, n = _backward(run, items)
            acc_loss += float(s.detach())
            acc_tok += n
            tokens += sum(len(it.k_ids) + len(it.x_ids) for it in items)
            micro += 1
            if micro % cfg.grad_accum and bi + 1 < len(batches):
                continue
            lr = lr_at(step, run.total_steps, run.warmup, cfg.lr_min, cfg.lr_max)
            optimizer_step(run.opt, run.params, cfg.clip_norm, lr)
            step += 1
            state.update(step=step, batch_in_epoch=bi + 1)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == run.total_steps:
                stop = _evaluate_step(run, step, lr, acc_loss / max(acc_tok, 1), bar, log)
                acc_loss, acc_tok = 0.0, 0
            if step % cfg.checkpoint_every == 0 or stop or step == run.total_steps:
                save_checkpoint(run.out, run.stack, run.opt, state)
            if on_step:
                on_step(step)
            if stop or step >= run.total_steps:
                stop = True
                break
        if not stop:
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    return tokens


def _backward(run: _TrainRun, items: list[Item]):
    """Forward and backward pass of one micro-batch: the objective (target CE, and/or KL to the
    bare decoder for ``objective`` "kl"/"ce+kl"), scaled by ``1 / grad_accum``.
    -> (summed target NLL, target tokens)."""
    s, n = batch_nll(run.decoder, run.stack, run.site, run.layers, items, run.autocast)
    objective = getattr(run.cfg, "objective", "ce")  # EditConfig shares the loop: target CE
    loss = s / max(n, 1) if "ce" in objective.split("+") else 0.0
    if "kl" in objective.split("+"):
        kl, m = batch_kl(run.decoder, run.stack, run.site, run.layers, items, run.autocast)
        loss = loss + kl / max(m, 1)
    if torch.is_tensor(loss) and loss.requires_grad:
        (loss / run.cfg.grad_accum).backward()
    return s, n


def _evaluate_step(run: _TrainRun, step: int, lr: float, train_nll: float, bar, log) -> bool:
    """Evaluate and report (bar, ``log``); decide whether to stop (with ``val``: divergence, or
    ``patience`` evaluations without improvement; the reason goes in the state)."""
    state, val, cfg = run.state, run.val, run.cfg
    e = run.evaluate_now(step, lr, train_nll)
    bar.set_postfix(val_nll=f"{e['val_nll']:.4f}", train_nll=f"{e['train_nll']:.4f}")
    if log:
        shown = f", validation NLL {e['val_nll']:.4f} (ppl {e['val_ppl'] or float('inf'):.3f})" if val else ""
        log(f"step {step}/{run.total_steps}: train NLL {e['train_nll']:.4f}" + shown)
    if val and not math.isfinite(e["val_nll"]):
        state["stopped"] = "diverged (non-finite validation loss)"
        return True
    if val and state["bad_evals"] >= cfg.patience:
        state["stopped"] = f"early stop: no improvement in {cfg.patience} evaluations"
        return True
    return False


def _finish_training(run: _TrainRun, resumed: bool, t0: float, tokens: int) -> None:
    """Publish the last weights when there is no validation set, write the final checkpoint, the
    run figures into the state, history.json and curves.png; encoders back in eval mode."""
    state, out = run.state, run.out
    state.setdefault("stopped", "finished all steps")
    if not run.val:  # no selection: the last weights
        state.update(best_step=state["step"])
        publish_bundle(out, run.stack, run.save_meta(state))
    save_checkpoint(out, run.stack, run.opt, state)
    state["_resumed"] = resumed
    state["_wall_seconds"] = time.perf_counter() - t0
    state["_tokens_per_second"] = tokens / max(state["_wall_seconds"], 1e-9)
    (out / "history.json").write_text(json.dumps(state["history"], indent=1))
    plot_history(state["history"], out / "curves.png")
    run.stack.eval()


def plot_history(history: list[dict], path: Path, title: str = "fine-tuning: target-token NLL") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    tr = [(h["step"], h["train_nll"]) for h in history if h.get("train_nll") is not None]
    va = [(h["step"], h["val_nll"]) for h in history if h.get("val_nll") is not None and h["val_nll"] == h["val_nll"]]
    if tr:
        ax.plot(*zip(*tr), marker=".", label="train (mean since last eval)")
    if va:
        ax.plot(*zip(*va), marker="o", label="validation")
    ax.set(title=title, xlabel="optimizer step", ylabel="mean NLL per target token (nats)")
    ax.legend(fontsize=8)
    save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# fine-tuning


def start_stack(decoder: Decoder, encoders, cfg) -> tuple[EncoderStack, dict, dict]:
    """-> (stack, base meta for the output bundle, provenance). From a bundle (its site, layers,
    template, max_length; refused when made for another model), or fresh (``cfg.from_scratch``)."""
    from kcache.align import parse_layers

    fp = decoder.fingerprint.to_dict()
    if cfg.from_scratch:
        layers = parse_layers(cfg.layers if cfg.layers is not None else "3-8", decoder.layers.num_layers)
        econf = EncoderConfig(d_model=decoder.layers.hidden_size, hidden_size=cfg.hidden_size,
                              num_layers=cfg.num_layers,
                              num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size)
        stack = EncoderStack(econf, layers, seed=cfg.seed)
        stack.sink = cfg.sink
        meta = {"site": cfg.site, "template": {"template": cfg.template, "separator": cfg.separator,
                                               "end": cfg.template_end},
                "max_length": int(cfg.max_length or 1024), "model": fp, "cache": None, "targets": "none",
                "sink": cfg.sink}
        return stack, meta, {"from": "scratch", "seed": cfg.seed}
    if encoders is None:
        raise ValueError("give an encoder bundle to start from (--encoders DIR) or --from-scratch")
    from kcache.encoders import read_bundle_config

    doc = read_bundle_config(encoders)
    check_fingerprint(doc["model"], decoder, f"encoder bundle {encoders}")
    stack, doc = load_bundle(encoders, fp)
    if cfg.layers is not None:
        want = parse_layers(cfg.layers, decoder.layers.num_layers)
        missing = [l for l in want if l not in stack.layers]
        if missing:
            raise ValueError(f"--layers {missing} not in the bundle {encoders} (it has {stack.layers})")
        sub = EncoderStack(stack.config, want)
        for l in want:
            sub.encoder(l).load_state_dict(stack.encoder(l).state_dict())
        stack = sub
    stack.sink = sink_of(doc)
    meta = {"site": doc["site"], "template": doc["template"], "max_length": int(cfg.max_length or doc["max_length"]),
            "model": fp, "cache": doc.get("cache"), "targets": targets_of(doc), "sink": stack.sink}
    prov = {"from": str(encoders), "source_weights": sha256_file(Path(encoders) / "encoders.safetensors"),
            "source_training": doc.get("training"), "source_created": doc.get("created")}
    return stack, meta, prov


def finetune(decoder: Decoder, samples, encoders, out, cfg: FinetuneConfig | None = None, progress: bool = True,
             on_step=None, log=None) -> dict:
    """Fine-tune encoders (a bundle directory, or fresh with ``cfg.from_scratch``) on the target CE
    of ``D(E(K,x)+x)``; writes the best bundle, ``history.json``, ``curves.png`` and
    ``summary.json`` to ``out`` and returns the summary. A finished run with the same settings
    is not repeated (``summary["skipped"]``); an interrupted one resumes. Holds the output lock on
    ``out`` throughout (kcache.lock): one writer per output."""
    from kcache.lock import output_lock

    with output_lock(out, "fine-tune into it"):
        return _finetune(decoder, samples, encoders, out, cfg, progress, on_step, log)


def _dtype_key(decoder: Decoder) -> dict:
    """The decoder dtype as part of a finetune run's identity, only where it is not the dtype every
    earlier kcache loaded on that device (bf16 on CUDA, float32 elsewhere): runs and checkpoints made
    before the key existed keep matching, and a bf16 run on CPU is a different run."""
    dtype = str(decoder.dtype).removeprefix("torch.")
    return {} if dtype == ("bfloat16" if decoder.device.type == "cuda" else "float32") else {"decoder_dtype": dtype}


def _finetune(decoder: Decoder, samples, encoders, out, cfg, progress, on_step, log) -> dict:
    from kcache.data.samples import read_samples, sample_set_fingerprint

    cfg = cfg or FinetuneConfig()
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {cfg.objective!r}")
    out = Path(out)
    table = samples if not isinstance(samples, (str, Path)) else read_samples(samples)
    stack, base_meta, prov = start_stack(decoder, encoders, cfg)
    layers, site = list(stack.layers), base_meta["site"]
    t = base_meta["template"]
    spec = TemplateSpec(t["template"], t["separator"], t["end"])
    train, skipped_tr = knowledge_items(decoder.tokenizer, _split_rows(table, "train"), spec, base_meta["max_length"])
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    val, skipped_va = knowledge_items(decoder.tokenizer, _split_rows(table, "validation"), spec,
                                      base_meta["max_length"])
    val = val[: cfg.val_max_samples]
    if not train or not val:
        raise ValueError("need train and validation samples with knowledge and targets (have "
                         f"{len(train)} / {len(val)})")
    run_id = {"samples": sample_set_fingerprint(table), "model": base_meta["model"], **_dtype_key(decoder),
              "start": {k: v for k, v in prov.items() if k != "source_training"},
              "config": run_settings(cfg) | {"layers": layers}}

    summary_path = out / "summary.json"
    if summary_path.exists() and (out / "config.json").exists():
        old = json.loads(summary_path.read_text())
        if old.get("run") == json.loads(json.dumps(run_id, default=str)):
            old["skipped"] = True
            if log:
                log(f"finetune: {out} complete for these settings (skipped)")
            return old

    def save_meta(state):
        best = state["best"]
        return base_meta | {
            "created": now(),
            "training": {"finetuned": True,
                         "objective": "cross-entropy on target tokens of D(E(K,x)+x), decoder frozen (DIEKAE 3.3)",
                         "start": prov, "step": state["step"], "epoch": state["epoch"],
                         "config": run_settings(cfg) | {"layers": layers},
                         "val_nll": best, "val_ppl": math.exp(best) if best is not None and best < 700 else None,
                         "train_samples": len(train), "val_samples": len(val)},
        }

    state = train_encoders(decoder, stack, site=site, layers=layers, train=train, val=val, cfg=cfg, out=out,
                           run_id=run_id, save_meta=save_meta, progress=progress, on_step=on_step, log=log)
    hist = state["history"]
    first = hist[0]["val_nll"] if hist else float("nan")
    summary = {
        "bundle": str(out), "run": state["run"], "skipped": False, "resumed": state["_resumed"],
        "start": {k: v for k, v in prov.items() if k != "source_training"},
        "layers": layers, "site": site, "train_samples": len(train), "val_samples": len(val),
        "skipped_samples": {"train": skipped_tr, "validation": skipped_va},
        "steps": state["step"], "best_step": state["best_step"], "stopped": state["stopped"],
        "val_nll_start": first, "val_ppl_start": math.exp(first) if first == first else None,
        "val_nll_best": state["best"], "val_ppl_best": math.exp(state["best"]) if state["best"] is not None else None,
        "wall_seconds": state["_wall_seconds"], "tokens_per_second": state["_tokens_per_second"],
    }
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    if log:
        log(f"finetune: validation ppl {summary['val_ppl_start']:.3f} at step 0 -> {summary['val_ppl_best']:.3f} at "
            f"step {state['best_step']} of {state['step']} ({state['stopped']}); bundle {out}")
    return summary

