"""Stage three evaluation: perplexity over target tokens, option accuracy, time and memory.

``evaluate(decoder, samples, bundle, methods)`` tokenises held-out samples once (``align.
encode_sample`` with the bundle's template and ``max_length``, so over-long knowledge is cut
exactly as stage one cut it), runs every method on the same length-bucketed batches and
aggregates per dataset and overall:

* **perplexity** = ``exp(sum of -log p(target token) / number of target tokens)``, pooled over
  every target token of every sample (natural log; non-target tokens never count; input
  position 0 is never scored because ``D(x)`` has nothing to predict it from);
* **accuracy** for classification samples (``options`` + ``label``): the option with the largest
  summed log-likelihood of its tokens is the prediction;
* **seconds** (wall, CUDA-synchronised) and **peak memory** above one baseline taken after a
  warm-up forward pass, the same for every method (``torch.cuda.max_memory_allocated`` on GPU; on
  CPU the peak resident set size sampled every millisecond in a thread after returning freed
  heap to the OS);
* **knowledge-swap controls**: every method that reads the knowledge also runs with another
  sample's knowledge and with none; ``knowledge use`` = NLL(other K) - NLL(right K) per target
  token with a bootstrap CI (``knowledge_controls``).

Methods are a registry of callables ``fn(decoder, batch) -> list[Tensor]``; see ``Method`` and
``register_method``, and docs/inject.md for adding one (e.g. a LoRA baseline).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import torch

from kcache._io import pyplot, save_png
from kcache.align import (
    TemplateSpec,
    encode_knowledge,
    encode_sample,
    pad_right,
    plan_batches,
    prefix_parts,
    scaffold_length,
)
from kcache.lower_blocks import LowerBlocks, untouched_blocks
from kcache.models import Decoder

# ---------------------------------------------------------------------------------------------
# what methods see


@dataclasses.dataclass
class ScoreItem:
    """One sequence to score: a sample's target, or one of its options.

    ``x_ids`` = tokens of ``source + continuation``, ``target_mask[j]`` marks continuation
    tokens, ``k_ids`` the knowledge prefix (bundle template, stage-one truncation).
    """

    row: int  # row in the evaluated samples table
    sample_id: str
    dataset: str
    kind: str  # "target" | "option"
    option: int | None  # option index for kind == "option"
    k_ids: list[int]
    x_ids: list[int]
    target_mask: list[bool]
    truncated: bool = False
    options: tuple[int, ...] = ()  # option indices this item also stands for (target == option text)

    @property
    def score_mask(self) -> list[bool]:
        """Positions whose log-probability counts: target tokens, never position 0."""
        return [bool(m) and j > 0 for j, m in enumerate(self.target_mask)]


@dataclasses.dataclass
class EvalBatch:
    """A batch of items plus what the built-in methods need (``None`` when not given).

    ``injector``: an encoder ``kcache.inject.Injector``; ``oracle``: an oracle ``Injector`` over a
    cache; ``extras``: anything a plugged-in method wants (passed through from ``evaluate``).
    """

    items: list[ScoreItem]
    injector: object | None = None
    oracle: object | None = None
    extras: dict = dataclasses.field(default_factory=dict)


MethodFn = Callable[[Decoder, EvalBatch], list[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Method:
    """A way of scoring items. ``fn(decoder, batch)`` returns, for each item, a float tensor of
    length ``len(item.x_ids)`` whose entry ``j`` is ``log p(x_ids[j] | ...)`` (natural log); only
    entries at ``item.score_mask`` are read, and NaN there means "this method cannot score this
    item" (it is left out of that method's figures). ``needs``: ``"encoders"`` / ``"cache"``."""

    name: str
    label: str
    fn: MethodFn
    needs: tuple[str, ...] = ()
    reads_knowledge: bool = False  # scores depend on each item's k_ids: run with swapped / empty knowledge too
    # ``untouched(decoder, sources) -> int | None``: how many leading decoder blocks the method runs
    # unchanged over exactly ``x_ids`` (``sources``: an ``EvalBatch`` without items). Methods that
    # say so start from those blocks' output, computed once per input (``kcache.lower_blocks``).
    untouched: Callable[[Decoder, EvalBatch], int | None] | None = None


METHODS: dict[str, Method] = {}


def register_method(name: str, fn: MethodFn, label: str | None = None, needs: tuple[str, ...] = (),
                    reads_knowledge: bool = False, untouched=None) -> Method:
    """Add (or replace) a method in the registry; ``evaluate(..., methods=[name])`` then runs it.
    ``reads_knowledge``: the method uses ``item.k_ids``, so ``evaluate`` also runs its controls.
    ``untouched``: see ``Method``."""
    m = Method(name, label or name, fn, tuple(needs), reads_knowledge, untouched)
    METHODS[name] = m
    return m


# ---------------------------------------------------------------------------------------------
# scoring helpers (usable by plugged-in methods)


def _pad_id(decoder: Decoder) -> int:
    t = decoder.tokenizer
    return t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)


@torch.no_grad()
def score_sequences(decoder: Decoder, seqs: list[list[int]], offsets: list[int], items: list[ScoreItem],
                    model=None) -> list[torch.Tensor]:
    """Log-probabilities of each item's ``x_ids`` inside ``seqs[i]`` (where ``x_ids`` starts at
    ``offsets[i]``), computed at ``score_mask`` positions only (NaN elsewhere).

    Runs the backbone once on the right-padded batch and the LM head only on the rows that
    predict a scored token, so memory stays ``O(scored tokens x vocab)``. Injection hooks that
    are active on the decoder apply. ``model``: another module with the decoder's interface
    (e.g. a PEFT-wrapped copy) whose ``.model`` backbone and output embeddings to use.
    """
    dev = decoder.device
    ids, mask = pad_right(seqs, _pad_id(decoder))
    root = model if model is not None else decoder.model
    backbone = decoder.layers.backbone() if model is None else model.get_decoder()
    hidden = backbone(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
    rows, cols, toks, owner = [], [], [], []
    for i, (it, off) in enumerate(zip(items, offsets)):
        for j, m in enumerate(it.score_mask):
            if m:
                rows.append(i)
                cols.append(off + j - 1)
                toks.append(it.x_ids[j])
                owner.append((i, j))
    out = [torch.full((len(it.x_ids),), float("nan")) for it in items]
    if not rows:
        return out
    h = hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
    head = root.get_output_embeddings()
    lp = torch.empty(len(rows))
    step = 1024
    for a in range(0, len(rows), step):
        logits = head(h[a : a + step]).float()
        t = torch.tensor(toks[a : a + step], device=logits.device)
        lp[a : a + step] = (logits.log_softmax(-1).gather(1, t[:, None])[:, 0]).cpu()
    for (i, j), v in zip(owner, lp.tolist()):
        out[i][j] = v
    return out


def method_x(decoder: Decoder, batch: EvalBatch) -> list[torch.Tensor]:
    """``D(x)``: the input alone."""
    return score_sequences(decoder, [it.x_ids for it in batch.items], [0] * len(batch.items), batch.items)


def method_kx(decoder: Decoder, batch: EvalBatch) -> list[torch.Tensor]:
    """``D(K, x)``: knowledge in context (``k_ids + x_ids``)."""
    return score_sequences(decoder, [it.k_ids + it.x_ids for it in batch.items], [len(it.k_ids) for it in batch.items],
                           batch.items)


def method_ekx(decoder: Decoder, batch: EvalBatch) -> list[torch.Tensor]:
    """``D(E(K, x) + x)``: the encoders read ``k_ids + x_ids``; the decoder reads ``x_ids``."""
    if batch.injector is None:
        raise ValueError("method 'ekx' needs encoders (--encoders DIR / bundle=...)")
    return _score_injected(decoder, batch.injector, batch.items)


def _score_injected(decoder: Decoder, inj, items: list[ScoreItem]) -> list[torch.Tensor]:
    """Score ``x`` with ``inj``'s encoders reading each item's ``K + x`` and their output added."""
    add = inj.additions([it.k_ids for it in items], [it.x_ids for it in items])
    with inj.static(add):
        return score_sequences(decoder, [it.x_ids for it in items], [0] * len(items), items)


def method_oracle(decoder: Decoder, batch: EvalBatch) -> list[torch.Tensor]:
    """Oracle: the exact cached deltas of each sample added to ``D(x)``. Items whose sample is not
    in the cache, or whose scored positions need deltas the cache does not hold (an option that
    differs from the cached target after its first token), get NaN."""
    inj = batch.oracle
    if inj is None:
        raise ValueError("method 'oracle' needs a cache (--cache CACHE / cache=...)")
    items = batch.items
    out = [torch.full((len(it.x_ids),), float("nan")) for it in items]
    known = []
    for k, it in enumerate(items):
        try:
            known.append((k, inj.cache.position(it.sample_id)))
        except KeyError:
            pass
    if not known:
        return out
    sub = [items[k] for k, _ in known]
    add, covered = inj.oracle_additions([p for _, p in known], [it.x_ids for it in sub])
    with inj.static(add):
        scored = score_sequences(decoder, [it.x_ids for it in sub], [0] * len(sub), sub)
    for (k, _), it, lp, m in zip(known, sub, scored, covered):
        need = [j for j, s in enumerate(it.score_mask) if s]
        if need and max(need) <= m:  # token j is predicted from position j-1 < m: exact rows
            out[k] = lp
    return out


def _untouched_by(source) -> Callable[[Decoder, EvalBatch], int | None]:
    """``Method.untouched`` of a method that scores ``x_ids`` with ``source(batch)``'s injection."""
    def untouched(_decoder: Decoder, batch: EvalBatch) -> int | None:
        inj = source(batch)
        return untouched_blocks(inj.site, inj.layers) if inj is not None and inj.layers else None
    return untouched


register_method("x", method_x, "D(x)", untouched=lambda decoder, _batch: decoder.layers.num_layers)
register_method("kx", method_kx, "D(K,x)", reads_knowledge=True)
register_method("ekx", method_ekx, "D(E(K,x)+x)", needs=("encoders",), reads_knowledge=True,
                untouched=_untouched_by(lambda b: b.injector))
register_method("oracle", method_oracle, "oracle: cached Δ injected", needs=("cache",),
                untouched=_untouched_by(lambda b: b.oracle))


def method_ekx_ft(decoder: Decoder, batch: EvalBatch) -> list[torch.Tensor]:
    """``D(E_ft(K,x)+x)``: like ``ekx`` with the fine-tuned injector from ``extras["finetuned"]``."""
    inj = batch.extras.get("finetuned")
    if inj is None:
        raise ValueError("method 'ekx_ft' needs extras={'finetuned': Injector} (the fine-tuned bundle)")
    return _score_injected(decoder, inj, batch.items)


register_method("ekx_fit", method_ekx, "D(E(K,x)+x) after fit", needs=("encoders",), reads_knowledge=True,
                untouched=_untouched_by(lambda b: b.injector))
register_method("ekx_ft", method_ekx_ft, "D(E(K,x)+x) after finetune", reads_knowledge=True,
                untouched=_untouched_by(lambda b: b.extras.get("finetuned")))


# ---------------------------------------------------------------------------------------------
# pure aggregation


def perplexity(logprobs: list[torch.Tensor], masks: list[list[bool]]) -> tuple[float, float, int]:
    """-> (perplexity, mean NLL, token count): ``exp(mean over all masked tokens of -logprob)``.
    Unmasked entries are ignored whatever they hold; an empty selection gives NaN."""
    total, n = 0.0, 0
    for lp, m in zip(logprobs, masks):
        sel = torch.as_tensor(m, dtype=torch.bool)
        v = lp[sel].double()
        total += float(-v.sum())
        n += int(sel.sum())
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = total / n
    return (math.exp(mean) if mean < 700 else float("inf")), mean, n


def derangement(n: int) -> list[int]:
    """A fixed derangement of ``range(n)`` (``n >= 2``): item ``i`` is paired with ``(i + n // 2) % n``,
    so no sample keeps its own knowledge and partners are far apart in the file's order."""
    if n < 2:
        raise ValueError("a knowledge-swap control needs at least 2 samples")
    return [(i + n // 2) % n for i in range(n)]


def sample_nll(items: list[ScoreItem], scores: list[torch.Tensor]) -> dict[str, tuple[float, int]]:
    """Per sample (target items only): (sum of -log p over scored tokens, token count); samples a
    method could not score (NaN) are left out."""
    out = {}
    for it, lp in zip(items, scores):
        if it.kind != "target":
            continue
        sel = torch.tensor(it.score_mask, dtype=torch.bool)
        if not sel.any() or torch.isnan(lp[sel]).any():
            continue
        out[it.sample_id] = (float(-lp[sel].double().sum()), int(sel.sum()))
    return out


def paired_difference(a: dict[str, tuple[float, int]], b: dict[str, tuple[float, int]], n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """Pooled per-token NLL of ``a`` minus that of ``b`` over the samples both scored, in nats,
    with a 95 % bootstrap CI over samples (resampling samples, pooling tokens within each draw).
    Used for knowledge use: ``a`` = another sample's knowledge, ``b`` = the right one."""
    import numpy as np

    ids = sorted(set(a) & set(b))
    if not ids:
        return {"nats": None, "ci": [None, None], "samples": 0}
    na = np.array([a[i][0] for i in ids])
    nb = np.array([b[i][0] for i in ids])
    t = np.array([a[i][1] for i in ids], dtype=float)
    value = (na.sum() - nb.sum()) / t.sum()
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    boot = (na[draws].sum(1) - nb[draws].sum(1)) / t[draws].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"nats": float(value), "ci": [float(lo), float(hi)], "samples": len(ids)}


def gap_fraction(x: dict, kx: dict, m: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Fraction of the pooled log-perplexity gap ``D(x) -> D(K,x)`` that method ``m`` closes,
    ``(nll_x - nll_m) / (nll_x - nll_kx)``, with a 95 % bootstrap CI over samples (per-sample
    ``(sum nll, tokens)`` dicts as from ``sample_nll``)."""
    import numpy as np

    ids = sorted(set(x) & set(kx) & set(m))
    if not ids:
        return {"fraction": None, "ci": [None, None], "samples": 0}
    t = np.array([x[i][1] for i in ids], dtype=float)
    v = {k: np.array([d[i][0] for i in ids]) for k, d in (("x", x), ("kx", kx), ("m", m))}

    def frac(sel):
        tt = t[sel].sum(-1)
        nx, nk, nm = (v[k][sel].sum(-1) / tt for k in ("x", "kx", "m"))
        with np.errstate(divide="ignore", invalid="ignore"):
            return (nx - nm) / (nx - nk)

    value = float(frac(np.arange(len(ids))))
    if not math.isfinite(value):  # no gap (D(K,x) no better than D(x)): undefined
        return {"fraction": None, "ci": [None, None], "samples": len(ids)}
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    boot = frac(draws)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if boot.size else (None, None)
    return {"fraction": value, "ci": [None if lo is None else float(lo), None if hi is None else float(hi)],
            "samples": len(ids)}


def option_prediction(option_scores: list[float]) -> int:
    """Index of the highest summed log-likelihood (ties: the first)."""
    return max(range(len(option_scores)), key=lambda i: (option_scores[i], -i))


# ---------------------------------------------------------------------------------------------
# memory and time


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at entry, in bytes (``.peak``), and what was measured (``.kind``).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: resident set size sampled
    every ``interval`` s in a thread (``psutil``), after a garbage collection and
    ``malloc_trim`` so memory freed earlier is not silently reused; ``resource`` ru_maxrss is a
    fallback without psutil (only meaningful for the first, largest measurement).
    """

    def __init__(self, device: torch.device | str, interval: float = 0.001, base: int | None = None):
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0
        self.base = 0
        self.common_base = base  # measure from this level (``baseline()``) rather than the level at entry
        self.kind = ""

    def baseline(self) -> int:
        """The current level (after a collection and trim): a common base for several measurements."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            return torch.cuda.memory_allocated(self.device)
        _malloc_trim()
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:  # pragma: no cover - psutil is a dependency
            return 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_allocated"
            return self
        _malloc_trim()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover - psutil is a dependency
            import resource

            self._proc = None
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = "ru_maxrss"
            return self
        self.kind = "rss"
        self.base = self._proc.memory_info().rss
        self._max = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                r = self._proc.memory_info().rss
                if r > self._max:
                    self._max = r
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, name="kcache-mem", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = self.base if self.common_base is None else self.common_base
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - base)
            self.absolute = torch.cuda.max_memory_allocated(self.device)
            return False
        if self._proc is None:
            import resource

            self.absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak = max(0, self.absolute - self.base)
            return False
        self._stop.set()
        self._thread.join()
        r = self._proc.memory_info().rss
        self._max = max(self._max, r)
        # From the common baseline, or from the level at entry when that is higher (memory an earlier
        # method left resident is not this method's).
        self.peak = max(0, self._max - (self.base if self.common_base is None else max(self.common_base, self.base)))
        self.absolute = self._max
        return False


def synchronize(device) -> None:
    d = torch.device(device)
    if d.type == "cuda":
        torch.cuda.synchronize(d)


# ---------------------------------------------------------------------------------------------
# preparing items


def _resolve_bundle(decoder: Decoder, bundle):
    """``None`` | bundle directory | ``Injector`` | ``(stack, meta)`` -> Injector or None."""
    from kcache.inject import Injector

    if bundle is None or isinstance(bundle, Injector):
        return bundle
    if isinstance(bundle, (str, Path)):
        return Injector.from_bundle(decoder, bundle)
    if isinstance(bundle, tuple) and len(bundle) == 2:
        return Injector.from_stack(decoder, bundle[0], bundle[1])
    raise TypeError(f"bundle must be None, a directory, an Injector or (stack, meta), not {type(bundle).__name__}")


def prepare_items(tokenizer, table: pa.Table, spec: TemplateSpec,
                  max_length: int) -> tuple[list[ScoreItem], dict, list[dict]]:
    """Tokenise every sample: its target item, plus one item per option that differs from the
    target text. -> (items, skip reasons Counter, per-row info dicts)."""
    cols = table.to_pydict()
    n = table.num_rows
    items, skipped, rows = [], Counter(), []
    prefix = prefix_parts(tokenizer, spec)
    get = lambda name, i: cols[name][i] if name in cols else None  # noqa: E731
    for i in range(n):
        knowledge, source, target = cols["knowledge"][i] or [], cols["source"][i], cols["target"][i]
        sid, ds = cols["id"][i], cols["dataset"][i]
        options, label = get("options", i), get("label", i)
        enc = encode_sample(tokenizer, knowledge, source, target, spec, max_length, prefix)
        if enc.skip_reason:
            skipped[enc.skip_reason.split(":")[0].split(" has ")[0].strip()] += 1
            rows.append({"row": i, "id": sid, "dataset": ds, "skipped": enc.skip_reason})
            continue
        same = tuple(o for o, t in enumerate(options or []) if t == target)
        items.append(ScoreItem(i, sid, ds, "target", None, enc.k_ids, enc.x_ids, enc.target_mask, enc.truncated, same))
        info = {"row": i, "id": sid, "dataset": ds, "skipped": None,
                "classification": options is not None and label is not None, "label": label}
        if info["classification"]:
            ok = True
            for o, text in enumerate(options):
                if o in same:
                    continue
                e = encode_sample(tokenizer, knowledge, source, text, spec, max_length, prefix)
                if e.skip_reason:
                    ok = False
                    continue
                items.append(ScoreItem(i, sid, ds, "option", o, e.k_ids, e.x_ids, e.target_mask, e.truncated, (o,)))
            info["classification"] = ok
            info["n_options"] = len(options)
        rows.append(info)
    return items, skipped, rows


# ---------------------------------------------------------------------------------------------
# evaluate


def _filter(table: pa.Table, split: str | None, limit: int | None) -> pa.Table:
    if split:
        splits = table["split"].to_pylist()
        keep = [i for i, s in enumerate(splits) if s == split]
        if not keep:
            raise ValueError(f"no samples in split {split!r}; the file has splits {sorted(set(splits))}")
        table = table.take(keep)
    if limit is not None:
        table = table.slice(0, limit)
    return table


CONTROLS = ("other", "empty")


def control_items(tokenizer, items: list[ScoreItem], knowledge: list[list[str]], spec: TemplateSpec, max_length: int,
                  kind: str) -> list[ScoreItem]:
    """The same items with their knowledge replaced: ``"other"`` - the knowledge of another
    evaluated sample (``derangement`` over the evaluated rows in file order), ``"empty"`` - none
    (the template's scaffold alone). Knowledge is cut to the same budget stage one allows;
    ``x_ids`` and the scored positions are unchanged."""
    rows = sorted({it.row for it in items})
    partner = dict(zip(rows, [rows[j] for j in derangement(len(rows))])) if kind == "other" else {}
    prefix = prefix_parts(tokenizer, spec)
    scaffold = scaffold_length(tokenizer, spec, prefix)
    out = []
    for it in items:
        k = knowledge[partner[it.row]] if kind == "other" else []
        k_ids, _ = encode_knowledge(tokenizer, k or [], spec, max_length - len(it.x_ids) - scaffold, prefix)
        out.append(dataclasses.replace(it, k_ids=k_ids))
    return out


def _methods(methods) -> list[Method]:
    out = []
    for m in methods:
        if isinstance(m, Method):
            out.append(m)
        elif isinstance(m, str):
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; registered: {', '.join(METHODS)}")
            out.append(METHODS[m])
        elif callable(m):
            out.append(Method(getattr(m, "__name__", "custom"), getattr(m, "__name__", "custom"), m))
        else:
            raise TypeError(f"method must be a name, a Method or a callable, not {type(m).__name__}")
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method(s) {', '.join(dup)} given more than once; each method is one row of the report")
    return out


def evaluate(
    decoder: Decoder,
    samples,
    bundle=None,
    methods=("x", "kx", "ekx"),
    *,
    cache=None,
    split: str | None = None,
    limit: int | None = None,
    token_budget: int = 4096,
    max_length: int | None = None,
    template: TemplateSpec | None = None,
    extras: dict | None = None,
    progress: bool = False,
    controls: bool = True,
    share_lower_blocks: bool = True,
    lower_blocks_max_bytes: int = 1 << 30,
) -> dict:
    """Evaluate ``methods`` on held-out ``samples`` (table or path) -> a JSON-ready dict.

    ``bundle``: encoder bundle directory, ``Injector`` or ``(stack, meta)`` (needed by ``ekx``);
    ``cache``: a stage-one cache path or ``Cache`` (needed by ``oracle``). Template and
    ``max_length`` come from the bundle, else the cache, else the defaults (1024), unless given.

    ``controls``: every method that reads the knowledge is also run with another sample's
    knowledge and with none (``control_items``); ``result["controls"]`` holds their perplexities
    and the knowledge use, ``NLL(other K) - NLL(right K)`` per token with a bootstrap CI.

    ``share_lower_blocks``: methods that leave the decoder's lower blocks unchanged over ``x``
    (``Method.untouched``: D(x), the encoders, the oracle) start from those blocks' output, computed
    once per input when it fits in ``lower_blocks_max_bytes``; their cost rows include that time
    (``settings["shared_lower_blocks"]``).
    """
    from kcache.data.samples import read_samples

    table = samples if isinstance(samples, pa.Table) else read_samples(samples)
    n_in = table.num_rows
    table = _filter(table, split, limit)
    injector, cache, oracle = _sources(decoder, bundle, cache)
    ms = _methods(methods)
    _check_needs(ms, injector, oracle)
    src = injector or oracle
    if template is None:
        template = src.template_spec() if src is not None else TemplateSpec()
    if max_length is None:
        max_length = src.info.max_length if src is not None else 1024

    items, skipped, rows = prepare_items(decoder.tokenizer, table, template, max_length)
    _check_oracle_samples(ms, oracle, cache, items)
    lengths = [len(it.k_ids) + len(it.x_ids) for it in items]
    batches = plan_batches(lengths, token_budget)
    scorer = _Scorer(decoder, injector, oracle, extras, token_budget, progress)
    # A warm-up forward pass (weights paged in, allocator and kernels warm) before anything is
    # timed, so no method, and not the shared lower blocks, is charged for the first call.
    if items:
        method_x(decoder, EvalBatch([items[i] for i in batches[0]]))
    shared = None
    if share_lower_blocks:
        shared = _share_lower_blocks(scorer, ms, items, batches, controls, lower_blocks_max_bytes)
    per_method, cost = _score_methods(scorer, ms, items, batches)
    control_scores = _score_controls(scorer, ms, items, table, template, max_length) if controls else {}

    results = aggregate(items, rows, per_method, {m.name: m.label for m in ms})
    return {
        "controls": knowledge_controls(items, per_method, control_scores, {m.name: m.label for m in ms}),
        "settings": _run_settings(decoder, bundle, injector, oracle, cache, ms, split=split, limit=limit,
                                  template=template, max_length=max_length, token_budget=token_budget)
        | {"shared_lower_blocks": shared},
        "counts": {
            "samples_in": n_in,
            "samples_selected": table.num_rows,
            "evaluated": sum(1 for r in rows if not r["skipped"]),
            "skipped": sum(skipped.values()),
            "skip_reasons": dict(skipped),
            "truncated": sum(1 for it in items if it.kind == "target" and it.truncated),
            "classification": sum(1 for r in rows if r.get("classification")),
            "items": len(items),
            "batches": len(batches),
        },
        "methods": cost,
        "results": results,
    }


def _sources(decoder: Decoder, bundle, cache):
    """The encoders (from ``bundle``) and the oracle (from ``cache``, opened when it is a path);
    refused when they write from different input positions (sinks). -> (injector, cache, oracle),
    each None when not given."""
    from kcache.cache import Cache
    from kcache.inject import Injector

    injector = _resolve_bundle(decoder, bundle)
    if cache is not None and not hasattr(cache, "deltas"):
        cache = Cache.open(cache)
    oracle = Injector.oracle(decoder, cache) if cache is not None else None
    if injector is not None and oracle is not None and injector.sink != oracle.sink:
        raise ValueError(f"the encoders write from input position {injector.sink}, "
                         f"the cache {cache.path} from {oracle.sink}: "
                         "evaluate encoders next to the oracle of the cache they were fitted on")
    return injector, cache, oracle


def _check_needs(ms: list[Method], injector, oracle) -> None:
    """Pre-flight check: every method that needs encoders or a stage-one cache has them."""
    for m in ms:
        if "encoders" in m.needs and injector is None:
            raise ValueError(f"method {m.name!r} needs encoders: pass an encoder bundle")
        if "cache" in m.needs and oracle is None:
            raise ValueError(f"method {m.name!r} needs a stage-one cache")


def _check_oracle_samples(ms: list[Method], oracle, cache, items: list[ScoreItem]) -> None:
    """Pre-flight check: with ``oracle`` among the methods, the cache holds some evaluated sample."""
    if oracle is not None and any(m.name == "oracle" for m in ms):
        cached = set(cache.index["sample_id"].to_pylist())
        if not any(it.sample_id in cached for it in items):
            raise ValueError(f"oracle: the cache {cache.path} holds none of the evaluated samples; "
                             "evaluate a split the cache was extracted from, or leave oracle out")


def _share_lower_blocks(scorer: _Scorer, ms: list[Method], items: list[ScoreItem], batches: list[list[int]],
                        controls: bool, max_bytes: int) -> dict | None:
    """Compute, once per input, the lower decoder blocks that several of ``ms`` run unchanged over
    ``x`` (``Method.untouched``), in the main batches (so those methods' scores are what they would
    be without sharing), and let those methods start from them (``scorer.lower``). None when fewer
    than two passes would share them, nothing is left to share, or the states would pass
    ``max_bytes``. -> the report's ``settings["shared_lower_blocks"]``."""
    decoder = scorer.decoder
    sources = EvalBatch([], scorer.injector, scorer.oracle, scorer.extras or {})
    blocks = {m.name: m.untouched(decoder, sources) for m in ms if m.untouched is not None}
    blocks = {k: v for k, v in blocks.items() if v}
    passes = sum(1 + (2 * controls if m.reads_knowledge else 0) for m in ms if m.name in blocks)
    if passes < 2 or not items:
        return None
    lower = LowerBlocks(decoder, min(min(blocks.values()), decoder.layers.num_layers))
    seqs = [it.x_ids for it in items]
    if lower.nbytes(seqs) > max_bytes:
        return None
    synchronize(decoder.device)
    t0 = time.perf_counter()
    n = lower.fill(seqs, batches, _pad_id(decoder))
    synchronize(decoder.device)
    scorer.lower, scorer.sharers = lower, set(blocks)
    scorer.shared_seconds = time.perf_counter() - t0
    return {"blocks": lower.blocks, "inputs": n, "seconds": scorer.shared_seconds, "methods": sorted(blocks)}


@dataclasses.dataclass
class _Scorer:
    """Scores items with one method at a time, in length-bucketed batches of ``token_budget``;
    the methods in ``sharers`` start from ``lower``'s kept states."""

    decoder: Decoder
    injector: object
    oracle: object
    extras: dict | None
    token_budget: int
    progress: bool
    lower: LowerBlocks | None = None
    sharers: set = dataclasses.field(default_factory=set)
    shared_seconds: float = 0.0

    def replay(self, m: Method):
        """The context ``m`` runs in: starting from the shared lower blocks, when it shares them."""
        return self.lower.replay() if self.lower is not None and m.name in self.sharers else contextlib.nullcontext()

    def run(self, m: Method, its: list[ScoreItem], desc: str,
            batches: list[list[int]] | None = None) -> list[torch.Tensor]:
        """Per item, the float32 CPU log-probabilities ``m`` gives its scored positions (batches
        planned here unless given)."""
        from tqdm.auto import tqdm

        scores: list[torch.Tensor | None] = [None] * len(its)
        bs = batches if batches is not None else plan_batches([len(it.k_ids) + len(it.x_ids) for it in its],
                                                              self.token_budget)
        with self.replay(m):
            for b in tqdm(bs, desc=desc, disable=not self.progress, dynamic_ncols=True):
                out = m.fn(self.decoder, EvalBatch([its[i] for i in b], self.injector, self.oracle, self.extras or {}))
                if len(out) != len(b):
                    raise ValueError(f"method {m.name!r} returned {len(out)} results for {len(b)} items")
                for i, lp in zip(b, out):
                    scores[i] = lp.detach().float().cpu()
        return scores


def _score_methods(scorer: _Scorer, ms: list[Method], items: list[ScoreItem],
                   batches: list[list[int]]) -> tuple[dict, dict]:
    """Run every method on ``items``, timing each and measuring its peak memory; refused when the
    oracle covers none of the scored positions. -> (scores per method, cost per method)."""
    decoder = scorer.decoder
    dev = decoder.device
    # Memory is measured from one baseline taken after the caller's warm-up forward pass (and the
    # shared lower blocks), so no method is charged for loading the model, whatever the order.
    base = PeakMemory(dev).baseline()
    per_method: dict[str, list[torch.Tensor]] = {}
    cost: dict[str, dict] = {}
    for m in ms:
        synchronize(dev)
        with PeakMemory(dev, base=base) as mem:
            t0 = time.perf_counter()
            per_method[m.name] = scorer.run(m, items, f"evaluate {m.name}", batches)
            synchronize(dev)
            seconds = time.perf_counter() - t0
        shared = scorer.shared_seconds if m.name in scorer.sharers else 0.0
        seconds += shared  # what the method costs alone: the lower blocks it started from included
        cost[m.name] = {"label": m.label, "seconds": seconds, "lower_blocks_seconds": shared,
                        "peak_memory_bytes": int(mem.peak),
                        "memory_kind": mem.kind,
                        "tokens_per_second": sum(len(it.x_ids) for it in items) / max(seconds, 1e-9)}
    if "oracle" in per_method and not sample_nll(items, per_method["oracle"]):
        raise ValueError("oracle: the cache covers none of the evaluated samples' scored positions; "
                         "evaluate a split the cache was extracted from, or leave oracle out")
    return per_method, cost


def _score_controls(scorer: _Scorer, ms: list[Method], items: list[ScoreItem], table: pa.Table, template: TemplateSpec,
                    max_length: int) -> dict[str, dict[str, list[torch.Tensor]]]:
    """The knowledge controls: each knowledge-reading method rerun with another sample's knowledge
    and with none (``CONTROLS``), when there are at least two target items. -> scores per control
    kind and method ({} when skipped)."""
    control_scores: dict[str, dict[str, list[torch.Tensor]]] = {}
    readers = [m for m in ms if m.reads_knowledge]
    n_target = sum(1 for it in items if it.kind == "target")
    if readers and n_target >= 2:
        knowledge = [k or [] for k in table["knowledge"].to_pylist()]
        for kind in CONTROLS:
            its = control_items(scorer.decoder.tokenizer, items, knowledge, template, max_length, kind)
            control_scores[kind] = {m.name: scorer.run(m, its, f"evaluate {m.name} ({kind} K)") for m in readers}
    return control_scores


def _run_settings(decoder: Decoder, bundle, injector, oracle, cache, ms: list[Method], *, split, limit,
                  template: TemplateSpec, max_length: int, token_budget: int) -> dict:
    """The report's ``settings``: model, encoders/cache and where they inject, selection, template
    and methods."""
    return {
        "model": decoder.fingerprint.to_dict(),
        "device": str(decoder.device),
        "dtype": str(decoder.dtype).replace("torch.", ""),
        "encoders": str(bundle) if isinstance(bundle, (str, Path)) else (None if injector is None else "in-memory"),
        "site": injector.site if injector is not None else (oracle.site if oracle is not None else None),
        "layers": injector.layers if injector is not None else (oracle.layers if oracle is not None else None),
        "cache": str(cache.path) if cache is not None else None,
        "split": split,
        "limit": limit,
        "template": dataclasses.asdict(template),
        "max_length": max_length,
        "token_budget": token_budget,
        "methods": [m.name for m in ms],
        "labels": {m.name: m.label for m in ms},
        "targets": (injector.info.targets if injector is not None
                    else oracle.info.targets if oracle is not None else None),
        "sink": injector.sink if injector is not None else (oracle.sink if oracle is not None else None),
    }


def knowledge_controls(items: list[ScoreItem], per_method: dict, control_scores: dict, labels: dict) -> dict:
    """Per knowledge-reading method: perplexity with the right, another sample's and no knowledge,
    ``knowledge_use`` = pooled NLL(other K) - NLL(right K) in nats per target token (95 % CI over
    samples), ``empty_use`` likewise against no knowledge; plus each method's gap fraction with CI."""
    out = {}
    per_sample = {name: sample_nll(items, sc) for name, sc in per_method.items()}
    for name in control_scores.get("other", {}):
        right = per_sample[name]
        row = {"label": labels.get(name, name)}
        for kind in CONTROLS:
            ctl = sample_nll(items, control_scores[kind][name])
            tot, n = sum(v for v, _ in ctl.values()), sum(t for _, t in ctl.values())
            row[kind] = {"perplexity": (math.exp(tot / n) if tot / n < 700 else float("inf")) if n else None,
                         "nll": tot / n if n else None, "tokens": n}
            row["knowledge_use" if kind == "other" else "empty_use"] = paired_difference(ctl, right)
        out[name] = row
    if "x" in per_sample and "kx" in per_sample:
        for name, sc in per_sample.items():
            if name not in ("x", "kx"):
                row = out.setdefault(name, {"label": labels.get(name, name)})
                row["gap_closed"] = gap_fraction(per_sample["x"], per_sample["kx"], sc)
    return out


def aggregate(items: list[ScoreItem], rows: list[dict], per_method: dict[str, list[torch.Tensor]],
              labels: dict[str, str]) -> dict:
    """Per dataset (and ``"all"``) and method: perplexity over target items, accuracy over
    classification samples. An item a method left NaN at a scored position is excluded."""
    by_ds: dict[str, list[int]] = defaultdict(list)
    for k, it in enumerate(items):
        by_ds[it.dataset].append(k)
    cls_rows = {r["row"]: r for r in rows if r.get("classification")}
    results: dict[str, dict] = {}
    for ds, ks in sorted(by_ds.items()) + [("all", list(range(len(items))))]:
        results[ds] = {}
        for name, scores in per_method.items():
            lps, masks, n_samples = [], [], 0
            opt: dict[int, dict[int, float]] = defaultdict(dict)
            unavailable_rows = set()
            for k in ks:
                it, lp = items[k], scores[k]
                sm = it.score_mask
                sel = torch.tensor(sm, dtype=torch.bool)
                ok = bool(sel.any()) and not torch.isnan(lp[sel]).any()
                if it.kind == "target" and ok:
                    lps.append(lp)
                    masks.append(sm)
                    n_samples += 1
                if it.row in cls_rows:
                    if not ok:
                        unavailable_rows.add(it.row)
                    else:
                        for o in it.options:
                            opt[it.row][o] = float(lp[sel].double().sum())
            ppl, nll, ntok = perplexity(lps, masks)
            correct = total = 0
            for row, scores_o in opt.items():
                info = cls_rows[row]
                if row in unavailable_rows or len(scores_o) != info["n_options"]:
                    continue
                total += 1
                correct += option_prediction([scores_o[o] for o in range(info["n_options"])]) == info["label"]
            results[ds][name] = {
                "label": labels.get(name, name),
                "perplexity": ppl,
                "nll": nll,
                "tokens": ntok,
                "samples": n_samples,
                "accuracy": (correct / total) if total else None,
                "classified": total,
            }
    return results


# ---------------------------------------------------------------------------------------------
# reports


def _fmt_ppl(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v >= 1e4:
        return f"{v:.3g}"
    return f"{v:.3f}"


def markdown_report(res: dict) -> str:
    """Tables: perplexity per dataset, accuracy (classification sets), time and memory."""
    methods = res["settings"]["methods"]
    labels = res["settings"]["labels"]
    datasets = [d for d in res["results"] if d != "all"] + ["all"]
    s, c = res["settings"], res["counts"]
    lines = [
        "# kcache evaluation",
        "",
        f"Model `{s['model'].get('name', '')}` ({s['model']['architecture']}) on {s['device']} ({s['dtype']}); "
        f"encoders: {s['encoders'] or '–'}; cache: {s['cache'] or '–'}; split: {s['split'] or 'all'}; "
        f"{c['evaluated']} of {c['samples_selected']} samples evaluated ({c['skipped']} "
        f"skipped{': ' + ', '.join(f'{k} {v}' for k, v in c['skip_reasons'].items()) if c['skipped'] else ''}; "
        f"{c['truncated']} with truncated knowledge, max_length {s['max_length']}).",
        "",
        "## Perplexity over target tokens (lower is better)",
        "",
        "| method | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for m in methods:
        cells = []
        for d in datasets:
            r = res["results"][d].get(m)
            cells.append(_fmt_ppl(r["perplexity"]) if r else "–")
        lines.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Tokens scored: " + ", ".join(f"{labels[m]} {res['results']['all'][m]['tokens']} "
                                                f"({res['results']['all'][m]['samples']} samples)"
                                                for m in methods) + "."]
    if c["classification"]:
        cls_ds = [d for d in datasets if any(res["results"][d][m]["classified"] for m in methods)]
        lines += ["", "## Accuracy on classification samples (higher is better)", "",
                  "| method | " + " | ".join(cls_ds) + " |", "|---|" + "---|" * len(cls_ds)]
        for m in methods:
            cells = []
            for d in cls_ds:
                r = res["results"][d][m]
                cells.append(f"{100 * r['accuracy']:.1f}% ({r['classified']})" if r["accuracy"] is not None else "–")
            lines.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost", "", "| method | seconds | input tokens / s | peak memory (MiB above start) |",
              "|---|---|---|---|"]
    for m in methods:
        mm = res["methods"][m]
        lines.append(f"| {labels[m]} | {mm['seconds']:.2f} | {mm['tokens_per_second']:.0f} | "
                     f"{mm['peak_memory_bytes'] / 2**20:.1f} ({mm['memory_kind']}) |")
    lines.append("")
    lines.append("Memory: peak above one baseline taken after the model was loaded and warmed up "
                 "(the same for every method).")
    sh = s.get("shared_lower_blocks")
    if sh:
        lines += ["", f"{', '.join(labels[m] for m in methods if m in sh['methods'])} start from the decoder's "
                      f"blocks 0-{sh['blocks'] - 1} over x, computed once per input ({sh['seconds']:.2f} s for "
                      f"{sh['inputs']} inputs) and counted in each of their seconds."]
    return "\n".join(lines) + "\n" + controls_markdown(res)


def _ci(d: dict, key: str, fmt: str) -> str:
    v, (lo, hi) = d.get(key), d.get("ci", [None, None])
    if v is None:
        return "–"
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None and lo == lo else f"{v:{fmt}}"


def controls_markdown(res: dict) -> str:
    """The knowledge-swap table and the verdict: does each method use the knowledge?"""
    ctl = res.get("controls") or {}
    readers = [m for m in res["settings"]["methods"] if "knowledge_use" in ctl.get(m, {})]
    if not readers:
        return ""
    labels = res["settings"]["labels"]
    allr = res["results"]["all"]
    lines = ["", "## Knowledge-swap control", "",
             "Each method run again with another test sample's knowledge (a fixed derangement) and with none. "
             "**Knowledge use** = NLL(other K) − NLL(right K), nats per target token, 95 % bootstrap CI over samples: "
             "> 0 means the method uses *this* sample's knowledge; a gain over D(x) without it is task adaptation.", "",
             "| method | right K | other K | empty K | knowledge use (nats) | vs empty K (nats) | gap closed |",
             "|---|---|---|---|---|---|---|"]
    for m in readers:
        c = ctl[m]
        gap = c.get("gap_closed", {})
        lines.append(f"| {labels[m]} | {_fmt_ppl(allr[m]['perplexity'])} | {_fmt_ppl(c['other']['perplexity'])} | "
                     f"{_fmt_ppl(c['empty']['perplexity'])} | {_ci(c['knowledge_use'], 'nats', '+.3f')} | "
                     f"{_ci(c['empty_use'], 'nats', '+.3f')} | "
                     f"{_ci(gap, 'fraction', '.3f') if gap else '–'} |")
    if "oracle" in res["settings"]["methods"]:
        o = allr["oracle"]
        n = max(allr[m]["samples"] for m in res["settings"]["methods"])
        note = f" — on {o['samples']} of {n} samples (the others are not in the cache)" if o["samples"] < n else ""
        og = ctl.get("oracle", {}).get("gap_closed")
        lines += ["", "Oracle = the exact cached deltas injected at the cache's layers "
                      f"({res['settings'].get('targets') or '?'} targets): "
                  f"what stage two is fitted to, not a guaranteed bound. Perplexity {_fmt_ppl(o['perplexity'])}"
                  f"{', gap closed ' + _ci(og, 'fraction', '.3f') if og else ''}{note}."]
    kx_use = ctl.get("kx", {}).get("knowledge_use", {}).get("nats")
    lines.append("")
    for m in readers:
        if m == "kx":
            continue
        ku = ctl[m]["knowledge_use"]
        if ku.get("nats") is None:
            lines.append(f"**{labels[m]}: knowledge use not measured (no sample scored with both knowledge sets).**")
            continue
        lo = ku["ci"][0]
        uses = lo is not None and lo > 0
        share = f" ({100 * ku['nats'] / kx_use:.0f} % of D(K,x)'s {kx_use:+.3f})" if kx_use else ""
        vs_x = ""
        if "x" in allr and allr["x"]["nll"] is not None and allr[m]["nll"] is not None:
            vs_x = "; beats D(x)" if allr[m]["nll"] < allr["x"]["nll"] else "; does not beat D(x)"
        bound = f", CI lower bound {lo:+.3f}" if lo is not None else ""
        lines.append(f"**{labels[m]}: {'USES the knowledge' if uses else 'no evidence it uses the knowledge'} "
                     f"(knowledge use {ku['nats']:+.3f} nats{share}{bound}){vs_x}.**")
    return "\n".join(lines) + "\n"


def plot_report(res: dict, path: Path) -> Path:
    """Bar chart: perplexity per dataset and method (log scale), accuracy when present, cost."""
    plt = pyplot()
    methods = res["settings"]["methods"]
    labels = res["settings"]["labels"]
    datasets = [d for d in res["results"] if d != "all"] + ["all"]
    has_acc = res["counts"]["classification"] > 0
    ncols = 3 if has_acc else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols + 1, 4))
    width = 0.8 / max(1, len(methods))
    ax = axes[0]
    for k, m in enumerate(methods):
        vals = [res["results"][d][m]["perplexity"] for d in datasets]
        vals = [v if v == v and v not in (None, float("inf")) else 0 for v in vals]
        ax.bar([i + k * width for i in range(len(datasets))], vals, width, label=labels[m])
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(datasets))], datasets, rotation=30, ha="right")
    finite = [res["results"][d][m]["perplexity"] for d in datasets for m in methods]
    finite = [v for v in finite if v is not None and v == v and 0 < v < float("inf")]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_title("perplexity over target tokens")
    ax.legend(fontsize=8)
    if has_acc:
        ax = axes[1]
        cls_ds = [d for d in datasets if any(res["results"][d][m]["classified"] for m in methods)]
        for k, m in enumerate(methods):
            vals = [100 * (res["results"][d][m]["accuracy"] or 0) for d in cls_ds]
            ax.bar([i + k * width for i in range(len(cls_ds))], vals, width, label=labels[m])
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cls_ds))], cls_ds, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_title("accuracy (%)")
    ax = axes[-1]
    secs = [res["methods"][m]["seconds"] for m in methods]
    mem = [res["methods"][m]["peak_memory_bytes"] / 2**20 for m in methods]
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], secs, 0.4, label="seconds", color="tab:blue")
    ax.set_ylabel("seconds")
    ax2 = ax.twinx()
    ax2.bar([x + 0.2 for x in xs], mem, 0.4, label="peak MiB", color="tab:orange")
    ax2.set_ylabel("peak memory above start (MiB)")
    ax.set_xticks(list(xs), [labels[m] for m in methods], rotation=30, ha="right")
    ax.set_title("cost: seconds (blue), peak memory (orange)")
    return save_png(fig, path)


def _json_safe(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def write_report(res: dict, out: str | Path) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json", "markdown": out / "evaluation.md", "png": out / "evaluation.png"}
    paths["json"].write_text(json.dumps(_json_safe(res), indent=2, sort_keys=True))
    paths["markdown"].write_text(markdown_report(res))
    plot_report(res, paths["png"])
    return paths

