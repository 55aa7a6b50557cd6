"""Compute precision: which dtype the matmuls of fit / finetune / edit run in.

Convention: weights, optimizer state and losses stay float32 ("master weights"); only the
forward/backward matmuls run in the compute dtype, through ``torch.autocast``. ``"auto"`` picks
bfloat16 where the hardware has a fast path for it (CUDA; a CPU with AVX-512 BF16 or AMX, which
oneDNN reports) and float32 elsewhere, so the same command is fast on a laptop, a Xeon and a GPU.

The environment variable ``KCACHE_COMPUTE`` overrides ``"auto"`` (the test suite pins it to
``float32`` so results do not depend on the CPU a test runs on).
"""

from __future__ import annotations

import contextlib
import os

import torch

COMPUTE_CHOICES = ("auto", "float32", "bfloat16")


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bfloat16 matmuls natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def fast_bf16(device: torch.device | str) -> bool:
    """Whether "auto" means bfloat16 on ``device``: CUDA, or a CPU with native bf16 matmuls;
    ``KCACHE_COMPUTE=float32`` / ``bfloat16`` in the environment decides instead, everywhere."""
    forced = os.environ.get("KCACHE_COMPUTE") or "auto"
    if forced not in COMPUTE_CHOICES:
        raise ValueError(f"environment KCACHE_COMPUTE={forced!r}: expected one of {', '.join(COMPUTE_CHOICES)}")
    if forced != "auto":  # one switch for the decoder dtype and the compute dtype
        return forced == "bfloat16"
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def resolve_compute(compute: str | None, device: torch.device | str, frozen: torch.dtype | None = None) -> torch.dtype:
    """``"auto"`` / ``None`` -> bfloat16 on CUDA or a bf16-capable CPU, else float32.

    ``frozen``: the dtype of frozen weights the autocast region also multiplies by (the decoder in
    finetune). On CPU, autocast re-casts frozen float32 weights at every op (only trainable leaves'
    casts are cached), which made a bf16 finetune step slower than a float32 one here (36 s vs 26 s
    for 6 steps of SmolLM2); so "auto" stays float32 there unless the decoder itself is loaded in bf16.
    """
    device = torch.device(device)
    name = compute or "auto"
    if name == "auto":
        name = os.environ.get("KCACHE_COMPUTE", "auto") or "auto"
    if name not in COMPUTE_CHOICES:
        raise ValueError(f"compute={name!r}: expected one of {', '.join(COMPUTE_CHOICES)}")
    if name == "auto":
        fast = fast_bf16(device) and (device.type == "cuda" or frozen in (None, torch.bfloat16))
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast_for(device: torch.device | str, compute: str | None = "auto", frozen: torch.dtype | None = None):
    """A zero-argument factory of autocast contexts for ``device`` in the resolved compute dtype."""
    device = torch.device(device)
    dtype = resolve_compute(compute, device, frozen)
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def compute_name(compute: str | None, device: torch.device | str, frozen: torch.dtype | None = None) -> str:
    """The resolved dtype's name, as recorded in bundles and reports."""
    return str(resolve_compute(compute, device, frozen)).removeprefix("torch.")
