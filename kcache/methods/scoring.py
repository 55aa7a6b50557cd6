"""Score trained LoRA / KaSA / SFT baselines through ``kcache.evaluate`` next to DIEKÆ.

``register_baseline_methods([dir, ...])`` registers one evaluate method per
:func:`kcache.methods.baselines.train_baseline` output directory, named ``base_<dirname>`` and labelled
e.g. ``"LoRA D(K,x)"``. Each scores **D(K, x)** - the same ``k_ids + x_ids`` and offsets as the
built-in method ``kx`` - through the baseline's model.

Loading a baseline modifies a decoder in place (PEFT injects its layers into ``decoder.model``,
KaSA truncates base weights, SFT overwrites every weight), so the method never touches the
decoder ``evaluate`` passes in: on its first batch it deep-copies ``decoder.model`` (hooks
stripped), loads the baseline onto the copy with :func:`kcache.methods.baselines.load_baseline` (strict:
same fingerprint, KaSA's base-weight hash checked) and scores with
``score_sequences(..., model=copy)``. Only one baseline copy is kept at a time (``evaluate``
runs methods one after the other), so memory holds at most the decoder plus one copy;
:func:`release` drops it. The method's ``seconds`` / peak memory therefore include loading the
baseline once (copy + adapter), which is small next to scoring on the demo set.
"""

from __future__ import annotations

import copy
import gc
import re
from pathlib import Path

import torch

from kcache.evaluate import EvalBatch, register_method, score_sequences
from kcache.models import Decoder, LayerAdapter, freeze

LABELS = {"lora": "LoRA", "kasa": "KaSA", "sft": "SFT"}

# (id(decoder), resolved baseline dir) -> (copied Decoder, model to score with); at most one entry
_LOADED: dict[tuple[int, str], tuple[Decoder, torch.nn.Module]] = {}


def release() -> None:
    """Drop the loaded baseline copy (if any) and free its memory."""
    _LOADED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _strip_hooks(model: torch.nn.Module) -> None:
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if hasattr(m, "_forward_hooks_with_kwargs"):
            m._forward_hooks_with_kwargs.clear()
        if hasattr(m, "_forward_pre_hooks_with_kwargs"):
            m._forward_pre_hooks_with_kwargs.clear()


def copy_decoder(decoder: Decoder) -> Decoder:
    """An independent copy of ``decoder`` (same tokenizer and fingerprint, no hooks)."""
    model = copy.deepcopy(decoder.model)
    _strip_hooks(model)
    freeze(model)
    return Decoder(model, decoder.tokenizer, decoder.fingerprint, LayerAdapter(model))


def loaded_baseline(decoder: Decoder, directory: str | Path, strict: bool = True) -> tuple[Decoder, torch.nn.Module]:
    """(copy of ``decoder`` carrying the baseline, model to score with); cached, one at a time."""
    from kcache.methods.baselines import load_baseline

    key = (id(decoder), str(Path(directory).resolve()))
    if key not in _LOADED:
        release()
        dec = copy_decoder(decoder)
        model = load_baseline(directory, dec, strict=strict)
        model.eval()
        _LOADED[key] = (dec, model)
    return _LOADED[key]


def baseline_method_fn(directory: str | Path, strict: bool = True):
    """``fn(decoder, batch)``: D(K, x) log-probs through the baseline at ``directory``."""
    directory = Path(directory)

    def fn(decoder: Decoder, batch: EvalBatch) -> list[torch.Tensor]:
        dec, model = loaded_baseline(decoder, directory, strict=strict)
        items = batch.items
        return score_sequences(dec, [it.k_ids + it.x_ids for it in items], [len(it.k_ids) for it in items], items,
                               model=model)

    fn.__name__ = f"base_{directory.name}"
    return fn


def method_name(directory: str | Path) -> str:
    return "base_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(directory).resolve().name)


def register_baseline_methods(paths, strict: bool = True) -> list[str]:
    """Register one evaluate method per baseline directory -> the method names, in order.

    Names are ``base_<dirname>``; labels ``"<LoRA|KaSA|SFT> D(K,x)"`` (with the directory name
    added when two baselines share a method). Raises ``ModelError`` for a directory that is not
    a ``train_baseline`` output.
    """
    from kcache.methods.baselines import read_method_config

    paths = [Path(p) for p in paths]
    cfgs = [read_method_config(p) for p in paths]
    kinds = [c["method"] for c in cfgs]
    names = []
    for p, kind in zip(paths, kinds):
        name = method_name(p)
        if name in names:
            raise ValueError(f"two baselines map to the method name {name!r}; give their directories different names")
        label = f"{LABELS.get(kind, kind)} D(K,x)"
        if kinds.count(kind) > 1:
            label = f"{LABELS.get(kind, kind)} ({p.resolve().name}) D(K,x)"
        register_method(name, baseline_method_fn(p, strict=strict), label, reads_knowledge=True)
        names.append(name)
    return names


def trainable_parameters(paths) -> dict[str, int]:
    """Method name -> trainable parameter count recorded by ``train_baseline``."""
    from kcache.methods.baselines import read_method_config

    return {method_name(p): int(read_method_config(p)["trainable_params"]) for p in paths}
