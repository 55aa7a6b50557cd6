"""KnowLA (Luo et al., 2024): a knowledgeable adaptation layer trained together with LoRA.

After each chosen decoder block ``l`` the block output ``h`` (B, T, H) is changed on the
subtokens of words linked to KG entities:

1. ``hn = RMSNorm(h)`` (a learnable RMSNorm, matching the decoder's pre-norm convention).
2. Each linked word ``w`` (tokens ``[start, end)``) gets the query ``q_w = mean(hn[start:end])``.
3. Its ``<= k`` candidate entity vectors ``e_1..e_k`` (frozen KG embeddings, dim ``d``) and a
   learned "no knowledge" sentinel ``e_0`` are mapped to the hidden size by a SwiGLU MLP:
   ``m_i = W_down(silu(W_gate e_i) * W_up e_i)``.
4. ``a = softmax_i(m_i . q_w)`` over the slots; padded slots (entity id -1, or an entity with no
   vector) get weight exactly 0; the sentinel is never masked, so a word may take "nothing".
5. ``k_w = sum_i a_i m_i`` (``value="mapped"``, the default; ``value="raw"`` sums the raw KG
   vectors ``e_i`` instead, as the reference code does).
6. ``h'[t] = h[t] + gate * silu(W_f [hn[t]; k_w])`` for every subtoken ``t`` of ``w``; all other
   positions are unchanged. ``gate`` is a learnable scalar initialised to 0.5.

Everything is batched: words are a padded (B, W) axis, and a (B, W, T) membership matrix pools
subtokens into queries and scatters knowledge back, with no Python loop over examples.

The layer lives *outside* the model and acts through forward hooks on the block outputs, so it
composes with PEFT's LoRA (``q/k/v/o_proj``, r=16, alpha=16, the paper's setting) and with
``generate()``. The links of the current batch are set with ``with knowla.use(link_batch):``.
Positions are absolute: a pre-hook on the backbone records how many tokens the KV cache
already holds, so chunk ``[past, past + T)`` only injects into words lying wholly inside it. A
single-token chunk (a decode step) is skipped outright, as in the reference implementation:
the prompt gets its knowledge at prefill, the generated tokens see it through the cache.

**Token spans.** A links table (``kcache kg link``) counts the tokens of the *linked text*
(``source``) encoded with ``add_special_tokens=False``. In the model input ``k_ids + x_ids``
the source starts after the knowledge prefix and the BOS the tokenizer adds (if any):
``Example.source_offset = len(k_ids) + bos``, and every span is shifted by it (minus one when
the links were made with ``--add-special-tokens``, whose spans already count the BOS). The
shift is checked: the source's own tokens must reappear at that offset; links past the first
mismatching token (a BPE merge across the source/target boundary) are dropped and counted. For
left-padded batches (``generate``), add each row's number of pad tokens to its offset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from kcache.align import TemplateSpec, adds_bos
from kcache.methods import baselines as B
from kcache.models import Decoder, LayerAdapter, ModelError

CONFIG_FILE = "kcache-method.json"
KNOWLA_WEIGHTS = "knowla.safetensors"


# ---------------------------------------------------------------------------------------------
# the adaptation layer


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the knowledge mapping from the KG space to the LLM's."""

    def __init__(self, d_in: int, d_mid: int, d_out: int):
        super().__init__()
        self.gate = nn.Linear(d_in, d_mid, bias=False)
        self.up = nn.Linear(d_in, d_mid, bias=False)
        self.down = nn.Linear(d_mid, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


@dataclasses.dataclass
class LinkBatch:
    """Entity links of a batch, aligned to model input positions.

    ``spans`` (B, W, 2) long: ``[start, end)`` token positions of each linked word (padding
    words: ``start == end == 0``). ``entity_ids`` (B, W, k) long: candidates, -1 = empty slot.
    """

    spans: torch.Tensor
    entity_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.spans.shape[0]

    def to(self, device) -> LinkBatch:
        return LinkBatch(self.spans.to(device), self.entity_ids.to(device))

    def expand(self, batch: int) -> LinkBatch:
        """Repeat each row ``batch // B`` times (``generate`` with beams / several sequences)."""
        if batch == self.batch_size:
            return self
        if batch % self.batch_size:
            raise ValueError(f"links for {self.batch_size} rows cannot serve a batch of {batch}")
        r = batch // self.batch_size
        return LinkBatch(self.spans.repeat_interleave(r, 0), self.entity_ids.repeat_interleave(r, 0))


def collate_links(rows: Sequence[tuple[Any, Any] | None], k: int, device: torch.device | str = "cpu") -> LinkBatch:
    """Pad per-example links into a :class:`LinkBatch`.

    ``rows[i]`` is ``(spans (n, 2), entity_ids (n, k))`` already in model-input positions (see
    :meth:`LinkIndex.for_example` for the shift), or ``None`` for an example without links.
    """
    W = max([1] + [len(r[0]) for r in rows if r is not None])
    spans = torch.zeros((len(rows), W, 2), dtype=torch.long)
    ids = torch.full((len(rows), W, k), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r is None or len(r[0]) == 0:
            continue
        n = len(r[0])
        spans[i, :n] = torch.as_tensor(np.asarray(r[0]), dtype=torch.long).view(n, 2)
        ids[i, :n] = torch.as_tensor(np.asarray(r[1]), dtype=torch.long).view(n, k)
    return LinkBatch(spans.to(device), ids.to(device))


class KnowLALayer(nn.Module):
    """One adaptation layer (see the module docstring for the equations)."""

    def __init__(self, hidden_size: int, kg_dim: int, intermediate_size: int = 1024, gate_init: float = 0.5,
                 value: str = "mapped", eps: float = 1e-6):
        super().__init__()
        if value not in ("mapped", "raw"):
            raise ValueError(f"value must be 'mapped' or 'raw', not {value!r}")
        self.value = value
        self.norm = RMSNorm(hidden_size, eps)
        self.sentinel = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, kg_dim)))
        self.mapping = SwiGLU(kg_dim, intermediate_size, hidden_size)
        self.fuse = nn.Linear(hidden_size + (hidden_size if value == "mapped" else kg_dim), hidden_size)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def attention(self, hn: torch.Tensor, member: torch.Tensor, entity_ids: torch.Tensor, table: torch.Tensor,
                  has_vector: torch.Tensor):
        """Queries, slot weights ``(B, W, k+1)`` (slot 0..k-1 entities, slot k the sentinel), values."""
        m = member.to(hn.dtype)
        query = (m @ hn) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, W, H): mean of the word's subtokens
        n = table.shape[0]
        ids = entity_ids.clamp(0, max(n - 1, 0))
        valid = (entity_ids >= 0) & (entity_ids < n) & has_vector[ids]  # (B, W, k)
        ent = table[ids].to(hn.dtype)  # (B, W, k, d)
        Bn, W, _, d = ent.shape
        ent = torch.cat([ent, self.sentinel.to(hn.dtype).expand(Bn, W, 1, d)], dim=2)  # (B, W, k+1, d)
        mapped = self.mapping(ent)  # (B, W, k+1, H)
        logits = (mapped * query.unsqueeze(2)).sum(-1)  # (B, W, k+1)
        slot_ok = torch.cat([valid, valid.new_ones(Bn, W, 1)], dim=2)
        weights = torch.softmax(logits.masked_fill(~slot_ok, float("-inf")), dim=-1)
        return weights, (mapped if self.value == "mapped" else ent)

    def forward(self, h: torch.Tensor, links: LinkBatch, positions: torch.Tensor, table: torch.Tensor,
                has_vector: torch.Tensor) -> torch.Tensor:
        """``h`` (B, T, H) at absolute ``positions`` (T,) -> ``h`` plus gated knowledge on linked subtokens."""
        dt = self.gate.dtype
        x = h.to(dt)
        hn = self.norm(x)
        start, end = links.spans[..., 0], links.spans[..., 1]  # (B, W)
        inside = (end > start) & (start >= positions[0]) & (end <= positions[-1] + 1)  # whole word in this chunk
        # (B, W, T)
        member = (positions >= start.unsqueeze(-1)) & (positions < end.unsqueeze(-1)) & inside.unsqueeze(-1)
        weights, values = self.attention(hn, member, links.entity_ids, table, has_vector)
        knowledge = (weights.unsqueeze(-1) * values).sum(2)  # (B, W, Hv)
        m = member.to(dt).transpose(1, 2)  # (B, T, W)
        cover = m.sum(-1, keepdim=True)  # words covering each token (0 or 1 unless spans overlap)
        tok_k = (m @ knowledge) / cover.clamp(min=1)  # (B, T, Hv)
        fused = nn.functional.silu(self.fuse(torch.cat([hn, tok_k], dim=-1)))
        delta = self.gate * fused * (cover > 0).to(dt)
        return h + delta.to(h.dtype)


# ---------------------------------------------------------------------------------------------
# the adapter: entity table + layers + hooks


class KnowLA(nn.Module):
    """Adaptation layers after blocks ``layers`` sharing one frozen entity table.

    ``vectors`` (n_entities, d): row ``i`` = entity ``i`` (``kcache.kg.tables.embedding_matrix``);
    ``has_vector`` marks rows that have one. The table is a non-persistent buffer: saved adapters
    hold only the trained parameters.
    """

    def __init__(self, vectors: torch.Tensor, hidden_size: int, layers: Sequence[int], *,
                 has_vector: torch.Tensor | None = None,
                 intermediate_size: int = 1024, gate_init: float = 0.5, value: str = "mapped", eps: float = 1e-6):
        super().__init__()
        self.layer_ids = sorted(int(l) for l in layers)
        if not self.layer_ids:
            raise ValueError("KnowLA needs at least one layer")
        self.register_buffer("table", vectors, persistent=False)
        hv = torch.ones(vectors.shape[0], dtype=torch.bool) if has_vector is None else has_vector.bool()
        self.register_buffer("has_vector", hv, persistent=False)
        self.layers = nn.ModuleDict({str(l): KnowLALayer(hidden_size, vectors.shape[1], intermediate_size, gate_init,
                                                         value, eps) for l in self.layer_ids})
        self.settings = {"layers": self.layer_ids, "hidden_size": hidden_size, "kg_dim": int(vectors.shape[1]),
                         "intermediate_size": intermediate_size, "gate_init": gate_init, "value": value, "eps": eps}
        self._links: LinkBatch | None = None
        self._past = 0
        self._handles: list = []

    # -- links ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, links: LinkBatch | None):
        """Inject ``links`` in every forward (and ``generate``) inside the block."""
        prev = self._links
        self._links = None if links is None else links.to(self.table.device)
        try:
            yield self
        finally:
            self._links = prev

    # -- hooks ----------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> KnowLA:
        """Register the hooks on ``model`` (a transformers model or a ``PeftModel`` over one)."""
        self.detach()
        adapter = LayerAdapter(B._unwrap(model))
        bad = [l for l in self.layer_ids if not 0 <= l < adapter.num_layers]
        if bad:
            raise ModelError(f"KnowLA layer {bad[0]} out of range: this model has layers 0..{adapter.num_layers - 1}")
        if adapter.hidden_size != self.settings["hidden_size"]:
            raise ModelError(f"KnowLA was built for hidden size {self.settings['hidden_size']}, "
                             f"the model has {adapter.hidden_size}")
        self._handles.append(adapter.backbone().register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for l in self.layer_ids:
            self._handles.append(adapter.block(l).register_forward_hook(self._make_hook(self.layers[str(l)])))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_hook(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        self._past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0

    def _make_hook(self, layer: KnowLALayer):
        def hook(module, args, output):
            if self._links is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            if h.shape[1] == 1:  # a decode step: the reference skips injection here
                return None
            links = self._links.expand(h.shape[0])
            positions = torch.arange(self._past, self._past + h.shape[1], device=h.device)
            new = layer(h, links, positions, self.table, self.has_vector)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook


def random_embeddings(table: pa.Table, seed: int = 0) -> pa.Table:
    """An embeddings table of the same KG, ids and shape with Gaussian vectors that match the
    per-dimension mean and standard deviation of ``table`` (the "random entity vectors" ablation)."""
    from kcache.kg.tables import (
        META_KG_FINGERPRINT,
        META_KG_NAME,
        _meta,
        embedding_info,
        embeddings_table,
        embeddings_to_numpy,
    )

    ids, vec = embeddings_to_numpy(table)
    rng = np.random.default_rng(seed)
    rand = rng.standard_normal(vec.shape).astype(np.float32) * vec.std(0, keepdims=True) + vec.mean(0, keepdims=True)
    meta = _meta(table)
    info = embedding_info(table)
    return embeddings_table(rand.astype(np.float32), kg_name=meta[META_KG_NAME],
                            kg_fingerprint=meta[META_KG_FINGERPRINT],
                            model="random", source=f"random(seed={seed}) like {info['model']}",
                            params={"seed": seed, "like": info["model"]}, entity_ids=ids)


# ---------------------------------------------------------------------------------------------
# links table -> per-example spans


class LinkIndex:
    """A links table (``schemas/kg-links-v1.json``) grouped by ``sample_id``."""

    def __init__(self, links: pa.Table):
        from kcache.kg.tables import _meta

        self.meta = _meta(links)
        self.k = links.schema.field("entity_ids").type.list_size
        self.with_specials = json.loads(self.meta.get("kcache.link.add_special_tokens", "false"))
        sid = links["sample_id"].to_pylist()
        spans = np.stack([links["token_start"].to_numpy(), links["token_end"].to_numpy()],
                         axis=1) if links.num_rows else np.zeros((0, 2), np.int64)
        col = links["entity_ids"].combine_chunks()
        ids = col.flatten().to_numpy().reshape(-1, self.k) if links.num_rows else np.zeros((0, self.k), np.int64)
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        order: dict[str, list[int]] = {}
        for i, s in enumerate(sid):
            order.setdefault(s, []).append(i)
        for s, rows in order.items():
            self.rows[s] = (spans[rows], ids[rows])
        self.dropped = 0  # links dropped for misalignment (see for_example)

    def check_tokenizer(self, tokenizer) -> None:
        from kcache.kg.link import tokenizer_fingerprint
        from kcache.kg.tables import KGError

        want = self.meta.get("kcache.link.tokenizer_fingerprint")
        if want and want != tokenizer_fingerprint(tokenizer):
            raise KGError(f"the links were made with tokenizer {self.meta.get('kcache.link.tokenizer', '?')!r}, "
                          "which is not this model's; re-link with --tokenizer set to the model")

    def for_example(self, sample_id: str, input_ids: Sequence[int], offset: int, source_ids: Sequence[int],
                    bos: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """Links of ``sample_id`` shifted to positions in ``input_ids``.

        ``offset``: index of the source's first token in ``input_ids`` (``Example.source_offset``,
        plus left padding); ``source_ids``: ``tokenizer(source, add_special_tokens=False)``;
        ``bos``: 1 when the links count a BOS (``--add-special-tokens``) the tokenizer adds.
        Links reaching past the first source token that does not reappear at ``offset`` are dropped.
        """
        found = self.rows.get(sample_id)
        if found is None:
            return None
        spans, ids = found
        got = list(input_ids[offset : offset + len(source_ids)])
        ok = next((i for i, (a, b) in enumerate(zip(got, source_ids)) if a != b), min(len(got), len(source_ids)))
        spans = spans - (bos if self.with_specials else 0)
        keep = spans[:, 1] <= ok
        self.dropped += int((~keep).sum())
        return spans[keep] + offset, ids[keep]


class LinkFeeder:
    """``prepare`` callback for :func:`kcache.methods.baselines.train_loop` / ``multiple_choice_scores``:
    builds each batch's :class:`LinkBatch` from the examples and enters ``knowla.use`` with it."""

    def __init__(self, knowla: KnowLA, tokenizer, records: Sequence[dict], index: LinkIndex):
        self.knowla, self.index, self.records = knowla, index, records
        self.tokenizer = tokenizer
        self.bos = int(adds_bos(tokenizer))
        self._src: dict[int, list[int]] = {}

    def links(self, examples: Sequence[B.Example]) -> LinkBatch:
        rows = []
        for ex in examples:
            if ex.row not in self._src:
                self._src[ex.row] = self.tokenizer(self.records[ex.row]["source"],
                                                   add_special_tokens=False)["input_ids"]
            rows.append(self.index.for_example(str(self.records[ex.row]["id"]), ex.input_ids, ex.source_offset,
                                               self._src[ex.row], self.bos))
        return collate_links(rows, self.index.k, self.knowla.table.device)

    def __call__(self, examples: Sequence[B.Example]):
        return self.knowla.use(self.links(examples))


# ---------------------------------------------------------------------------------------------
# train / save / load / evaluate


def load_entity_table(embeddings: Any, links: pa.Table | None = None) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """``(embeddings table, dense vectors, has_vector)``; refuses links of another KG."""
    from kcache.kg.tables import check_compatible, embedding_matrix, embeddings_to_numpy, read_embeddings

    table = embeddings if isinstance(embeddings, pa.Table) else read_embeddings(embeddings)
    if links is not None:
        check_compatible(links, table, what=("links", "embeddings"))
    ids, _ = embeddings_to_numpy(table)
    n = int(ids[-1]) + 1 if len(ids) else 0
    vectors, has = embedding_matrix(table, n)
    return table, vectors, has


def _links_table(links: Any) -> pa.Table:
    if isinstance(links, pa.Table):
        return links
    from kcache.kg.link import read_links

    return read_links(links)


def _kg_record(emb_t, links_t, index: LinkIndex) -> dict:
    """The KG half of a KnowLA method config: which graph, embeddings and links it was trained with."""
    from kcache.kg.tables import _meta, embedding_info

    info = embedding_info(emb_t)
    return {"name": info["kg_name"], "fingerprint": info["kg_fingerprint"], "embedding_model": info["model"],
            "embedding_dim": info["dim"], "embedding_source": info["source"], "embedding_rows": info["rows"],
            "link_k": index.k, "link_tokenizer_fingerprint": _meta(links_t).get("kcache.link.tokenizer_fingerprint")}


def train_knowla(
    decoder: Decoder,
    samples: Any,
    links: Any,
    embeddings: Any,
    out_dir: str | os.PathLike,
    *,
    layers: Sequence[int] | None = None,
    steps: int | None = None,
    epochs: float = 1.0,
    lr: float = 3e-4,
    batch_size: int = 8,
    seed: int = 0,
    lora: bool = True,
    lora_r: int = 16,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    targets: Sequence[str] = B.DEFAULT_TARGETS,
    intermediate_size: int = 1024,
    gate_init: float = 0.5,
    value: str = "mapped",
    template: TemplateSpec = TemplateSpec(),
    max_length: int = 1024,
    warmup: float = 0.1,
    split: str | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> B.TrainResult:
    """Train KnowLA (+ LoRA unless ``lora=False``) on ``D(K, x) -> target``, decoder frozen.

    ``links``: links table or file over the samples' ``source``; ``embeddings``: an embeddings
    table or file of the same KG. ``layers`` defaults to the middle block (``num_layers // 2``).
    Saves ``adapter/`` (LoRA), ``knowla.safetensors`` and ``kcache-method.json``. The returned
    result's ``model`` is the model to call; ``result.knowla`` the attached adapter.
    """
    records = B._records(samples)
    if split is not None:
        records = [r for r in records if r.get("split") == split]
    links_t = _links_table(links)
    index = LinkIndex(links_t)
    index.check_tokenizer(decoder.tokenizer)
    emb_t, vectors, has = load_entity_table(embeddings, links_t)
    if B._has_adapters(decoder.model):
        raise ModelError("this decoder already carries PEFT adapters; load a fresh decoder for each run")
    nl = decoder.layers.num_layers
    layers = [nl // 2] if layers is None else list(layers)
    torch.manual_seed(seed)
    knowla = KnowLA(vectors, decoder.layers.hidden_size, layers, has_vector=has, intermediate_size=intermediate_size,
                    gate_init=gate_init, value=value)
    knowla.to(decoder.device)
    model = decoder.model
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, B.lora_config("lora", rank=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                                                    targets=targets, layers=None, kasa_beta=0, kasa_gamma=0))
    knowla.attach(model)
    examples, skipped = B.encode_examples(decoder.tokenizer, records, template, max_length)
    feeder = LinkFeeder(knowla, decoder.tokenizer, records, index)
    params = [p for p in model.parameters() if p.requires_grad] + list(knowla.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_knowla = sum(p.numel() for p in knowla.parameters())
    total = B.count_parameters(model)[1]
    log(f"knowla: {n_knowla:,} adaptation + {n_lora:,} LoRA trainable parameters; decoder {total - n_lora:,} frozen; "
        f"layers {layers}; {len(examples)} samples ({skipped} skipped), "
        f"{sum(len(index.rows[str(r['id'])][0]) for r in records if str(r['id']) in index.rows)} links")
    knowla.train()
    try:
        history = B.train_loop(model, examples, params, pad=B.pad_id(decoder.tokenizer), steps=steps, epochs=epochs,
                               lr=lr, batch_size=batch_size,
                               seed=seed, warmup=warmup, prepare=feeder, log_every=log_every, log=log)
    finally:
        knowla.eval()
    for p in params:
        p.requires_grad_(False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in knowla.state_dict().items()}, str(out / KNOWLA_WEIGHTS))
    if lora:
        model.save_pretrained(str(out / B.ADAPTER_DIR), safe_serialization=True)
    cfg = {
        "format": "kcache-method", "version": 1, "method": "knowla",
        "model": decoder.fingerprint.to_dict(),
        "knowla": knowla.settings,
        "lora": {"rank": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(targets),
                 "layers": None} if lora else None,
        "kg": _kg_record(emb_t, links_t, index),
        "train": {"samples": len(records), "used": len(examples), "skipped": skipped, "steps": steps, "epochs": epochs,
                  "lr": lr, "batch_size": batch_size, "seed": seed, "warmup": warmup, "max_length": max_length,
                  "split": split, "template": dataclasses.asdict(template), "links_dropped_misaligned": index.dropped},
        "trainable_params": n_lora + n_knowla, "knowla_params": n_knowla, "lora_params": n_lora,
        "total_params": total + n_knowla, "history": history, "final_loss": history[-1]["task_loss"],
    }
    B.write_method_config(out / CONFIG_FILE, cfg)
    result = B.TrainResult(model, "knowla", out, cfg, history)
    result.knowla = knowla  # type: ignore[attr-defined]
    return result


def load_knowla(directory: str | os.PathLike, decoder: Decoder, embeddings: Any,
                strict: bool = True) -> tuple[nn.Module, KnowLA]:
    """Reload a :func:`train_knowla` run onto a fresh ``decoder``: ``(model, knowla)`` with the
    hooks attached. ``embeddings`` must be of the KG the run was trained with (checked)."""
    from safetensors.torch import load_file

    from kcache.kg.tables import check_compatible

    d = Path(directory)
    cfg = B.read_method_config(d)
    if cfg.get("method") != "knowla":
        raise ModelError(f"{d}: a {cfg.get('method')!r} run, not KnowLA (use kcache.methods.baselines.load_baseline)")
    if strict:
        B.check_fingerprint(cfg, decoder, str(d))
    emb_t, vectors, has = load_entity_table(embeddings)
    check_compatible(emb_t, cfg["kg"]["fingerprint"], what=("embeddings", f"the KG {d} was trained with"))
    from kcache.kg.tables import embedding_info

    info = embedding_info(emb_t)
    if strict and (info["model"], info["source"]) != (cfg["kg"]["embedding_model"], cfg["kg"]["embedding_source"]):
        raise ModelError(f"{d} was trained with {cfg['kg']['embedding_model']} vectors "
                         f"({cfg['kg']['embedding_source']}), these are {info['model']} ({info['source']}); "
                         "pass strict=False to use them anyway")
    s = cfg["knowla"]
    if vectors.shape[1] != s["kg_dim"]:
        raise ModelError(f"{d} was trained with {s['kg_dim']}-dim entity vectors, these have {vectors.shape[1]}")
    knowla = KnowLA(vectors, s["hidden_size"], s["layers"], has_vector=has, intermediate_size=s["intermediate_size"],
                    gate_init=s["gate_init"], value=s["value"], eps=s["eps"])
    knowla.load_state_dict(load_file(str(d / KNOWLA_WEIGHTS)))
    knowla.to(decoder.device).eval()
    model = decoder.model
    if cfg.get("lora"):
        from peft import PeftModel

        if B._has_adapters(model):
            raise ModelError("this decoder already carries PEFT adapters; load a fresh decoder")
        model = PeftModel.from_pretrained(model, str(d / B.ADAPTER_DIR)).eval()
    knowla.attach(model)
    return model, knowla


def multiple_choice_accuracy(model: nn.Module, knowla: KnowLA, tokenizer, samples: Any, links: Any, **kwargs: Any):
    """:func:`kcache.methods.baselines.multiple_choice_accuracy` with KnowLA injecting each sample's links."""
    records = B._records(samples)
    index = LinkIndex(_links_table(links))
    index.check_tokenizer(tokenizer)
    feeder = LinkFeeder(knowla, tokenizer, records, index)
    return B.multiple_choice_accuracy(model, tokenizer, records, prepare=feeder, **kwargs)
