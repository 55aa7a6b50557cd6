"""The training pieces fit, finetune and edit share: optimiser settings, LR schedule, step, checkpoints.

* :class:`OptimConfig`: optimiser, schedule and loop settings (``FitConfig`` and ``FinetuneConfig``
  extend it).
* :func:`lr_at`: linear warm-up from ``lr_min`` to ``lr_max`` over ``warmup`` optimizer steps,
  then cosine back to ``lr_min`` at the last step.
* :func:`adamw`: the optimiser (fused where torch has a fused kernel).
* :func:`optimizer_step`: per-encoder gradient clipping, set the LR, step, clear the gradients.
* :func:`save_checkpoint` / :func:`load_checkpoint`: the training state in ``out/checkpoint``
  (``model.safetensors``, ``optimizer.safetensors`` with the CPU RNG state, ``state.json`` of schema
  ``fit-checkpoint-v1``), written as a whole under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from kcache.cache.format import CacheError
from kcache.schemas import validate_document

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "kcache-checkpoint"


@dataclasses.dataclass
class OptimConfig:
    """Optimiser, schedule and loop settings shared by fit, finetune and edit."""

    epochs: int = 3
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 1
    lr_max: float = 1e-4
    lr_min: float = 1e-5
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float = 1.0
    eval_every: int = 50  # optimizer steps
    patience: int = 5  # evaluations without improvement before stopping
    max_steps: int | None = None
    seed: int = 0
    # matmul dtype under autocast (float32 master weights and losses): auto | float32 | bfloat16
    compute: str = "auto"
    # Batches from windows of this many batches of shuffled samples, each window sorted by length
    # (length_grouped_batches): less padding per batch. 0 or 1: plain shuffled batches.
    length_groups: int = 16

    def __post_init__(self):
        if self.length_groups < 0:
            raise ValueError(f"length_groups must be >= 0 (0: plain shuffled batches), not {self.length_groups}")


def lr_at(step: int, total: int, warmup: int, lr_min: float, lr_max: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return lr_min + (lr_max - lr_min) * step / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, max(0, step - warmup) / span)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * progress))


def run_settings(cfg) -> dict:
    """``cfg`` as the run's identity (resume checks, bundle metadata): its fields, without
    ``length_groups`` when it means plain batches (0 or 1), so a run made before that option
    existed still resumes with ``length_groups = 0``."""
    d = dataclasses.asdict(cfg)
    if d.get("length_groups", 2) <= 1:
        d.pop("length_groups")
    return d


def length_grouped_batches(order, lengths, batch_size: int, groups: int, rng) -> list[list[int]]:
    """``order`` (shuffled sample positions) cut into batches of ``batch_size``, each batch of
    samples of similar length, so less of it is padding.

    Convention: ``order`` is cut into windows of ``groups * batch_size`` consecutive samples; each
    window is sorted by ``lengths[sample]`` (a number or a tuple of them; longest first, ties kept
    in ``order``), cut into batches, and its batches are put in an order drawn from ``rng``. Every
    sample is in exactly one batch, the only short batch is the last window's last (as with plain
    batches), and the result is a function of ``order``, ``lengths`` and ``rng``'s state (so
    resuming reproduces it).
    ``groups`` <= 1 returns the plain consecutive batches of ``order``.
    """
    order = [int(s) for s in order]
    if groups <= 1:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[list[int]] = []
    window = groups * batch_size
    for a in range(0, len(order), window):
        chunk = sorted(order[a : a + window], key=lambda s: lengths[s], reverse=True)  # stable: ties keep order
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        if a + window >= len(order) and len(batches) > 1 and len(batches[-1]) < batch_size:
            short = batches.pop()  # the epoch's one short batch stays last, as with plain batches
            out += [batches[i] for i in rng.permutation(len(batches))] + [short]
        else:
            out += [batches[i] for i in rng.permutation(len(batches))]
    return out


def schedule_steps(cfg: OptimConfig, n_samples: int) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps) for ``n_samples`` training samples:
    ``ceil(ceil(n_samples / batch_size) / grad_accum) * epochs``, capped at ``max_steps``."""
    batches_per_epoch = -(-n_samples // cfg.batch_size)
    steps_per_epoch = -(-batches_per_epoch // cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return total_steps, int(round(cfg.warmup_fraction * total_steps))


def new_state(run_id: dict) -> dict:
    """The loop state of a run that starts from scratch (what a checkpoint stores and resumes)."""
    return {"run": run_id, "step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0,
            "history": []}


def adamw(params, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with ``cfg``'s settings, fused into one kernel where torch has one (CPU and CUDA): the
    same update as the per-tensor loop, at half its cost for the encoders' ~100 small tensors."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr_max, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


def optimizer_step(opt, params: dict[int, list], clip_norm: float, lr: float) -> None:
    """Clip each encoder's gradients on its own (so each trains exactly as it would alone), set
    the learning rate, step and clear the gradients."""
    for ps in params.values():
        torch.nn.utils.clip_grad_norm_(ps, clip_norm)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing into ``out`` keeps its checkpoint: ``out/checkpoint``."""
    return Path(out) / CHECKPOINT_DIR


def save_checkpoint(out: Path, stack, opt, state: dict, where: Path | None = None, before_publish=None):
    """Write the training state to ``where`` (default ``out/checkpoint``) atomically.

    ``before_publish()`` runs after the new checkpoint is complete on disk and before it
    replaces the old one: several processes pass a barrier, so that a crash while writing never
    leaves them at different steps.
    """
    from safetensors.torch import save_file

    from kcache.lock import fresh_tmp

    final = Path(where) if where is not None else checkpoint_dir(out)
    tmp = fresh_tmp(final, "saving")  # after removing those of a killed run (never a live process's)
    tmp.mkdir(parents=True)
    # own copies: the parameters may view shared stacked weights (encoders.FusedWeights)
    save_file({k: v.detach().cpu().clone() for k, v in stack.state_dict().items()}, str(tmp / "model.safetensors"))
    osd = opt.state_dict()
    tensors, meta = {}, {"param_groups": osd["param_groups"], "state": {}}
    for pid, st in osd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                meta["state"][str(pid)][k] = v
    tensors["__rng_cpu"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    doc = json.loads(json.dumps({**state, "format": CHECKPOINT_FORMAT, "schema_version": 1, "optimizer": meta}))
    validate_document(doc, "fit-checkpoint-v1", str(final / "state.json"))
    (tmp / "state.json").write_text(json.dumps(doc, indent=1))
    if before_publish is not None:
        before_publish()
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def load_checkpoint(out: Path, stack, opt, where: Path | None = None) -> dict | None:
    """Restore ``stack``, ``opt`` and the CPU RNG from ``where`` (default ``out/checkpoint``);
    -> the saved state, or None when there is no checkpoint. CacheError when it is unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(where) if where is not None else checkpoint_dir(out)
    if not (d / "state.json").exists():
        return None
    try:
        state = json.loads((d / "state.json").read_text())
        validate_document(state, "fit-checkpoint-v1", str(d / "state.json"))
        stack.load_state_dict(load_file(str(d / "model.safetensors")))
        tensors = load_file(str(d / "optimizer.safetensors"))
    except (ValueError, OSError, RuntimeError, SafetensorError) as e:
        raise CacheError(f"{d}: unreadable checkpoint ({e}); delete it to start over") from None
    state.pop("format", None)
    state.pop("schema_version", None)
    meta = state.pop("optimizer")
    osd = {"param_groups": meta["param_groups"], "state": {}}
    for pid, st in meta["state"].items():
        full = dict(st)
        for key, v in tensors.items():
            p, _, name = key.partition(".")
            if p == pid:
                full[name] = v
        osd["state"][int(pid)] = full
    opt.load_state_dict(osd)
    torch.set_rng_state(tensors["__rng_cpu"])
    return state
