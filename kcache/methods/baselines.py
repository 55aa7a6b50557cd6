"""Fine-tuning baselines that learn to *use knowledge given in context*: LoRA, KaSA and SFT.

Every method trains the decoder on ``D(K, x) -> target``: the input is ``k_ids + x_ids`` exactly
as :func:`kcache.align.encode_sample` builds it (DIEKÆ's baselines 3 and 4, section 4.3), and the
loss is the cross-entropy of the *target* tokens of ``x`` only. Samples without knowledge (e.g.
CommonsenseQA, whose knowledge list is empty) are trained on ``D(x) -> target``.

* ``lora`` - ``peft.LoraConfig`` (DIEKÆ appendix A.4: r=24, alpha=32, dropout 0.05) on
  ``q_proj, k_proj, v_proj, o_proj`` of every block (``layers=`` restricts it, e.g. DIEKÆ's MEMIT
  layers 3-8).
* ``kasa`` - PEFT's KaSA (``LoraConfig(kasa_config=KasaConfig(beta, gamma))``). Its two auxiliary
  regularisers (``beta * sum(diag^2) + gamma * (||B^T B - I|| + ||A A^T - I||)``,
  ``LoraModel._get_kasa_loss``) are added to the task loss at every step. KaSA truncates the
  targeted base weights *in place* (drops their ``r`` smallest singular components); the
  original weights are written to ``original_weights.safetensors`` before wrapping and
  :func:`restore_original_weights` puts them back.
* ``sft`` - full fine-tuning of every decoder weight (DIEKÆ A.2: lr 1e-6).

The training runs in place on ``decoder.model`` (PEFT injects its layers there; SFT changes the
weights), so use a freshly loaded decoder per method. :func:`load_baseline` reloads a saved run
onto a fresh decoder and reproduces its outputs exactly.

Learning-rate schedule (DIEKÆ A.2, scaled to ``lr``): linear warm-up from ``lr/10`` to ``lr``
over ``warmup`` of the steps, then cosine decay back to ``lr/10``. AdamW, no weight decay,
gradient norm clipped at 1.

:func:`multiple_choice_accuracy` scores CommonsenseQA-layout samples (``options`` with a leading
space, ``label`` = index): the option whose answer tokens have the lowest mean loss wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from kcache.align import TemplateSpec, adds_bos, encode_input, encode_sample
from kcache.models import Decoder, ModelError, ModelFingerprint, freeze

METHODS = ("lora", "kasa", "sft")
CONFIG_FILE = "kcache-method.json"
ADAPTER_DIR = "adapter"
SFT_WEIGHTS = "model.safetensors"
ORIGINAL_WEIGHTS = "original_weights.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_LR = {"lora": 1e-4, "kasa": 1e-4, "sft": 1e-6}


# ---------------------------------------------------------------------------------------------
# samples -> token ids


@dataclasses.dataclass(frozen=True)
class Example:
    """One training / scoring input: ``input_ids = k_ids + x_ids``.

    ``target_mask[j]``: position ``j`` is a target token (its prediction from ``j - 1`` counts in
    the loss). ``source_offset``: index in ``input_ids`` of the first token of ``source`` (after
    the knowledge prefix and the BOS the tokenizer adds, if any) - link-table token spans of the
    source text are shifted by it. ``row``: index of the sample in its table.
    """

    input_ids: list[int]
    target_mask: list[bool]
    source_offset: int
    row: int


def _records(samples: Any) -> list[dict]:
    if isinstance(samples, pa.Table):
        return samples.to_pylist()
    if isinstance(samples, (str, os.PathLike)):
        from kcache.data.samples import read_samples

        return read_samples(samples).to_pylist()
    return [dict(r) for r in samples]


def encode_example(tokenizer, rec: dict, template: TemplateSpec, max_length: int, target: str | None = None,
                   row: int = 0) -> Example | None:
    """Tokenise ``D(K, x) -> target`` for one sample (``target`` defaults to the sample's own).

    With knowledge: :func:`kcache.align.encode_sample` (knowledge cut to fit ``max_length``).
    Without knowledge: ``x_ids`` alone. ``None`` when the sample cannot be used (input too long).
    """
    target = rec["target"] if target is None else target
    knowledge = [k for k in (rec.get("knowledge") or []) if k.strip()]
    if knowledge:
        enc = encode_sample(tokenizer, knowledge, rec["source"], target, template, max_length)
        if enc.skip_reason:
            return None
        k_ids, x_ids, tmask = enc.k_ids, enc.x_ids, enc.target_mask
    else:
        x_ids, tmask = encode_input(tokenizer, rec["source"], target)
        if len(x_ids) > max_length:
            return None
        k_ids = []
    bos = int(adds_bos(tokenizer) and bool(x_ids) and x_ids[0] == tokenizer.bos_token_id)
    return Example(list(k_ids) + list(x_ids), [False] * len(k_ids) + list(tmask), len(k_ids) + bos, row)


def encode_examples(tokenizer, records: Sequence[dict], template: TemplateSpec,
                    max_length: int) -> tuple[list[Example], int]:
    """``(examples, skipped)`` for the records that have at least one target token."""
    out, skipped = [], 0
    for i, rec in enumerate(records):
        ex = encode_example(tokenizer, rec, template, max_length, row=i)
        if ex is None or not any(ex.target_mask):
            skipped += 1
            continue
        out.append(ex)
    return out, skipped


def pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def collate(examples: Sequence[Example], pad: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``target_mask`` (bool) tensors."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    tgt = torch.zeros((len(examples), n), dtype=torch.bool)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L] = torch.tensor(e.input_ids, dtype=torch.long)
        att[i, :L] = 1
        tgt[i, :L] = torch.tensor(e.target_mask, dtype=torch.bool)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "target_mask": tgt.to(device)}


def target_token_losses(logits: torch.Tensor, input_ids: torch.Tensor,
                        target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(sum of target-token cross-entropies, number of target tokens)``.

    Token ``j`` is predicted from position ``j - 1``; position 0 is never a target.
    """
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    mask = target_mask[:, 1:]
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     reduction="none").view_as(labels)
    ce = ce * mask
    return ce.sum(1), mask.sum(1)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# the training loop (shared with kcache.methods.knowla)


def lr_at(step: int, total: int, lr: float, warmup: float) -> float:
    """DIEKÆ A.2's shape: ``lr/10`` -> ``lr`` linearly over ``warmup * total`` steps, cosine back to ``lr/10``."""
    w = max(1, int(round(warmup * total))) if warmup > 0 else 0
    lo = lr / 10
    if step < w:
        return lo + (lr - lo) * step / w
    t = (step - w) / max(1, total - w)
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_loop(
    model: nn.Module,
    examples: Sequence[Example],
    params: Iterable[nn.Parameter],
    *,
    pad: int,
    steps: int | None = None,
    epochs: float = 1.0,
    lr: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    warmup: float = 0.1,
    max_grad_norm: float = 1.0,
    reg_fn: Callable[[], torch.Tensor | float] | None = None,
    prepare: Callable[[Sequence[Example]], contextlib.AbstractContextManager] | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train ``params`` on the target-token loss of ``examples``; returns one record per step.

    ``steps`` (if given) overrides ``epochs``; batches are drawn from a seeded shuffle, epoch
    after epoch. ``reg_fn()`` is added to the loss (KaSA). ``prepare(batch)`` returns a context
    manager entered around each forward (KnowLA sets its entity links there).
    """
    if not examples:
        raise ValueError("no usable training samples (every sample was skipped)")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    per_epoch = math.ceil(len(examples) / batch_size)
    total = steps if steps is not None else max(1, math.ceil(epochs * per_epoch))
    device = model_device(model)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history: list[dict] = []
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    try:
        for step in range(total):
            if len(order) < batch_size:
                perm = list(range(len(examples)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:batch_size], order[batch_size:]
            batch_ex = [examples[i] for i in idx]
            batch = collate(batch_ex, pad, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, warmup)
            with prepare(batch_ex) if prepare is not None else contextlib.nullcontext():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, n = target_token_losses(logits, batch["input_ids"], batch["target_mask"])
            task = s.sum() / n.sum().clamp(min=1)
            reg = reg_fn() if reg_fn is not None else 0.0
            loss = task + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            rec = {"step": step + 1, "loss": float(loss.detach()), "task_loss": float(task.detach()),
                   "reg_loss": float(reg.detach() if torch.is_tensor(reg) else reg), "lr": opt.param_groups[0]["lr"],
                   "tokens": int(n.sum())}
            history.append(rec)
            if log_every and ((step + 1) % log_every == 0 or step + 1 == total):
                log(f"step {step + 1}/{total}  loss {rec['loss']:.4f}  task {rec['task_loss']:.4f}  reg "
                    f"{rec['reg_loss']:.3g}  lr {rec['lr']:.2e}  {time.perf_counter() - t0:.0f}s")
    finally:
        model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def mean_target_loss(model: nn.Module, examples: Sequence[Example], pad: int, batch_size: int = 16,
                     prepare: Callable[[Sequence[Example]],
                                       contextlib.AbstractContextManager] | None = None) -> list[float]:
    """Mean target-token loss of each example (batched, in the given order)."""
    model.eval()
    device = model_device(model)
    out = [float("nan")] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ex = [examples[i] for i in idx]
        batch = collate(ex, pad, device)
        with prepare(ex) if prepare is not None else contextlib.nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, n = target_token_losses(logits, batch["input_ids"], batch["target_mask"])
        for i, si, ni in zip(idx, s.tolist(), n.tolist()):
            out[i] = si / ni if ni else float("nan")
    return out


def multiple_choice_scores(model: nn.Module, tokenizer, samples: Any, *, batch_size: int = 16,
                           template: TemplateSpec = TemplateSpec(), max_length: int = 1024,
                           prepare: Callable[[Sequence[Example]], contextlib.AbstractContextManager] | None = None,
                           ) -> list[list[float]]:
    """Mean loss of every option's answer tokens, per sample (``D(K, x + option)``; ``D(x + option)``
    when a sample has no knowledge). Batched over all (sample, option) pairs, shortest first."""
    records = _records(samples)
    pairs: list[tuple[int, int]] = []
    examples: list[Example] = []
    for i, rec in enumerate(records):
        opts = rec.get("options")
        if not opts:
            raise ValueError(f"sample {rec.get('id', i)!r} has no options (multiple choice "
                             "needs 'options' and 'label')")
        for j, opt in enumerate(opts):
            ex = encode_example(tokenizer, rec, template, max_length, target=opt, row=i)
            if ex is None or not any(ex.target_mask):
                raise ValueError(f"sample {rec.get('id', i)!r}: "
                                 f"option {j} ({opt!r}) cannot be scored (too long or empty)")
            pairs.append((i, j))
            examples.append(ex)
    losses = mean_target_loss(model, examples, pad_id(tokenizer), batch_size, prepare)
    scores = [[float("nan")] * len(r["options"]) for r in records]
    for (i, j), l in zip(pairs, losses):
        scores[i][j] = l
    return scores


def multiple_choice_accuracy(model: nn.Module, tokenizer, samples: Any, *, batch_size: int = 16,
                             return_details: bool = False, **kwargs: Any):
    """Fraction of samples (with a ``label``) whose lowest-mean-loss option is the labelled one.

    ``samples``: a samples table, a path or a list of dicts in CommonsenseQA layout (``source``,
    ``options`` with leading spaces, ``label``). ``return_details`` -> ``(accuracy, {"scores",
    "predictions", "labels"})``. Ties go to the first option.
    """
    records = _records(samples)
    scores = multiple_choice_scores(model, tokenizer, records, batch_size=batch_size, **kwargs)
    preds = [min(range(len(s)), key=lambda j: (s[j], j)) for s in scores]
    labels = [r.get("label") for r in records]
    scored = [(p, l) for p, l in zip(preds, labels) if l is not None]
    acc = sum(p == l for p, l in scored) / len(scored) if scored else float("nan")
    if return_details:
        return acc, {"scores": scores, "predictions": preds, "labels": labels}
    return acc


# ---------------------------------------------------------------------------------------------
# parameters, hashes, original weights


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` over unique parameters (tied embeddings counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def target_linear_names(model: nn.Module, targets: Sequence[str], layers: Sequence[int] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules PEFT would wrap for ``target_modules=targets`` (suffix
    match) and ``layers_to_transform=layers``."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            if layers is None or _layer_of(name) in set(layers):
                out.append(name)
    if not out:
        raise ModelError(f"no nn.Linear named {', '.join(targets)} found in {type(model).__name__}")
    return out


def _base_linear(model: nn.Module, name: str) -> nn.Module:
    """The plain ``nn.Linear`` called ``name`` in ``model`` (or under PEFT's wrapper of it)."""
    mod = _unwrap(model).get_submodule(name)
    return mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a ``PeftModel`` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def weights_hash(model: nn.Module, names: Sequence[str]) -> str:
    """sha256 over the (base) weights of the named linear layers: detects a KaSA-truncated or
    otherwise changed base before an adapter is loaded onto it."""
    h = hashlib.sha256()
    base = _unwrap(model)
    for n in names:
        w = _base_linear(base, n).weight.detach().to("cpu", torch.float32).contiguous()
        h.update(n.encode())
        h.update(w.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def save_original_weights(model: nn.Module, names: Sequence[str], path: str | os.PathLike) -> Path:
    """Write the named linear layers' weights (keys ``<module name>.weight``) to safetensors."""
    from safetensors.torch import save_file

    base = _unwrap(model)
    tensors = {f"{n}.weight": _base_linear(base, n).weight.detach().to("cpu").contiguous().clone() for n in names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def restore_original_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Copy the weights saved by :func:`save_original_weights` back into ``model`` (a plain model
    or a ``PeftModel``: the base layers under PEFT's wrappers are found). Returns the count.

    Undoes KaSA's destructive SVD truncation. With the KaSA adapter still attached the outputs
    are then *not* KaSA's any more; call ``peft_model.unload()`` first to get the original model.
    """
    from safetensors.torch import load_file

    base = _unwrap(model)
    tensors = load_file(str(path))
    with torch.no_grad():
        for key, t in tensors.items():
            lin = _base_linear(base, key.removesuffix(".weight"))
            lin.weight.copy_(t.to(lin.weight.device, lin.weight.dtype))
    return len(tensors)


def _has_adapters(model: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# train / save / load


@dataclasses.dataclass
class TrainResult:
    model: nn.Module  # the PeftModel (lora, kasa) or the fine-tuned model (sft)
    method: str
    out_dir: Path
    config: dict
    history: list[dict]

    @property
    def trainable_params(self) -> int:
        return self.config["trainable_params"]

    @property
    def total_params(self) -> int:
        return self.config["total_params"]


def lora_config(method: str, *, rank: int, alpha: float, dropout: float, targets: Sequence[str],
                layers: Sequence[int] | None, kasa_beta: float, kasa_gamma: float):
    from peft import KasaConfig, LoraConfig

    kw: dict[str, Any] = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                              task_type="CAUSAL_LM")
    if layers is not None:
        kw["layers_to_transform"] = list(layers)
    if method == "kasa":
        kw["kasa_config"] = KasaConfig(beta=kasa_beta, gamma=kasa_gamma)
    return LoraConfig(**kw)


def kasa_loss(peft_model: nn.Module) -> torch.Tensor | float:
    """PEFT's KaSA regulariser (``beta * L2 + gamma * L3`` summed over layers), 0.0 without KaSA.
    (PEFT's ``LoraModel._get_kasa_loss``: the KasaConfig docstring asks users to call it.)"""
    return peft_model.base_model._get_kasa_loss()


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def train_baseline(
    decoder: Decoder,
    samples: Any,
    method: str,
    out_dir: str | os.PathLike,
    *,
    steps: int | None = None,
    epochs: float = 1.0,
    lr: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    rank: int = 24,
    alpha: float = 32,
    dropout: float = 0.05,
    targets: Sequence[str] = DEFAULT_TARGETS,
    layers: Sequence[int] | None = None,
    kasa_beta: float = 1e-4,
    kasa_gamma: float = 1e-3,
    template: TemplateSpec = TemplateSpec(),
    max_length: int = 1024,
    warmup: float = 0.1,
    split: str | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``method`` (``lora`` | ``kasa`` | ``sft``) on ``D(K, x) -> target`` and save it to ``out_dir``.

    ``samples``: a samples table, a ``.parquet``/``.jsonl`` path or dicts; ``split`` keeps only
    rows of that split. ``lr`` defaults to 1e-4 (LoRA, KaSA) / 1e-6 (SFT). Modifies
    ``decoder.model`` in place (see the module docstring). Writes ``kcache-method.json`` (method,
    hyper-parameters, model fingerprint, parameter counts, loss history) and the weights:
    ``adapter/`` (PEFT, safetensors) for LoRA/KaSA, plus ``original_weights.safetensors`` for
    KaSA; ``model.safetensors`` for SFT.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if _has_adapters(decoder.model):
        raise ModelError("this decoder already carries PEFT adapters; load a fresh decoder for each run")
    records = _records(samples)
    if split is not None:
        records = [r for r in records if r.get("split") == split]
    lr = DEFAULT_LR[method] if lr is None else lr
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples, skipped = encode_examples(decoder.tokenizer, records, template, max_length)
    torch.manual_seed(seed)
    model = decoder.model
    cfg: dict[str, Any] = {
        "format": "kcache-method", "version": 1, "method": method,
        "model": decoder.fingerprint.to_dict(),
        "train": {"samples": len(records), "used": len(examples), "skipped": skipped, "steps": steps, "epochs": epochs,
                  "lr": lr, "batch_size": batch_size, "seed": seed, "warmup": warmup, "max_length": max_length,
                  "split": split, "template": dataclasses.asdict(template)},
    }
    reg_fn = None
    if method in ("lora", "kasa"):
        from peft import get_peft_model

        names = target_linear_names(model, targets, layers)
        cfg["lora"] = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                       "layers": None if layers is None else list(layers)}
        cfg["base_weights_hash"] = weights_hash(model, names)
        if method == "kasa":
            cfg["kasa"] = {"beta": kasa_beta, "gamma": kasa_gamma}
            save_original_weights(model, names, out / ORIGINAL_WEIGHTS)
            cfg["original_weights"] = ORIGINAL_WEIGHTS
        pcfg = lora_config(method, rank=rank, alpha=alpha, dropout=dropout, targets=targets, layers=layers,
                           kasa_beta=kasa_beta, kasa_gamma=kasa_gamma)
        model = get_peft_model(model, pcfg)
        if method == "kasa":
            reg_fn = lambda: kasa_loss(model)  # noqa: E731
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(dict.fromkeys(model.parameters()))  # tied weights once
    trainable, total = count_parameters(model)
    cfg["trainable_params"], cfg["total_params"] = trainable, total
    log(f"{method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f} %); "
        f"{len(examples)} samples ({skipped} skipped)")
    history = train_loop(model, examples, params, pad=pad_id(decoder.tokenizer), steps=steps, epochs=epochs, lr=lr,
                         batch_size=batch_size, seed=seed, warmup=warmup, reg_fn=reg_fn, log_every=log_every, log=log)
    if method == "sft":
        freeze(model)
        from safetensors.torch import save_model

        save_model(model, str(out / SFT_WEIGHTS))
    else:
        for p in params:
            p.requires_grad_(False)
        model.save_pretrained(str(out / ADAPTER_DIR), safe_serialization=True)
    cfg["history"] = history
    cfg["final_loss"] = history[-1]["task_loss"]
    write_method_config(out / CONFIG_FILE, cfg)
    return TrainResult(model, method, out, cfg, history)


def write_method_config(path: Path, cfg: dict) -> None:
    """Validate against ``schemas/method-v1.json`` and write atomically."""
    from kcache.schemas import validate_document

    validate_document(json.loads(json.dumps(cfg, default=str)), "method-v1", str(path))
    _write_json(path, cfg)


def read_method_config(directory: str | os.PathLike) -> dict:
    from kcache.schemas import SchemaError, validate_document

    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise ModelError(f"{directory}: not a kcache method directory (no {CONFIG_FILE})")
    try:
        cfg = json.loads(path.read_text())
        validate_document(cfg, "method-v1", str(path))
    except (ValueError, SchemaError) as e:
        raise ModelError(f"{path}: not a valid kcache method config ({e})") from None
    return cfg


def check_fingerprint(cfg: dict, decoder: Decoder, where: str) -> None:
    want = ModelFingerprint.from_dict(cfg["model"])
    if not want.matches(decoder.fingerprint):
        raise ModelError(f"{where} was trained on model {want.name!r}, "
                         f"this decoder ({decoder.fingerprint.name!r}) differs in "
                         + ", ".join(want.diff(decoder.fingerprint)) + "; pass strict=False to load it anyway")


def load_baseline(directory: str | os.PathLike, decoder: Decoder, strict: bool = True) -> nn.Module:
    """Reload a :func:`train_baseline` run onto a *fresh* ``decoder`` (same fingerprint); returns
    the model to call (a ``PeftModel`` for LoRA/KaSA, ``decoder.model`` for SFT).

    KaSA re-applies its SVD truncation to the base while loading (deterministic), so the decoder
    must still hold the original weights: that is checked against ``base_weights_hash``.
    """
    d = Path(directory)
    cfg = read_method_config(d)
    if strict:
        check_fingerprint(cfg, decoder, str(d))
    if _has_adapters(decoder.model):
        raise ModelError("this decoder already carries PEFT adapters; load a fresh decoder")
    method = cfg["method"]
    if method == "sft":
        from safetensors.torch import load_model

        load_model(decoder.model, str(d / SFT_WEIGHTS))
        freeze(decoder.model)
        return decoder.model
    from peft import PeftModel

    names = target_linear_names(decoder.model, cfg["lora"]["targets"], cfg["lora"]["layers"])
    if strict and weights_hash(decoder.model, names) != cfg["base_weights_hash"]:
        raise ModelError(f"{d}: the decoder's {len(names)} targeted base weights are not the ones "
                         "the adapter was trained on (already KaSA-truncated or changed?); load a fresh decoder")
    model = PeftModel.from_pretrained(decoder.model, str(d / ADAPTER_DIR))
    model.eval()
    return model
