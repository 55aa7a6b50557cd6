"""Stage one: run the frozen decoder twice per sample and cache the shift-aligned differences.

``extract(decoder, samples, out, ...)`` tokenises every sample (``kcache.align``), lays the
samples out in length order, writes everything that does not need the model, then runs
length-bucketed batches of pass A (``x``) and pass B (``k + x``) through blocks
``0..max(layers)`` only, and hands float32 differences (converted to the storage dtype) to a
background writer. Rerunning the same command resumes after the last commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import zarr
from tqdm.auto import tqdm

from kcache import __version__
from kcache._io import now
from kcache.align import (
    DEFAULT_SINK,
    DEFAULT_TARGETS,
    TARGETS,
    TemplateSpec,
    adds_bos,
    encode_sample,
    input_keep,
    length_mask,
    loss_mask,
    pad_right,
    parse_layers,
    plan_batches,
    prefix_parts,
    shift_left,
)
from kcache.cache.card import write_card  # the store card (README.md); kcache.extract.write_card is the same
from kcache.cache.format import ATTRS_KEY, FORMAT, MANIFEST, SCHEMA_VERSION, CacheError, encode_rows
from kcache.cache.integrity import finalize, refuse_if_finalized, write_part_record
from kcache.cache.lossy import ErrorAccumulator, parse_storage
from kcache.cache.reader import settings_differences
from kcache.cache.writer import (
    DeltaWriter,
    RunningStats,
    codecs_description,
    create_cache,
    default_chunk_rows,
    read_last_commit,
)
from kcache.data.samples import read_samples, require_usable, sample_set_fingerprint
from kcache.models import Decoder


@dataclasses.dataclass
class ExtractConfig:
    """Settings that define a cache (all but ``token_budget`` are recorded and compared on resume)."""

    layers: str | list[int] = "3-8"
    site: str = "block"  # block output (residual stream; cascade targets force it to pass B's) | mlp (the paper's)
    template: str = TemplateSpec.template
    separator: str = TemplateSpec.separator
    template_end: str = "eos"
    max_length: int = 1024
    dtype: str = "float16"
    skip_bos: bool = False
    token_budget: int = 8192
    chunk_rows: int | None = None
    shard_rows: int | None = None
    chunks_per_shard: int = 8
    storage: str = "lossless"  # lossless | bitround:N | int8 (kcache.cache.lossy); lossy is for caches that travel
    targets: str = DEFAULT_TARGETS  # independent | cascade | distilled (batch_deltas; docs/training.md)
    sink: int = DEFAULT_SINK  # leading input positions never written (align.sink_keep)
    distill_steps: int = 8  # targets = distilled: Adam steps on the deltas per batch
    distill_lr: float = 0.05  # ... learning rate, times each layer's delta RMS
    distill_tokens: int = 1024  # ... tokens per sub-batch (full-vocabulary logits are held for both passes)

    def distill(self) -> dict:
        return {"steps": self.distill_steps, "lr": self.distill_lr, "tokens": self.distill_tokens}


# ---------------------------------------------------------------------------------------------
# capturing activations


class _StopForward(Exception):
    """Raised by a hook after the last needed block: early exit, no later blocks, no LM head."""


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(out, h):
    return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


@contextlib.contextmanager
def site_hooks(decoder: Decoder, site: str, layers: list[int], make_hook, stop: bool = True):
    """``make_hook(layer)`` as a forward hook on ``site`` at each layer (in forward order); with
    ``stop`` the forward pass ends right after block ``max(layers)`` (``run_blocks`` catches it)."""
    handles = []

    def halt(_mod, _inp, _out):
        raise _StopForward

    try:
        for l in sorted(layers):
            handles.append(decoder.layers.site_module(site, l).register_forward_hook(make_hook(l)))
        if stop:
            handles.append(decoder.layers.block(max(layers)).register_forward_hook(halt))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(decoder: Decoder, site: str, layers: list[int], stop: bool = True):
    """Record the output of ``site`` at each layer into the yielded dict; with ``stop`` the forward
    pass ends right after block ``max(layers)``."""
    acts: dict[int, torch.Tensor] = {}

    def grab(layer):
        def hook(_mod, _inp, out):
            acts[layer] = _hidden(out)
        return hook

    with site_hooks(decoder, site, layers, grab, stop):
        yield acts


def run_blocks(decoder: Decoder, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Forward through the backbone (embeddings + blocks); an early-exit hook may end it."""
    try:
        decoder.layers.backbone()(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass


@contextlib.contextmanager
def _correct_to(decoder: Decoder, site: str, want: dict[int, torch.Tensor], keep: torch.Tensor, deltas: dict,
                stop: bool = True):
    """Cascade hooks for pass A: at each layer (in forward order) record
    ``delta = (want - act) * keep`` against the activation *as it arrives* (earlier layers already
    corrected) and add it, so the layers above see pass B's values at every kept position."""

    def correct(layer):
        def hook(_mod, _inp, out):
            h = _hidden(out)
            d = (want[layer] - h.float()) * keep
            deltas[layer] = d
            return _replace_hidden(out, h + d.to(h.dtype))
        return hook

    with site_hooks(decoder, site, list(want), correct, stop):
        yield deltas


@torch.no_grad()
def batch_deltas(decoder: Decoder, items: list, site: str, layers: list[int], targets: str = "independent",
                 sink: int = 0, distill: dict | None = None) -> dict[int, torch.Tensor]:
    """Two passes over a batch of encoded samples -> ``{layer: (sum x_len, hidden) float32}``.

    Rows are the input positions of each sample in turn (the cache's flat layout). With ``n`` the
    longest input and ``keep = input_keep(x_lens, n, sink)`` (real positions past the sink):

    * ``independent``: ``delta[l] = (shift_left(act_B[l], |K|) - act_A[l]) * keep``, every layer
      against the clean pass A. Exact for one injected layer; with several, layer ``l`` sees the
      injections below it, which its target never did.
    * ``cascade``: pass A runs with the deltas of the earlier requested layers already added,
      ``delta[l] = (shift_left(act_B[l], |K|) - act_A'[l]) * keep``; injecting all of them
      together reproduces pass B's site activations at every injected layer (kept positions).
    * ``distilled``: the cascade deltas, then ``distill["steps"]`` Adam steps on the deltas
      themselves minimising ``KL(D(K,x) || D(x) + delta)`` over the input positions
      (``distill_deltas``). Needs full-depth passes; the decoder stays frozen.
    """
    if targets not in TARGETS:
        raise CacheError(f"targets must be one of {', '.join(TARGETS)}, not {targets!r}")
    dev = decoder.device
    pad = decoder.tokenizer.pad_token_id if decoder.tokenizer.pad_token_id is not None else 0
    x_lens = torch.tensor([len(e.x_ids) for e in items], device=dev)
    k_lens = torch.tensor([len(e.k_ids) for e in items], device=dev)
    ids_a, mask_a = pad_right([e.x_ids for e in items], pad)
    ids_b, mask_b = pad_right([e.k_ids + e.x_ids for e in items], pad)
    ids_a, mask_a, ids_b, mask_b = ids_a.to(dev), mask_a.to(dev), ids_b.to(dev), mask_b.to(dev)
    n = ids_a.shape[1]
    keep = input_keep(x_lens, n, sink)[..., None].float()
    with capture(decoder, site, layers) as acts:
        run_blocks(decoder, ids_b, mask_b)
        want = {l: shift_left(acts[l].float(), k_lens, n) for l in layers}
    deltas: dict[int, torch.Tensor] = {}
    if targets == "independent":
        with capture(decoder, site, layers) as acts:
            run_blocks(decoder, ids_a, mask_a)
            deltas = {l: (want[l] - acts[l].float()) * keep for l in layers}
    else:
        with _correct_to(decoder, site, want, keep, deltas):
            run_blocks(decoder, ids_a, mask_a)
    if targets == "distilled":
        opts = dict(distill or {})
        # Full-vocabulary logits of both passes: sub-batches of about ``tokens`` keep them bounded.
        per = max(1, int(opts.pop("tokens", 1024)) // max(1, ids_b.shape[1]))
        parts = []
        for a in range(0, len(items), per):
            sl = slice(a, a + per)
            parts.append(distill_deltas(decoder, site, {l: d[sl] for l, d in deltas.items()}, keep[sl],
                                        (ids_a[sl], mask_a[sl]),
                                        (ids_b[sl], mask_b[sl]), k_lens[sl], x_lens[sl], **opts))
        deltas = {l: torch.cat([p[l] for p in parts]) for l in layers}
    valid = length_mask(x_lens, n)
    return {l: deltas[l][valid] for l in layers}


def kl_to_teacher(student_logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean over its masked positions of ``KL(teacher || student)`` of the
    next-token distributions (natural log) -> (B,). ``student_logits`` (B, n, V), ``teacher_logp``
    (B, n, V) log-probabilities (``-inf`` allowed: ``0 * log 0`` counts as 0), ``mask`` (B, n) bool."""
    lp = student_logits.float().log_softmax(-1)
    kl = torch.nn.functional.kl_div(lp, teacher_logp, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


def distill_deltas(decoder: Decoder, site: str, deltas: dict[int, torch.Tensor], keep: torch.Tensor, pass_a, pass_b,
                   k_lens: torch.Tensor, x_lens: torch.Tensor, steps: int = 8,
                   lr: float = 0.05) -> dict[int, torch.Tensor]:
    """Refine ``deltas`` ``{layer: (B, n, hidden)}`` by ``steps`` Adam steps on
    ``KL(D(K,x) || D(x)+delta)`` over every real input position, and return, per sample, its
    deltas at the step with its lowest KL (step 0 = the deltas given, so never worse).

    Per sample: the loss is the sum over samples of each one's mean KL, and each layer's deltas
    are optimised in units of that sample's own delta RMS (learning rate ``lr`` in those units),
    so a sample's result does not depend on its batch neighbours (up to float rounding).
    Positions outside ``keep`` stay zero. Only the deltas receive gradients; the decoder is frozen."""
    from kcache.inject import add_at_site

    model = decoder.model
    n = pass_a[0].shape[1]
    real = length_mask(x_lens, n)
    with torch.no_grad():
        logits_b = model(input_ids=pass_b[0], attention_mask=pass_b[1], use_cache=False).logits
        teacher = shift_left(logits_b.float().log_softmax(-1), k_lens, n)
        del logits_b
    count = keep.sum(dim=(1, 2)).clamp(min=1)  # kept positions per sample
    scale = {l: (d.pow(2).sum(dim=(1, 2)) / (count * d.shape[-1])).sqrt().clamp(min=1e-6)[:, None, None]
             for l, d in deltas.items()}
    units = {l: (d / scale[l]).detach().clone().requires_grad_(True) for l, d in deltas.items()}
    opt = torch.optim.Adam(list(units.values()), lr=lr)
    best = {l: d.detach().clone() for l, d in deltas.items()}
    best_kl = torch.full((keep.shape[0],), float("inf"), device=keep.device)
    for step in range(steps + 1):
        with torch.enable_grad():
            add = {l: u * scale[l] * keep for l, u in units.items()}
            with add_at_site(decoder, site, add):
                logits = model(input_ids=pass_a[0], attention_mask=pass_a[1], use_cache=False).logits
            kl = kl_to_teacher(logits, teacher, real)
            better = kl.detach() < best_kl
            best_kl = torch.where(better, kl.detach(), best_kl)
            for l, a in add.items():
                best[l] = torch.where(better[:, None, None], a.detach(), best[l])
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            kl.sum().backward()
            opt.step()
    return best


# ---------------------------------------------------------------------------------------------
# planning (pure, no model calls)


@dataclasses.dataclass
class Plan:
    """Tokenised samples in layout order, plus everything left out."""

    order: list[int]  # layout position -> row in the samples table
    encoded: list  # layout position -> align.Encoded
    skipped: list[tuple[int, str]]  # (row, reason)
    batches: list[list[int]]  # layout positions, consecutive runs

    @property
    def x_lens(self) -> np.ndarray:
        return np.array([len(e.x_ids) for e in self.encoded], dtype=np.int64)

    @property
    def row_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.x_lens)]).astype(np.int64)


def make_plan(tokenizer, samples: pa.Table, cfg: ExtractConfig) -> Plan:
    spec = TemplateSpec(cfg.template, cfg.separator, cfg.template_end)
    cols = samples.select(["knowledge", "source", "target"]).to_pydict()
    kept, skipped = [], []
    prefix = prefix_parts(tokenizer, spec)
    for row, (k, s, t) in enumerate(zip(cols["knowledge"], cols["source"], cols["target"])):
        enc = encode_sample(tokenizer, k, s, t, spec, cfg.max_length, prefix)
        if enc.skip_reason:
            skipped.append((row, enc.skip_reason))
        else:
            kept.append((row, enc))
    # Layout order = length order, so consecutive runs make well-packed batches and the writer
    # sees rows strictly in order. Ties break on the sample's row: deterministic.
    kept.sort(key=lambda re: (len(re[1].k_ids) + len(re[1].x_ids), len(re[1].x_ids), re[0]))
    order = [r for r, _ in kept]
    encoded = [e for _, e in kept]
    lengths = [len(e.k_ids) + len(e.x_ids) for e in encoded]
    batches = plan_batches(lengths, cfg.token_budget, order=list(range(len(encoded))))
    return Plan(order, encoded, skipped, batches)


def batch_costs(plan: Plan) -> list[int]:
    """Padded tokens of each batch over both passes: what a batch costs to run."""
    out = []
    for b in plan.batches:
        xa = max(len(plan.encoded[i].x_ids) for i in b)
        xb = max(len(plan.encoded[i].k_ids) + len(plan.encoded[i].x_ids) for i in b)
        out.append(len(b) * (xa + xb))
    return out


def rank_batches(costs: list[int], world: int) -> list[tuple[int, int]]:
    """Split batches into ``world`` contiguous ranges ``[lo, hi)`` of about equal cost.

    Contiguous, so the parts in rank order are the single-process layout cut in pieces; the
    batches themselves are unchanged, so every sample's values are bit-identical to a
    single-process run. Depends only on the plan and ``world`` (deterministic on every rank).
    """
    cum = np.cumsum([0] + list(costs))
    total = cum[-1]
    cuts = [0] + [int(np.searchsorted(cum, total * k / world, side="left")) for k in range(1, world)] + [len(costs)]
    cuts = np.maximum.accumulate(np.minimum(cuts, len(costs)))
    return [(int(cuts[k]), int(cuts[k + 1])) for k in range(world)]


def sub_plan(plan: Plan, lo_batch: int, hi_batch: int, keep_skipped: bool) -> Plan:
    """The part of ``plan`` covering batches ``[lo_batch, hi_batch)`` (positions renumbered from 0)."""
    batches = plan.batches[lo_batch:hi_batch]
    if not batches:
        return Plan([], [], plan.skipped if keep_skipped else [], [])
    lo, hi = batches[0][0], batches[-1][-1] + 1
    return Plan(plan.order[lo:hi], plan.encoded[lo:hi], plan.skipped if keep_skipped else [],
                [[i - lo for i in b] for b in batches])


def part_name(rank: int, world: int) -> str:
    return f"parts/{rank:05d}-of-{world:05d}"


def useful_fraction(plan: Plan) -> float:
    """Real tokens / padded tokens over both passes of every batch."""
    real = padded = 0
    for b in plan.batches:
        xa = [len(plan.encoded[i].x_ids) for i in b]
        xb = [len(plan.encoded[i].k_ids) + len(plan.encoded[i].x_ids) for i in b]
        real += sum(xa) + sum(xb)
        padded += len(b) * (max(xa) + max(xb))
    return real / padded if padded else 1.0


# ---------------------------------------------------------------------------------------------
# extraction


def _settings(decoder: Decoder, cfg: ExtractConfig, layers: list[int], samples: pa.Table, chunk: int,
              shard: int) -> dict:
    return {
        "model": decoder.fingerprint.to_dict(),
        "site": cfg.site,
        "layers": layers,
        "template": {"template": cfg.template, "separator": cfg.separator, "end": cfg.template_end},
        "max_length": cfg.max_length,
        "dtype": cfg.dtype,
        "skip_bos": cfg.skip_bos,
        "targets": cfg.targets,
        "sink": cfg.sink,
        **({"distill": cfg.distill()} if cfg.targets == "distilled" else {}),
        "sample_set": sample_set_fingerprint(samples),
        "chunk_rows": chunk,
        "shard_rows": shard,
        "codecs": codecs_description(),
        # Only lossy storage is recorded, so lossless settings stay comparable with older caches.
        **({"storage": parse_storage(cfg.storage)} if parse_storage(cfg.storage)["kind"] != "lossless" else {}),
    }


@dataclasses.dataclass
class ExtractReport:
    path: Path
    samples: int
    skipped: int
    skip_reasons: dict
    truncated: int
    input_tokens: int
    seconds: float
    forward_seconds: float
    resumed_from_row: int
    status: str
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. an elastic worker's share of the units

    def lines(self) -> list[str]:
        out = [f"cache {self.path}: {self.status}; {self.samples} samples, {self.input_tokens} input tokens"]
        if self.resumed_from_row:
            out.append(f"resumed after row {self.resumed_from_row}")
        out.append(f"skipped {self.skipped}" + (f" ({', '.join(f'{r}: {n}' for r, n in self.skip_reasons.items())})"
                                                if self.skipped else ""))
        out.append(f"truncated knowledge in {self.truncated} samples")
        out += self.notes
        if self.seconds:
            out.append(f"{self.seconds:.1f} s ({self.forward_seconds:.1f} s in forward passes, "
                       f"{self.input_tokens / max(self.seconds, 1e-9):.0f} input tokens/s)")
        return out


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" has ")[0].strip()


def extract(
    decoder: Decoder,
    samples: str | Path | pa.Table,
    out: str | Path,
    cfg: ExtractConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    elastic=None,
) -> ExtractReport:
    """Extract (or resume extracting) the delta cache for ``samples`` into ``out``.

    With ``world > 1`` (one call per rank, e.g. under torchrun) rank ``r`` takes a contiguous,
    cost-balanced run of the batches and writes ``out/parts/RRRRR-of-WWWWW``; once every rank
    is done, rank 0 writes the manifest that makes the parts one cache. Ranks synchronise
    through torch.distributed when it is initialised; see ``kcache.distributed``.

    One writer per output: the whole call holds the lock on ``out`` (rank r > 0 of a
    distributed run: the lock of its part), so a second extraction into the same ``out``
    fails at once naming the process that writes it (``kcache.lock``).

    ``elastic`` (a ``kcache.elastic.ElasticConfig``): this call is one worker of an elastic
    extraction instead; any number of them, started anywhere and any time, fill ``out`` unit by
    unit and the last one finalizes it (``kcache.elastic.extract_elastic``; ``rank``/``world`` unused).
    """
    from kcache.lock import output_lock

    if elastic is not None:
        from kcache.elastic import extract_elastic

        return extract_elastic(decoder, samples, out, cfg, elastic, overwrite=overwrite, progress=progress)
    tag = f"rank-{rank:05d}-of-{world:05d}" if world > 1 and rank > 0 else None
    with output_lock(out, "extract into it", tag=tag):
        return _extract(decoder, samples, out, cfg, overwrite, progress, rank, world)


def _extract(decoder, samples, out, cfg, overwrite, progress, rank, world) -> ExtractReport:
    cfg = cfg or ExtractConfig()
    t_start = time.perf_counter()
    root = Path(out)
    out = root / part_name(rank, world) if world > 1 else root
    table, layers, chunk, shard = _check_request(decoder, samples, root, cfg, world)
    settings = _settings(decoder, cfg, layers, table, chunk, shard)
    report = _finalized_report(root, settings, overwrite, decoder)
    if report is not None:
        return report
    from kcache.elastic import refuse_if_elastic

    refuse_if_elastic(root)
    plan = _rank_plan(decoder, table, samples, cfg, rank, world)

    resume_row = 0
    existing = _existing_part(out, settings, overwrite)
    if existing is not None:
        _same_model_dtype(existing, decoder, out)
        if existing["status"] == "complete":
            return _finish_completed_part(root, out, rank, world, existing)
        resume_row, budget = _resume_point(out, existing, cfg)
        if budget != cfg.token_budget:
            cfg = dataclasses.replace(cfg, token_budget=budget)
            plan = _rank_plan(decoder, table, samples, cfg, rank, world)

    total = int(plan.row_offsets[-1])
    ids_col = table["id"].to_pylist()
    counts, skip_reasons = _counts(plan, total)
    if resume_row == 0 and not (out / "zarr.json").exists():
        group, attrs = _create_part(decoder, out, table, ids_col, settings, counts, cfg, plan, rank, world)
    else:
        group = zarr.open_group(str(out), mode="r+")
        attrs = group.attrs[ATTRS_KEY]

    storage = settings.get("storage")
    writer, stats, errors = _open_writer(out, group, layers, cfg, shard, total, resume_row, plan.x_lens, storage,
                                         decoder.device)
    fwd = _extract_batches(decoder, plan, cfg, layers, ids_col, writer, storage, resume_row, progress)
    _complete_part(root, out, rank, world, group, attrs, stats, errors, plan)
    elapsed = time.perf_counter() - t_start
    return ExtractReport(out, counts["samples"], counts["skipped"], dict(skip_reasons), counts["truncated"], total,
                         elapsed, fwd, resume_row, "complete")


def _check_request(decoder: Decoder, samples, root: Path, cfg: ExtractConfig,
                   world: int) -> tuple[pa.Table, list[int], int, int]:
    """Pre-flight checks, before anything is written: a distributed run does not reuse a
    single-process cache's ``--out``, the samples load, ``--site``/``--targets``/``--sink`` are
    valid, and the shard rows are a multiple of the chunk rows.

    Returns the samples table, the layers, and the chunk and shard sizes in rows.
    """
    if world > 1 and (root / "zarr.json").exists():
        raise CacheError(f"{root} holds a single-process cache; a {world}-rank extraction needs another --out")
    table = samples if isinstance(samples, pa.Table) else read_samples(samples)
    if cfg.site not in ("mlp", "block"):
        raise CacheError(f"--site must be 'mlp' or 'block', not {cfg.site!r}")
    if cfg.targets not in TARGETS:
        raise CacheError(f"--targets must be one of {', '.join(TARGETS)}, not {cfg.targets!r}")
    if cfg.sink < 0:
        raise CacheError(f"--sink must be >= 0, not {cfg.sink}")
    layers = parse_layers(cfg.layers, decoder.layers.num_layers)
    hidden = decoder.layers.hidden_size
    chunk = cfg.chunk_rows or default_chunk_rows(hidden, cfg.dtype)
    shard = cfg.shard_rows or chunk * cfg.chunks_per_shard
    if shard % chunk:
        raise CacheError(f"shard rows ({shard}) must be a multiple of chunk rows ({chunk})")
    return table, layers, chunk, shard


def _same_model_dtype(attrs: dict, decoder: Decoder, where: Path) -> None:
    """A cache's deltas come from one decoder precision: refuse to resume, or to call complete, a
    cache whose recorded ``extraction.model_dtype`` is not the loaded decoder's (the default is bf16
    on some hardware and float32 on other, so an old float32 cache meets a bf16 run)."""
    had = (attrs.get("extraction") or {}).get("model_dtype")
    now = str(decoder.dtype).removeprefix("torch.")
    if had is not None and had != now:
        raise CacheError(f"{where} was extracted with the decoder in {had}, the decoder is loaded in {now}; "
                         f"pass --model-dtype {had} to continue or reuse it, or use another --out")


def _finalized_report(root: Path, settings: dict, overwrite: bool,
                      decoder: Decoder | None = None) -> ExtractReport | None:
    """Refuse or report a finalized cache (one with a manifest) at ``root``.

    Finalized caches are immutable: different settings, or ``overwrite``, are refused; the same
    settings give the "already complete" report. None when ``root`` is not finalized.
    """
    if not (root / MANIFEST).exists():
        return None
    from kcache.cache import Cache

    done = Cache.open(root)
    diffs = settings_differences(done.settings, settings, ignore=("name",))
    if diffs:
        raise CacheError(f"{root} holds a finalized cache made with different settings (cache vs asked: "
                         f"{'; '.join(diffs)}); finalized caches are immutable: use another --out")
    if decoder is not None and not overwrite:
        _same_model_dtype(done.attrs, decoder, root)
    if overwrite:
        refuse_if_finalized(root, "overwrite it")
    c = done.attrs["counts"]
    return ExtractReport(root, c["samples"], c["skipped"], c.get("skip_reasons", {}), c["truncated"], c["input_tokens"],
                         0.0, 0.0, 0, "already complete")


def _rank_plan(decoder: Decoder, table: pa.Table, samples, cfg: ExtractConfig, rank: int, world: int) -> Plan:
    """The batch plan for ``cfg`` (refused when too few samples are usable), cut to this rank's
    contiguous, cost-balanced run of batches when ``world > 1``."""
    full = make_plan(decoder.tokenizer, table, cfg)
    require_usable(len(full.encoded), table.num_rows, full.skipped,
                   "samples" if isinstance(samples, pa.Table) else str(samples))
    if world == 1:
        return full
    lo, hi = rank_batches(batch_costs(full), world)[rank]
    return sub_plan(full, lo, hi, keep_skipped=rank == 0)


def _existing_part(out: Path, settings: dict, overwrite: bool) -> dict | None:
    """Resume/refuse logic for a non-empty ``out``: with ``overwrite`` it is deleted; otherwise it
    must be a kcache cache made with the same settings, or it is refused.

    Returns that cache's attributes, or None when there is nothing to resume (``out`` is
    missing, empty, or was just deleted).
    """
    if not (out.exists() and any(out.iterdir())):
        return None
    if overwrite:
        shutil.rmtree(out)
        return None
    try:
        existing = zarr.open_group(str(out), mode="r").attrs.get(ATTRS_KEY)
    except Exception:  # noqa: BLE001
        existing = None
    if not isinstance(existing, dict) or existing.get("format") != FORMAT:
        raise CacheError(f"{out} exists and is not a kcache cache; choose another --out or pass --overwrite")
    diffs = settings_differences(existing.get("settings", {}), settings, ignore=("name",))
    if diffs:
        raise CacheError(f"{out} holds a cache made with different settings (cache vs asked: {'; '.join(diffs)}); "
                         "use another --out or pass --overwrite")
    return existing


def _finish_completed_part(root: Path, out: Path, rank: int, world: int, existing: dict) -> ExtractReport:
    """A part killed between completing and finalizing: only the manifest is missing, so
    finalize it and report it as already complete."""
    _finish(root, rank, world, existing)
    counts = existing["counts"]
    return ExtractReport(out, counts["samples"], counts["skipped"], counts.get("skip_reasons", {}), counts["truncated"],
                         counts["input_tokens"], 0.0, 0.0, 0, "already complete")


def _resume_point(out: Path, existing: dict, cfg: ExtractConfig) -> tuple[int, int]:
    """Where an interrupted extraction resumes: the rows of its last commit, and the token budget
    it was planned with (so the batches, and hence the recomputed rows, are bit-identical)."""
    commit = read_last_commit(out)
    resume_row = commit["rows"] if commit else 0
    return resume_row, existing.get("extraction", {}).get("token_budget", cfg.token_budget)


def _counts(plan: Plan, total: int) -> tuple[dict, Counter]:
    """The sample and token counts recorded in the cache (this part's share when several ranks
    write), and the skip reasons by kind."""
    skip_reasons = Counter(_reason_kind(r) for _, r in plan.skipped)
    counts = {
        "samples_in": len(plan.encoded) + len(plan.skipped),  # this part's share when several ranks write
        "samples": len(plan.encoded),
        "skipped": len(plan.skipped),
        "skip_reasons": dict(skip_reasons),
        "truncated": sum(e.truncated for e in plan.encoded),
        "input_tokens": total,
        "encoder_tokens": int(sum(len(e.k_ids) + len(e.x_ids) for e in plan.encoded)),
        "loss_tokens": 0,
        "target_tokens": int(sum(sum(e.target_mask) for e in plan.encoded)),
    }
    return counts, skip_reasons


def _create_part(decoder: Decoder, out: Path, table: pa.Table, ids_col: list, settings: dict, counts: dict,
                 cfg: ExtractConfig, plan: Plan, rank: int, world: int):
    """Write everything that does not need the model's forward passes: attributes, the row index,
    the skipped samples, token ids and offsets, loss and target masks, and the embedding matrix.

    Fills ``counts["loss_tokens"]`` (``counts`` is the attributes' counts). Returns the zarr group
    and its attributes.
    """
    attrs = _initial_attrs(decoder, settings, counts, cfg, plan)
    if world > 1:
        attrs["extraction"]["rank"] = {"rank": rank, "world": world}
    tables = _part_tables(decoder, table, ids_col, cfg, plan)
    attrs["counts"]["loss_tokens"] = int(tables[4].sum())
    # Converted from the model's dtype directly: a float32 copy of the matrix first costs more than the rest.
    emb = decoder.layers.embed_tokens().weight.detach()
    group = create_cache(out, attrs, *tables, encode_rows(emb, cfg.dtype, "embedding matrix"))
    return group, attrs


def _part_tables(decoder: Decoder, table: pa.Table, ids_col: list, cfg: ExtractConfig, plan: Plan) -> tuple:
    """What a part stores besides its deltas and embeddings, from the plan alone:
    (index, skipped, token ids, token offsets, loss mask, target mask)."""
    tok_lens = np.array([len(e.k_ids) + len(e.x_ids) for e in plan.encoded], dtype=np.int64)
    tok_off = np.concatenate([[0], np.cumsum(tok_lens)]).astype(np.int64)
    token_ids = np.array([t for e in plan.encoded for t in e.k_ids + e.x_ids], dtype=np.int32)
    bos = decoder.tokenizer.bos_token_id if adds_bos(decoder.tokenizer) else None
    def skips_bos(e) -> bool:
        return cfg.skip_bos and bos is not None and e.x_ids[0] == bos

    lmask = np.array([m for e in plan.encoded for m in loss_mask(len(e.x_ids), skips_bos(e), cfg.sink)], dtype=bool)
    tmask = np.array([m for e in plan.encoded for m in e.target_mask], dtype=bool)
    index = pa.table({
        "sample_id": [ids_col[r] for r in plan.order],
        "dataset": [table["dataset"][r].as_py() for r in plan.order],
        "split": [table["split"][r].as_py() for r in plan.order],
        "source_row": pa.array(plan.order, pa.int64()),
        "row_offset": pa.array(plan.row_offsets[:-1], pa.int64()),
        "x_len": pa.array(plan.x_lens, pa.int32()),
        "k_len": pa.array([len(e.k_ids) for e in plan.encoded], pa.int32()),
        "tok_offset": pa.array(tok_off[:-1], pa.int64()),
        "truncated": [e.truncated for e in plan.encoded],
        "knowledge_tokens_dropped": pa.array([e.knowledge_tokens_dropped for e in plan.encoded], pa.int32()),
    })
    skipped = pa.table({
        "sample_id": [ids_col[r] for r, _ in plan.skipped],
        "source_row": pa.array([r for r, _ in plan.skipped], pa.int64()),
        "reason": [reason for _, reason in plan.skipped],
    })
    return index, skipped, token_ids, tok_off, lmask, tmask


def _open_writer(out: Path, group, layers: list[int], cfg: ExtractConfig, shard: int, total: int,
                 resume_row: int, x_lens, storage: dict | None, device: torch.device):
    """The delta writer (in the background unless the CPU has no core to spare: ``write_in_background``),
    with the running statistics (and, for lossy storage, the error accumulator) restored from the
    last commit when resuming.

    Returns (writer, stats, errors); errors is None for lossless storage.
    """
    positions = np.minimum(np.concatenate([np.arange(n) for n in x_lens]) if len(x_lens) else np.zeros(0),
                           255).astype(np.uint8)
    commit = read_last_commit(out)
    stats = RunningStats(layers, commit["stats"] if commit and resume_row else None)
    errors = ErrorAccumulator(layers, commit.get("errors") if commit and resume_row else None) if storage else None
    writer = DeltaWriter(out, group, layers, cfg.dtype, shard, total, resume_row, positions, stats, storage=storage,
                         errors=errors, background=write_in_background(device))
    return writer, stats, errors


def write_in_background(device: torch.device) -> bool:
    """Whether the delta writer gets its own thread: on an accelerator, or when the CPU has a core
    that no torch thread uses (``DeltaWriter``)."""
    from kcache.runtime import available_cores

    return torch.device(device).type != "cpu" or available_cores() > torch.get_num_threads()


def _extract_batches(decoder: Decoder, plan: Plan, cfg: ExtractConfig, layers: list[int], ids_col: list, writer,
                     storage: dict | None, resume_row: int, progress: bool) -> float:
    """The loop: run every batch that still has rows past ``resume_row`` through the decoder and
    hand its deltas to ``writer``, which is closed at the end (also on error).

    Returns the seconds spent in forward passes.
    """
    row_off = plan.row_offsets
    # first batch that still has rows past the last commit
    first_batch = next((bi for bi, b in enumerate(plan.batches) if row_off[b[-1] + 1] > resume_row), len(plan.batches))
    todo = plan.batches[first_batch:]
    fwd = 0.0
    # The bar counts pass-B tokens (knowledge + input), what a batch's time grows with, so its ETA holds.
    cost = [sum(len(plan.encoded[i].k_ids) + len(plan.encoded[i].x_ids) for i in b) for b in todo]
    bar = tqdm(total=sum(cost), unit="tok", desc="extract (pass-B tokens)", disable=not progress, dynamic_ncols=True)
    try:
        for bi, b in enumerate(todo):
            t0 = time.perf_counter()
            deltas = batch_deltas(decoder, [plan.encoded[i] for i in b], cfg.site, layers, cfg.targets, cfg.sink,
                                  cfg.distill())
            what = f"deltas of samples {[ids_col[plan.order[i]] for i in b][:3]}"
            if storage:
                # Lossy: the writer quantizes whole shards and measures the error against these.
                rows = {l: encode_rows(d, "float32", f"layer {l} {what}") for l, d in deltas.items()}
            else:
                rows = {l: encode_rows(d, cfg.dtype, f"layer {l} {what}") for l, d in deltas.items()}
            fwd += time.perf_counter() - t0
            writer.put(int(row_off[b[0]]), rows)
            bar.update(cost[bi])
    finally:
        bar.close()
        writer.close()
    return fwd


def _complete_part(root: Path, out: Path, rank: int, world: int, group, attrs: dict, stats, errors, plan: Plan) -> None:
    """Record the finish time, mark the part complete (``_mark_complete``) and finalize (``_finish``)."""
    attrs["finished"] = now()
    _mark_complete(out, group, attrs, stats, errors, plan)
    _finish(root, rank, world, attrs)


def _mark_complete(out: Path, group, attrs: dict, stats, errors, plan: Plan) -> None:
    """Record the statistics, the storage error (lossy storage) and the useful-token fraction,
    mark the part complete and write its card."""
    attrs["stats"] = stats.summary()
    if errors is not None:
        # Sums kept beside the figures so parts can be pooled (kcache.cache.reader.combine_errors).
        sums = errors.state()
        attrs["storage_error"] = {l: {**e, "sse": sums[l]["sse"],
                                      "ssr": sums[l]["ssr"]} for l, e in errors.summary().items()}
    attrs["status"] = "complete"
    attrs["extraction"] = {**attrs.get("extraction", {}), "useful_token_fraction": useful_fraction(plan)}
    group.attrs[ATTRS_KEY] = attrs
    write_card(out, attrs)


def _finish(root: Path, rank: int, world: int, attrs: dict) -> None:
    """Digest the part(s) and write the manifest (rank 0, after every rank has digested its own)."""
    provenance = {"extracted": {"ranks": world, "kcache_version": __version__, "finished": attrs.get("finished")}}
    if world == 1:
        finalize(root, provenance=provenance)
        return
    from kcache import distributed

    write_part_record(root, part_name(rank, world), origin=f"rank {rank} of {world}")
    distributed.barrier()
    if rank == 0:
        finalize(root, [part_name(r, world) for r in range(world)], provenance=provenance)
    distributed.barrier()


def _initial_attrs(decoder: Decoder, settings: dict, counts: dict, cfg: ExtractConfig, plan: Plan) -> dict:
    cfg_dict = {k: v for k, v in decoder.model.config.to_dict().items()
                if isinstance(v, (int, float, str, bool, type(None)))}
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "kcache_version": __version__,
        "status": "extracting",
        "created": now(),
        "finished": None,
        "settings": settings,
        "model_config": cfg_dict,
        "hidden_size": decoder.layers.hidden_size,
        "vocab_size": int(decoder.layers.embed_tokens().weight.shape[0]),
        "num_model_layers": decoder.layers.num_layers,
        "extraction": {"token_budget": cfg.token_budget, "batches": len(plan.batches), "torch": torch.__version__,
                       "model_dtype": str(decoder.dtype).replace("torch.", ""), "device": str(decoder.device),
                       "threads": torch.get_num_threads()},
        "counts": counts,
        "stats": {},
    }


def settings_json(attrs: dict) -> str:
    return json.dumps(attrs["settings"], indent=2, sort_keys=True)
