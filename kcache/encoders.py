"""The knowledge encoder (DIEKÆ section 3.1) and encoder bundles on disk.

One encoder per injected decoder layer::

    decoder token embeddings (frozen, d_model)
      -> down-projection (d_model -> 128)
      -> 4 LLaMA blocks: x += attn(rmsnorm(x)); x += swiglu(rmsnorm(x))   (causal, RoPE)
      -> rmsnorm -> up-projection (128 -> d_model)

The up-projection starts at zero, so a fresh encoder injects nothing and its initial MSE is
the "predict zero" baseline. Its output at position ``|K| + j`` is the addition for input
position ``j`` (``kcache.align.shift_left``). Defaults: ≈2.10M parameters per encoder for
LLaMA2-7B (d_model 4096), ≈1.20M for SmolLM2-135M (d_model 576).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kcache import __version__

BUNDLE_FORMAT = "kcache-encoders"
BUNDLE_SCHEMA_VERSION = 1
WEIGHTS_FILE = "encoders.safetensors"
CONFIG_FILE = "config.json"


from kcache._io import read_json  # noqa: E402
from kcache.errors import KCacheError  # noqa: E402


class BundleError(KCacheError, ValueError):
    """An encoder bundle is missing, corrupt, or belongs to another model / cache."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    d_model: int  # the decoder's hidden size (input embeddings and output)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    def __post_init__(self):
        if self.num_layers < 1:  # as schemas/encoders-v1.json: the stacked pass assumes a last block
            raise ValueError(f"encoder num_layers must be >= 1, not {self.num_layers}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"encoder hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()  # the statistics in float32; the output in x's dtype (a bf16 stream stays bf16)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, L, dim) for rotary embedding at ``positions`` (B, L)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    ang = positions.float()[:, None, :, None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (LLaMA's rotate-half layout), in x's dtype as transformers' LLaMA does it
    (the tables are float32; a bf16 x is rotated in bf16). x: (B, H, L, D)."""
    d = x.shape[-1]
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Block(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.c = c
        h = c.hidden_size
        self.attn_norm, self.mlp_norm = RMSNorm(h, c.rms_eps), RMSNorm(h, c.rms_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.gate = nn.Linear(h, c.intermediate_size, bias=False)
        self.up = nn.Linear(h, c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, h, bias=False)

    def forward(self, x, rope_cs, mask, past=None):
        b, n, _ = x.shape
        c = self.c
        y = self.attn_norm(x)
        q, k, v = (p(y).view(b, n, c.num_heads, c.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        att = attend(q, k, v, mask)
        x = x + self.o(att.transpose(1, 2).reshape(b, n, -1))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y)), (k, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, ``mask`` True where a query may see a key. (B, H, L, D) in and out.

    ``scale``: the scores' factor (default ``D ** -0.5``; the stacked pass folds it into q's rotary
    tables and passes 1). ``bias``: on CPU, ``mask`` as an additive 0 / -inf tensor in q's dtype,
    made once per forward by the caller and shared by its blocks (``mask_bias``).

    On CPU the explicit product is used: for the encoders' short, narrow heads it is faster than
    SDPA's CPU flash kernel, whose bf16 backward is several times slower than its float32 one.
    The scores stay in q's dtype (the product's own output dtype); torch's CPU softmax computes in
    float32 inside and rounds once, so the probabilities equal a float32 softmax of those scores
    rounded to bf16, without two float32 copies of a (B, H, L, L) tensor. The bias is added in
    place: the sum's backward is the identity, where ``masked_fill`` costs a pass each way.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q if scale == 1 else q * scale) @ k.transpose(-1, -2)
    scores = scores.add_(mask_bias(mask, scores.dtype) if bias is None else bias)
    return scores.softmax(-1) @ v


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True = may attend) as an additive bias: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q_len, K) bool for SDPA: causal over the last ``q_len`` keys, padding keys masked.

    Query rows that see no valid key (padding queries) attend to themselves so SDPA never
    produces NaN; those rows are masked out downstream.
    """
    b, k_len = key_valid.shape
    qpos = torch.arange(k_len - q_len, k_len, device=key_valid.device)[None].expand(b, q_len)
    return attention_mask_at(key_valid, qpos)


def attention_mask_at(key_valid: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q, K) bool: query ``j`` of row ``i`` sits at key position ``qpos[i, j]`` and sees the
    valid keys at or before it. A query that would see no key sees its own position (never NaN)."""
    k_len = key_valid.shape[1]
    keys = torch.arange(k_len, device=key_valid.device)
    m = (keys[None, None, :] <= qpos[:, :, None]) & key_valid[:, None, :].bool()
    own = keys[None, None, :] == qpos[:, :, None]
    return (m | (own & ~m.any(-1, keepdim=True)))[:, None]


class KnowledgeEncoder(nn.Module):
    """One DIEKÆ encoder. Input: decoder token embeddings; output: additions in d_model."""

    def __init__(self, c: EncoderConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.c = c
        self.down_proj = nn.Linear(c.d_model, c.hidden_size, bias=False)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)
        self.up_proj = nn.Linear(c.hidden_size, c.d_model, bias=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.startswith("up_proj"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)

    def forward(self, embeds: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None, past=None,
                use_cache: bool = False, shifts: torch.Tensor | None = None, length: int | None = None):
        """embeds (B, L, d_model); valid (B, L_past + L) bool key mask; positions (B, L).

        Returns (B, L, d_model) and, with ``use_cache``, the per-block (k, v) for the next step.
        With ``shifts`` the output is already aligned to input positions,
        ``shift_left(out, shifts, length)``, and the up-projection only runs on those positions.
        """
        b, n, _ = embeds.shape
        past_len = past[0][0].shape[2] if past else 0
        if positions is None:
            positions = torch.arange(past_len, past_len + n, device=embeds.device)[None].expand(b, n)
        mask = attention_mask(valid, n)
        rope_cs = rope_tables(positions, self.c.head_dim, self.c.rope_theta)
        x = self.down_proj(embeds)
        new_past = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, rope_cs, mask, past[i] if past else None)
            new_past.append(kv)
        if shifts is not None:
            from kcache.align import shift_left

            x = shift_left(x, shifts, length)
        out = self.up_proj(self.norm(x))
        return (out, new_past) if use_cache else out


# The stacked pass's weights: name -> (module path under each encoder or under its block ``i``,
# the weights concatenated by rows). q/k/v and gate/up are one matrix per encoder.
_TOP = {"down_proj": ("down_proj",), "norm": ("norm",), "up_proj": ("up_proj",)}
_BLOCK = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",),
          "attn_norm": ("attn_norm",), "mlp_norm": ("mlp_norm",)}


def _members(encoders: list[KnowledgeEncoder]) -> dict[str, list[list[torch.Tensor]]]:
    """Per stacked weight, per encoder, the parameters whose rows it concatenates."""
    out = {k: [[getattr(e, n).weight for n in names] for e in encoders] for k, names in _TOP.items()}
    for i in range(encoders[0].c.num_layers):
        for k, names in _BLOCK.items():
            out[f"{i}.{k}"] = [[getattr(e.blocks[i], n).weight for n in names] for e in encoders]
    return out


def _stack_rows(per: list[list[torch.Tensor]]) -> torch.Tensor:
    """``per[e]``'s tensors concatenated by rows, stacked over e: one copy (a stack of every
    tensor, viewed) rather than a concatenation per encoder and a stack."""
    w = torch.stack([p for ps in per for p in ps])
    return w.view(len(per), -1, *w.shape[2:]) if len(per[0]) > 1 else w


def stacked_weights(encoders: list[KnowledgeEncoder]) -> dict[str, torch.Tensor]:
    """Every weight of the stacked pass, ``(E, rows, ...)``, stacked from the encoders' parameters
    (gradients flow back to each)."""
    return {k: _stack_rows(per) for k, per in _members(encoders).items()}


class FusedWeights:
    """The stacked weights of an ``EncoderStack`` kept as leaf tensors, with every encoder's
    parameters re-pointed to views of them: a forward reads them without stacking (a copy of
    every weight each step, ~6 % of a fit step on CPU).

    Convention: after a backward, a hook hands each stacked gradient to the parameters as views
    (set as their ``.grad``, or added to it when one is there) and clears its own, so clipping, the
    optimizer and ``zero_grad`` see ordinary per-parameter gradients. Updates of a parameter
    (optimizer, ``load_state_dict``) write into the stacked tensor. ``current()`` rebuilds when a
    parameter was replaced (``load_state_dict(assign=True)``), no longer views its slot
    (``.to(device)``, ``.double()``) or its ``requires_grad`` changed. Values and gradients equal
    ``stacked_weights``'s (tested).

    Not for parameters substituted from outside (``torch.func.functional_call``,
    ``nn.utils.parametrize``): the stack reads its own stacked copy. ``stacked_forward`` without
    ``weights`` stacks whatever the modules hold.
    """

    def __init__(self):
        self.weights: dict[str, torch.Tensor] | None = None
        self._slots: list[tuple[torch.Tensor, int, bool]] = []  # (parameter, its data_ptr, requires_grad)

    def current(self, encoders: list[KnowledgeEncoder]) -> dict[str, torch.Tensor]:
        members = _members(encoders)
        now = [p for per in members.values() for ps in per for p in ps]
        if self.weights is None or len(now) != len(self._slots) or any(
                p is not q or p.data_ptr() != ptr or p.requires_grad != grad
                for p, (q, ptr, grad) in zip(now, self._slots)):
            # never as inference tensors (a first forward under torch.inference_mode would
            # otherwise leave weights no later training could take gradients through)
            with torch.inference_mode(False):
                self._build(members)
        return self.weights

    def _build(self, members: dict[str, list[list[torch.Tensor]]]) -> None:
        self.weights, self._slots = {}, []
        for k, per in members.items():
            grad = any(p.requires_grad for ps in per for p in ps)  # frozen ones get no gradient (_hand_over)
            w = _stack_rows([[p.detach() for p in ps] for ps in per]).requires_grad_(grad)
            views = []
            for e, ps in enumerate(per):
                row = 0
                for p in ps:
                    rows = slice(row, row + p.shape[0]) if len(ps) > 1 else None
                    row += p.shape[0]
                    p.data = w.data[e] if rows is None else w.data[e, rows]
                    views.append((p, e, rows))
                    self._slots.append((p, p.data_ptr(), p.requires_grad))
            if grad:
                w.register_post_accumulate_grad_hook(_hand_over(views))
            self.weights[k] = w


def _hand_over(views):
    """The hook: the stacked gradient, as views, into each parameter's ``.grad``; its own cleared."""

    def hook(w: torch.Tensor) -> None:
        g, w.grad = w.grad, None
        for p, e, rows in views:
            if not p.requires_grad:
                continue
            part = g[e] if rows is None else g[e, rows]
            if p.grad is None:
                p.grad = part
            else:
                p.grad.add_(part)

    return hook


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` (E, ..., in) times each encoder's ``w`` (E, out, in) transposed -> (E, ..., out)."""
    e, shape = x.shape[0], x.shape[1:-1]
    return torch.bmm(x.reshape(e, -1, x.shape[-1]), w.transpose(1, 2)).view(e, *shape, w.shape[1])


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` of (E, ..., h) with per-encoder weights ``w`` (E, h)."""
    xf = x.float()
    norm = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return norm * w.view(w.shape[0], *([1] * (x.dim() - 2)), w.shape[1]).to(x.dtype)


def stacked_forward(encoders: list[KnowledgeEncoder], embeds: torch.Tensor, valid: torch.Tensor,
                    positions: torch.Tensor | None = None, shifts: torch.Tensor | None = None,
                    length: int | None = None, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``torch.stack([enc(embeds, valid, positions, shifts=shifts, length=length) for enc in encoders])``
    in one pass: (E, B, L', d_model). ``weights``: the encoders' ``stacked_weights`` when the caller
    keeps them (``EncoderStack``'s ``FusedWeights``); made here otherwise.

    The same maths as ``KnowledgeEncoder.forward``, shaped for the hardware: the encoders of a stack
    read the same tokens, so each linear layer of all E encoders is one batched matmul (q/k/v and
    gate/up fused per encoder), the down-projection one matmul of E*hidden columns, and attention
    one call over E*B sequences (4-D, so GPUs use their fused kernels). A handful of large kernels
    instead of ~30*E small ones matters on GPUs, where launching a kernel of this size costs more
    than running it; on CPU it runs as fast as E separate passes (docs/training.md).
    Results equal the per-encoder forward up to float rounding (tests/test_precision.py).
    """
    c = encoders[0].c
    e, (b, n, _) = len(encoders), embeds.shape
    h = c.hidden_size
    if positions is None:
        positions = torch.arange(n, device=embeds.device)[None].expand(b, n)
    w = stacked_weights(encoders) if weights is None else weights
    down = w["down_proj"]  # (E, h, d)
    x = (embeds.reshape(b * n, -1) @ down.reshape(e * h, -1).t()).view(b, n, e, h).permute(2, 0, 1, 3)
    # Per forward, in the blocks' dtype: the rotary tables (q's scaled by the softmax factor) and the
    # mask as an additive bias, shared by every block rather than converted in each.
    att = _Attention(positions, attention_mask(valid, n), c, x.dtype, e)
    last = c.num_layers - 1 if shifts is not None else c.num_layers
    for i in range(last):
        x = _stacked_block(x, w, i, c, att, att)
    if shifts is not None:
        # Only input positions are returned (``shift_left``), so the last block computes its queries,
        # residual and MLP there alone; keys and values still cover K+x. Same maths, ~|x|/(|K|+|x|)
        # of the last block's work.
        from kcache.align import shift_index

        shifts = shifts.to(device=embeds.device, dtype=torch.long)
        idx, inside = shift_index(shifts, n - int(shifts.min()) if length is None else length, n)
        queries = _Attention(positions.gather(1, idx), attention_mask_at(valid, idx), c, x.dtype, e)
        x = _stacked_block(x, w, last, c, att, queries, query_index=idx)
        x = x * inside.view(1, b, -1, 1).to(x.dtype)
    x = _rms(x, w["norm"], c.rms_eps)
    return _linear(x, w["up_proj"])


class _Attention:
    """What a stacked block's attention needs for one set of query (or key) positions, made once
    per forward in the blocks' dtype: rotary tables (B, 1, L, hd) for keys and, scaled by
    ``hd ** -0.5``, for queries (so the scores need no scaling pass), and the mask (B, 1, Q, K)
    repeated over the E encoders (encoder-major, as the heads) and, on CPU, as an additive bias."""

    def __init__(self, positions: torch.Tensor, mask: torch.Tensor, c: EncoderConfig, dtype: torch.dtype, e: int):
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        scale = c.head_dim ** -0.5
        self.k_cs = cos.to(dtype), sin.to(dtype)
        self.q_cs = (cos * scale).to(dtype), (sin * scale).to(dtype)
        self.mask = mask.repeat(e, 1, 1, 1)
        self.bias = mask_bias(self.mask, dtype) if mask.device.type == "cpu" else None  # SDPA takes the mask


def _stacked_block(x: torch.Tensor, w: dict[str, torch.Tensor], i: int, c: EncoderConfig, keys: _Attention,
                   queries: _Attention, query_index=None) -> torch.Tensor:
    """Block ``i`` of E encoders (``w``: their ``stacked_weights``) on x (E, B, n, h). With
    ``query_index`` (B, Q) only those positions are queries (``queries``: their tables and mask
    (B, 1, Q, n)); returns (E, B, Q, h)."""
    e, b, n, h = x.shape
    heads, hd = c.num_heads, c.head_dim
    y = _rms(x, w[f"{i}.attn_norm"], c.rms_eps)
    qkv_w = w[f"{i}.qkv"]  # (E, 3h, h): q, k, v rows
    if query_index is None:
        q, k, v = _linear(y, qkv_w).split(h, -1)
    else:
        k, v = _linear(y, qkv_w[:, h:]).split(h, -1)
        gather = query_index[None, :, :, None].expand(e, b, query_index.shape[1], h)
        x = x.gather(2, gather)
        q = _linear(y.gather(2, gather), qkv_w[:, :h])

    def heads_of(t, cs=None):
        # (E, B, H, len, hd) for the rotation, whose (B, 1, len, hd) tables broadcast over encoders and
        # heads; then (E*B, H, len, hd): 4-D, as the fused attention kernels (CUDA flash /
        # memory-efficient) need.
        t = t.reshape(e, b, t.shape[2], heads, hd).transpose(2, 3)
        return (t if cs is None else rope(t, *cs)).reshape(e * b, heads, -1, hd)

    att = attend(heads_of(q, queries.q_cs), heads_of(k, keys.k_cs), heads_of(v), queries.mask, scale=1.0,
                 bias=queries.bias)
    x = x + _linear(att.transpose(1, 2).reshape(e, b, -1, h), w[f"{i}.o"])
    y = _rms(x, w[f"{i}.mlp_norm"], c.rms_eps)
    gate, up = _linear(y, w[f"{i}.gate_up"]).chunk(2, -1)
    return x + _linear(F.silu(gate) * up, w[f"{i}.down"])


class EncoderStack(nn.Module):
    """One encoder per decoder layer, fed by the same tokens.

    Encoders share nothing trainable, each is initialised from its own seed (``seed``, layer),
    and training uses a sum of per-layer losses with per-encoder clipping, so an encoder trained
    in a stack ends identical to one trained alone.
    """

    def __init__(self, config: EncoderConfig, layers: list[int], seed: int = 0):
        super().__init__()
        self.config, self.layers = config, list(layers)
        # Leading input positions this stack's output is never added to: the bundle's sink policy
        # (kcache.align.sink_keep), carried here so every consumer applies the same one.
        self.sink = 0
        self._fused = FusedWeights()
        self.encoders = nn.ModuleDict()
        for l in self.layers:
            g = torch.Generator().manual_seed(seed * 100_003 + l)
            self.encoders[f"layer_{l:02d}"] = KnowledgeEncoder(config, generator=g)

    def encoder(self, layer: int) -> KnowledgeEncoder:
        return self.encoders[f"layer_{layer:02d}"]

    def forward(self, embeds: torch.Tensor, valid: torch.Tensor, positions=None, shifts=None,
                length=None) -> dict[int, torch.Tensor]:
        """Every encoder on the same input, as one batched pass (``stacked_forward``)."""
        out = stacked_forward([self.encoder(l) for l in self.layers], embeds, valid, positions, shifts, length,
                              self.stacked_weights())
        return {l: out[i] for i, l in enumerate(self.layers)}

    def stacked_weights(self, layers: list[int] | None = None) -> dict[str, torch.Tensor] | None:
        """The kept stacked weights when ``layers`` is the whole stack in order (None otherwise:
        ``stacked_forward`` then stacks a subset itself)."""
        if layers is not None and list(layers) != self.layers:
            return None
        return self._fused.current([self.encoder(l) for l in self.layers])

    def num_parameters(self, per_encoder: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n // max(1, len(self.layers)) if per_encoder else n


def parameter_count(config: EncoderConfig) -> int:
    """Trainable parameters of one encoder, computed from the config."""
    h, m, d = config.hidden_size, config.intermediate_size, config.d_model
    block = 4 * h * h + 3 * h * m + 2 * h
    return 2 * d * h + config.num_layers * block + h


# ---------------------------------------------------------------------------------------------
# bundles


def save_bundle(path: str | Path, stack: EncoderStack, meta: dict) -> Path:
    """Write ``config.json`` (schemas/encoders-v1.json) and ``encoders.safetensors`` atomically."""
    import os
    import shutil

    from safetensors.torch import save_file

    from kcache.schemas import validate_document

    path = Path(path)
    doc = {
        "format": BUNDLE_FORMAT,
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "kcache_version": __version__,
        "encoder": dataclasses.asdict(stack.config),
        "layers": stack.layers,
        "parameters_per_encoder": parameter_count(stack.config),
        **meta,
    }
    validate_document(doc, "encoders-v1", str(path / CONFIG_FILE))
    from kcache.lock import fresh_tmp, remove_stale_tmp, tmp_path

    remove_stale_tmp(path, "old")
    tmp = fresh_tmp(path, "saving")  # after removing those of a killed save (never a live process's)
    tmp.mkdir(parents=True)
    # own copies: the parameters view the stack's shared stacked weights (FusedWeights), and
    # safetensors refuses tensors that share memory
    state = {k: v.detach().cpu().clone() for k, v in stack.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
    (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    if path.exists():
        old = tmp_path(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    return path


def publish_bundle(out: str | Path, stack: EncoderStack, meta: dict) -> Path:
    """Write the bundle's two files into directory ``out``, which may hold more (fit and finetune keep
    their checkpoint there): built complete in a sibling temporary (:func:`save_bundle`), then each
    file renamed into place, so ``out`` never holds a half-written file."""
    import os
    import shutil

    from kcache.lock import fresh_tmp

    out = Path(out)
    tmp = fresh_tmp(out, "bundle")
    save_bundle(tmp, stack, meta)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_bundle_config(path: str | Path) -> dict:
    from kcache.schemas import SchemaError, validate_document

    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.exists():
        raise BundleError(f"{path}: not an encoder bundle (no {CONFIG_FILE})")
    doc = read_json(cfg_path, BundleError)
    if doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{cfg_path}: not a kcache encoder bundle (format {doc.get('format')!r})")
    if doc.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        raise BundleError(f"{cfg_path}: bundle schema version {doc.get('schema_version')!r}; "
                          f"this kcache reads version {BUNDLE_SCHEMA_VERSION}")
    try:
        validate_document(doc, "encoders-v1", str(cfg_path))
    except SchemaError as e:
        raise BundleError(str(e)) from None
    return doc


def load_bundle(path: str | Path, model_fingerprint: dict | None = None) -> tuple[EncoderStack, dict]:
    """Load an encoder bundle; with ``model_fingerprint``, refuse one made for another model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    doc = read_bundle_config(path)
    if model_fingerprint is not None:
        mine = doc["model"]
        from kcache.models import ModelFingerprint

        diff = ModelFingerprint.from_dict(mine).diff(ModelFingerprint.from_dict(model_fingerprint))
        if diff:
            raise BundleError(
                f"{path / CONFIG_FILE}: encoders were trained for another model ({', '.join(diff)} differ: "
                f"bundle {mine.get('name', '?')} {mine.get('weights_hash', '')[:19]}, "
                f"loaded {model_fingerprint.get('name', '?')} {model_fingerprint.get('weights_hash', '')[:19]})"
            )
    stack = EncoderStack(EncoderConfig(**doc["encoder"]), doc["layers"])
    wpath = path / WEIGHTS_FILE
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{wpath}: cannot read encoder weights ({e})") from None
    want = stack.state_dict()
    missing, extra = want.keys() - state.keys(), state.keys() - want.keys()
    if missing or extra:
        raise BundleError(f"{wpath}: weights do not match {CONFIG_FILE} (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(extra)[:3]})")
    for k, v in state.items():
        if v.shape != want[k].shape:
            raise BundleError(f"{wpath}: tensor {k} has shape {tuple(v.shape)}, "
                              f"{CONFIG_FILE} implies {tuple(want[k].shape)}")
        if not torch.isfinite(v).all():
            raise BundleError(f"{wpath}: tensor {k} holds NaN/inf")
    stack.load_state_dict(state)
    stack.sink = int(doc.get("sink", 0))
    return stack, doc



