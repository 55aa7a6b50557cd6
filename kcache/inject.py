"""Stage three: adding knowledge to a frozen decoder at chosen layers and sites.

Two levels:

* ``add_at_site`` - the primitive: a forward hook that adds a fixed tensor to the output of the
  site module (``mlp``: the MLP output before the residual add; ``block``: the block output,
  i.e. the residual stream) for every input position.
* ``Injector`` - the runtime. It attaches an ``EncoderStack`` (or, in *oracle* mode, the exact
  deltas of a stage-one cache) to a loaded ``Decoder`` at the site and layers recorded in the
  bundle, and adds, at every decoder forward call, the right rows for the positions that call
  brings. That makes it work for a plain teacher-forced forward *and* for ``model.generate()``
  with the decoder's KV cache.

Conventions (the same as ``kcache.align``; docs/inject.md has a worked example):

* ``k_ids`` is the knowledge prefix, ``x_ids`` the input. The encoders read ``k_ids + x_ids``;
  their output at encoder position ``len(k_ids) + j`` is the addition for input position ``j``
  (DIEKÆ eq. 3, ``shift_left(E(K, x), |K|)``). The first ``|K|`` outputs are discarded.
* Encoder inputs are the decoder's own frozen input embeddings of those ids.
* Additions at padding positions are zero, and padding ids never reach a real position's
  result (they are masked keys in both the encoder and the decoder), so results are padding-
  and batch-invariant up to float rounding.
* One-shot (``encoder_additions``): batches are right-padded, sample ``i`` occupies positions
  ``0 .. len_i - 1``.
* Incremental (``Injector.session`` - what ``generate`` uses): the decoder may be left- or
  right-padded; each forward call's new positions are read from the last ``n`` columns of its
  2-D ``attention_mask`` (1 = real token). The encoders keep their own KV cache laid out as
  ``[knowledge columns (right-padded to the longest k_ids)] + [one column per decoder
  position]``, so it mirrors the decoder's cache column for column, a decode step costs one
  encoder token per sample, and a call that re-sends earlier positions (generation without a
  decoder cache) rolls the encoder cache back to match.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kcache.align import input_keep, pad_right, sink_keep, sink_of, targets_of
from kcache.encoders import stacked_forward
from kcache.errors import KCacheError  # noqa: E402
from kcache.models import Decoder, ModelFingerprint


class InjectError(KCacheError, ValueError):
    """The injector cannot be used as asked (wrong model, wrong call pattern); the message says why."""


# ---------------------------------------------------------------------------------------------
# the primitive


@contextlib.contextmanager
def add_at_site(decoder: Decoder, site: str, additions: dict[int, torch.Tensor]):
    """Add ``additions[layer]`` (B, L, hidden), aligned to input positions, to the output of
    ``site`` at each layer while the context is open."""
    handles = []

    def make(delta):
        def hook(_mod, _inp, out):
            if isinstance(out, tuple):
                return (out[0] + delta.to(out[0].dtype),) + tuple(out[1:])
            return out + delta.to(out.dtype)
        return hook

    try:
        for layer, delta in additions.items():
            handles.append(decoder.layers.site_module(site, layer).register_forward_hook(make(delta)))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# pure helpers


def check_fingerprint(expected: dict, decoder: Decoder, what: str = "encoder bundle") -> None:
    """Raise ``InjectError`` naming both models when ``expected`` (a fingerprint dict) is not the
    loaded decoder's. ``name`` is only a label and is not compared."""
    mine = decoder.fingerprint.to_dict()
    diff = ModelFingerprint.from_dict(expected).diff(decoder.fingerprint)
    if diff:
        raise InjectError(
            f"{what} was made for another model ({', '.join(diff)} differ): it expects "
            f"{expected.get('name') or '?'} [{expected.get('architecture', '?')} weights "
            f"{str(expected.get('weights_hash', ''))[:19]}], "
            f"the loaded decoder is {mine.get('name') or '?'} [{mine.get('architecture')} weights "
            f"{str(mine.get('weights_hash'))[:19]}]"
        )


def embed_ids(decoder: Decoder, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Encoder input: the decoder's frozen input embeddings of ``ids`` (cast to ``dtype``)."""
    w = decoder.layers.embed_tokens().weight
    e = F.embedding(ids.to(w.device), w)
    return e if dtype is None else e.to(dtype)


def encoder_positions(base: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
    """Encoder RoPE positions of newly arriving tokens.

    ``base`` (B,) = ``len(k_ids) + real input tokens already encoded``; ``new_valid`` (B, n) bool.
    Real token ``t`` of sample ``i`` gets ``base[i] + (number of real new tokens before it)``;
    padding tokens get the position of the next real token (any value works: they are masked).
    """
    before = torch.cumsum(new_valid.long(), dim=1) - new_valid.long()
    return base[:, None].long() + before


def inference_autocast(decoder: Decoder):
    """The encoders' precision at inference: what ``compute="auto"`` resolves to next to this decoder
    (``precision.resolve_compute``): bf16 autocast for a bf16 decoder where the hardware runs bf16
    natively (as fit and finetune train them there), none for a float32 decoder (the exactness
    tests) or under ``KCACHE_COMPUTE=float32``."""
    from kcache.precision import autocast_for

    if decoder.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return autocast_for(decoder.device, "auto", frozen=decoder.dtype)()


@torch.no_grad()
def encoder_additions(decoder: Decoder, stack, k_ids: list[list[int]], x_ids: list[list[int]],
                      layers: list[int] | None = None, pad_id: int = 0,
                      sink: int | None = None) -> dict[int, torch.Tensor]:
    """``stack_additions`` without gradients (injection at inference), in ``inference_autocast``."""
    with inference_autocast(decoder):
        return stack_additions(decoder, stack, k_ids, x_ids, layers, pad_id, sink)


def stack_additions(decoder: Decoder, stack, k_ids: list[list[int]], x_ids: list[list[int]],
                    layers: list[int] | None = None, pad_id: int = 0,
                    sink: int | None = None) -> dict[int, torch.Tensor]:
    """One-shot DIEKÆ additions for a batch: ``{layer: (B, max len(x_ids), hidden)}``, right-padded.

    Runs each encoder on the right-padded ``k_ids[i] + x_ids[i]``, shifts its output left by
    ``len(k_ids[i])`` (``align.shift_left``) and zeroes padding positions and the first ``sink``
    input positions (``align.input_keep``; default: the stack's own ``sink``). ``pad_id`` does not
    change the result (padding keys are masked, padding rows zeroed).
    """
    sink = stack.sink if sink is None else sink
    layers = list(stack.layers if layers is None else layers)
    dev = decoder.device
    pdtype = next(stack.parameters()).dtype
    ids, mask = pad_right([list(k) + list(x) for k, x in zip(k_ids, x_ids)], pad_id)
    ids, valid = ids.to(dev), mask.to(dev).bool()
    emb = embed_ids(decoder, ids, pdtype)
    k_lens = torch.tensor([len(k) for k in k_ids], device=dev)
    x_lens = torch.tensor([len(x) for x in x_ids], device=dev)
    n = int(x_lens.max()) if len(x_ids) else 0
    keep = input_keep(x_lens, n, sink)[..., None]
    stacked = stacked_forward([stack.encoder(l) for l in layers], emb, valid, shifts=k_lens, length=n,
                              weights=stack.stacked_weights(layers))
    return {l: stacked[i] * keep.to(stacked.dtype) for i, l in enumerate(layers)}


def oracle_rows(cache, sample: int | str, layers: list[int], x_ids: list[int] | None = None,
                deltas: dict[int, np.ndarray] | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """Exact cached deltas of one sample: ``({layer: (m, hidden) float32}, m)`` (``deltas``: the
    sample's rows already read, ``{layer: (x_len, hidden)}``).

    Without ``x_ids`` all ``x_len`` rows. With ``x_ids``, only the rows of the longest common
    prefix of ``x_ids`` and the cached input (delta at position ``j`` depends only on tokens
    ``<= j``, so those rows are exact for ``x_ids`` too); ``m`` says how many that is. Distilled
    deltas depend on later positions too: for them only the cached input itself is covered.
    """
    toks, shift = cache.encoder_tokens(sample)
    cached_x = toks[shift:].tolist()
    m = len(cached_x)
    if x_ids is not None and targets_of(cache.settings) == "distilled" and list(x_ids) != cached_x:
        # Distilled deltas were optimised against every later position (the KL's gradient reaches
        # back), so a prefix of them is not the exact delta for another continuation.
        return {l: torch.zeros(0, cache.hidden_size) for l in layers}, 0
    if x_ids is not None:
        m = 0
        for a, b in zip(cached_x, x_ids):
            if a != b:
                break
            m += 1
    if deltas is None:
        deltas = {l: cache.deltas(sample, l) for l in layers}
    return {l: torch.from_numpy(np.array(deltas[l][:m], dtype=np.float32)) for l in layers}, m


def stack_rows(rows: list[dict[int, torch.Tensor]], layers: list[int], length: int,
               hidden: int) -> dict[int, torch.Tensor]:
    """Per-sample ``{layer: (m_i, hidden)}`` -> right-padded ``{layer: (B, length, hidden)}``, zeros past ``m_i``."""
    out = {}
    for l in layers:
        t = torch.zeros(len(rows), length, hidden)
        for i, r in enumerate(rows):
            m = min(r[l].shape[0], length)
            t[i, :m] = r[l][:m]
        out[l] = t
    return out


def _ids_from_call(args, kwargs):
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    return ids


def _call_geometry(args, kwargs) -> tuple:
    """What one decoder call brings: (batch, new positions n, past length, new-token validity
    (B, n) bool, input ids or None, inputs_embeds or None)."""
    ids = _ids_from_call(args, kwargs)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        raise InjectError("decoder called without input_ids or inputs_embeds")
    b, n = ref.shape[0], ref.shape[1]
    am = kwargs.get("attention_mask")
    if am is not None and not torch.is_tensor(am):
        am = None
    if am is not None and am.dim() != 2:
        raise InjectError(f"the injector needs a 2-D attention_mask (B, past + new), got shape {tuple(am.shape)}")
    if am is not None:
        past = am.shape[1] - n
        new_valid = am[:, -n:].bool() if n else am[:, :0].bool()
    else:
        # transformers 5 hands generate()'s cache to the backbone as ``cache``; older versions as ``past_key_values``
        pkv = kwargs.get("past_key_values")
        if pkv is None:
            pkv = kwargs.get("cache")
        past = int(pkv.get_seq_length()) if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        new_valid = torch.ones(b, n, dtype=torch.bool, device=ref.device)
    return b, n, past, new_valid, ids, embeds


# ---------------------------------------------------------------------------------------------
# sources of additions (one per forward call)


class _Static:
    """Precomputed additions ``{layer: (B, L, hidden)}`` aligned to the caller's input layout.
    A call covering decoder positions ``[past, past + n)`` gets those rows; rows past ``L`` are zero."""

    def __init__(self, additions: dict[int, torch.Tensor]):
        self.additions = additions

    def step(self, b, n, past, new_valid, ids, embeds):
        out = {}
        for l, a in self.additions.items():
            if a.shape[0] != b:
                raise InjectError(f"injection prepared for batch {a.shape[0]}, decoder called with batch {b}")
            piece = a[:, past : past + n]
            if piece.shape[1] < n:
                piece = torch.cat([piece, piece.new_zeros(b, n - piece.shape[1], a.shape[2])], 1)
            out[l] = piece * new_valid[..., None].to(piece.device, piece.dtype)
        return out


class _Session:
    """Incremental encoders with their own KV cache (see the module docstring for the layout)."""

    def __init__(self, injector: Injector, k_ids: list[list[int]]):
        self.inj = injector
        dec, stack = injector.decoder, injector.stack
        self.dev = dec.device
        self.dtype = next(stack.parameters()).dtype
        ids, mask = pad_right([list(k) for k in k_ids], 0)
        ids, kvalid = ids.to(self.dev), mask.to(self.dev).bool()
        self.b = ids.shape[0]
        self.k_cols = ids.shape[1]
        self.k_lens = kvalid.sum(1)
        self.valid = kvalid  # (B, columns): key validity of every cached encoder column
        self.past: dict[int, list] = {}
        if self.k_cols:
            emb = embed_ids(dec, ids, self.dtype)
            with torch.no_grad(), inference_autocast(dec):
                for l in injector.layers:
                    _, self.past[l] = stack.encoder(l)(emb, kvalid, use_cache=True)
        else:
            self.past = {l: None for l in injector.layers}

    @property
    def decoder_columns(self) -> int:
        return self.valid.shape[1] - self.k_cols

    def _truncate(self, past: int) -> None:
        keep = self.k_cols + past
        self.valid = self.valid[:, :keep]
        for l, p in self.past.items():
            if p is not None:
                self.past[l] = [(k[:, :, :keep], v[:, :, :keep]) for k, v in p]

    def step(self, b, n, past, new_valid, ids, embeds):
        if b != self.b:
            raise InjectError(f"injection session holds {self.b} knowledge prefixes, decoder called with batch {b} "
                              "(beam search / num_return_sequences are not supported)")
        if past > self.decoder_columns:
            raise InjectError(f"decoder call continues after position {past}, "
                              f"but the encoders have seen {self.decoder_columns} "
                              "positions; pass the whole input through the injector")
        if past < self.decoder_columns:  # re-sent positions (no decoder cache): roll back
            self._truncate(past)
        new_valid = new_valid.to(self.dev)
        if embeds is not None:
            emb = embeds.to(self.dev, self.dtype)
        else:
            emb = embed_ids(self.inj.decoder, ids.to(self.dev), self.dtype)
        base = self.k_lens + self.valid[:, self.k_cols:].sum(1)
        pos = encoder_positions(base, new_valid)
        key_valid = torch.cat([self.valid, new_valid], 1)
        write = new_valid & sink_keep(pos - self.k_lens[:, None], self.inj.sink)  # pos - |K| = input position
        out = {}
        with torch.no_grad(), inference_autocast(self.inj.decoder):
            for l in self.inj.layers:
                e, self.past[l] = self.inj.stack.encoder(l)(emb, key_valid, pos, past=self.past[l], use_cache=True)
                out[l] = e * write[..., None].to(e.dtype)
        self.valid = key_valid
        return out


# ---------------------------------------------------------------------------------------------
# the runtime


@dataclasses.dataclass
class InjectorInfo:
    site: str
    layers: list[int]
    template: dict
    max_length: int
    source: str  # "encoders" | "oracle"
    targets: str = "independent"  # what the encoders were fitted to (or the oracle cache holds); "none": no cache
    sink: int = 0  # leading input positions never written


class Injector:
    """Adds encoder outputs (or cached oracle deltas) at ``site`` of ``layers`` of a decoder.

    Build it with ``Injector.from_bundle(decoder, dir)``, ``Injector.from_stack(decoder, stack, meta)``
    or ``Injector.oracle(decoder, cache)``. Use it as a context manager (hooks attached while open)
    or call its methods directly (they attach for the duration of the call):

    * ``forward(k_ids, x_ids)`` - teacher-forced logits of ``D(E(K, x) + x)``, right-padded.
    * ``generate(k_ids, x_ids, max_new_tokens=...)`` - greedy/sampled continuations through
      ``model.generate`` with the decoder KV cache (left-padded batches).
    * ``static(additions)`` / ``session(k_ids)`` - context managers choosing what the hooks add on
      the decoder calls made inside them (for code that drives the model itself).

    Outside ``static``/``session`` the hooks add nothing.
    """

    def __init__(self, decoder: Decoder, site: str, layers: list[int], stack=None, cache=None,
                 meta: dict | None = None):
        if site not in ("mlp", "block"):
            raise InjectError(f"unknown site {site!r}; choose 'mlp' or 'block'")
        for l in layers:
            decoder.layers.site_module(site, l)  # range check
        self.decoder, self.site, self.layers = decoder, site, list(layers)
        self.stack, self.cache = stack, cache
        self.meta = meta or {}
        if stack is not None and "sink" in self.meta:
            stack.sink = sink_of(self.meta)  # the bundle's record wins; the stack carries it from here on
        self.sink = stack.sink if stack is not None else sink_of(self.meta)
        self._handles: list = []
        self._source = None
        self._pending: dict[int, torch.Tensor] | None = None
        self._depth = 0
        if stack is not None:
            hidden = decoder.layers.hidden_size
            if stack.config.d_model != hidden:
                raise InjectError(f"encoders output d_model {stack.config.d_model}, "
                                  f"the decoder's hidden size is {hidden}")
            missing = [l for l in self.layers if l not in stack.layers]
            if missing:
                raise InjectError(f"no encoder for layer(s) {missing}; the stack has {stack.layers}")
            stack.to(decoder.device)
            stack.eval()
            for p in stack.parameters():
                p.requires_grad_(False)

    # -- construction

    @classmethod
    def from_stack(cls, decoder: Decoder, stack, meta: dict) -> Injector:
        """An in-memory stack with its bundle metadata (``site``, ``model``, optional ``layers``,
        ``template``, ``max_length``). Refuses metadata naming another model."""
        if "model" in meta:
            check_fingerprint(meta["model"], decoder, "encoder stack")
        return cls(decoder, meta.get("site", "mlp"), meta.get("layers", stack.layers), stack=stack, meta=meta)

    @classmethod
    def from_bundle(cls, decoder: Decoder, path: str | Path) -> Injector:
        """Load an encoder bundle (``kcache.encoders.load_bundle``) and refuse one made for another model."""
        from kcache.encoders import BundleError, load_bundle, read_bundle_config

        doc = read_bundle_config(path)
        try:
            check_fingerprint(doc["model"], decoder, f"encoder bundle {path}")
        except InjectError as e:
            raise BundleError(str(e)) from None
        stack, meta = load_bundle(path, decoder.fingerprint.to_dict())
        return cls(decoder, meta["site"], meta["layers"], stack=stack, meta=meta)

    @classmethod
    def oracle(cls, decoder: Decoder, cache, layers: list[int] | None = None) -> Injector:
        """Oracle mode: inject the exact deltas of a stage-one cache (the upper bound)."""
        check_fingerprint(cache.model_fingerprint, decoder, f"cache {cache.path}")
        s = cache.settings
        meta = {"site": s["site"], "layers": list(layers or s["layers"]), "template": s["template"],
                "max_length": s["max_length"], "model": s["model"], "targets": targets_of(s), "sink": sink_of(s)}
        return cls(decoder, s["site"], meta["layers"], cache=cache, meta=meta)

    @property
    def info(self) -> InjectorInfo:
        from kcache.align import TemplateSpec

        t = self.meta.get("template") or {"template": TemplateSpec.template, "separator": TemplateSpec.separator,
                                          "end": "eos"}
        return InjectorInfo(self.site, self.layers, t, int(self.meta.get("max_length", 1024)),
                            "oracle" if self.stack is None else "encoders", targets_of(self.meta), self.sink)

    def template_spec(self):
        from kcache.align import TemplateSpec

        t = self.info.template
        return TemplateSpec(t["template"], t["separator"], t["end"])

    # -- hooks

    def _pre(self, _mod, args, kwargs):
        if self._source is None:
            self._pending = None
            return None
        self._pending = self._source.step(*_call_geometry(args, kwargs))
        return None

    def _post(self, _mod, _args, _kwargs, _out):
        self._pending = None
        return None

    def _site_hook(self, layer):
        def hook(_mod, _inp, out):
            p = self._pending
            if p is None or layer not in p:
                return None
            if isinstance(out, tuple):
                h = out[0]
                return (h + p[layer].to(h.device, h.dtype),) + tuple(out[1:])
            return out + p[layer].to(out.device, out.dtype)
        return hook

    def attach(self) -> Injector:
        if self._depth == 0:
            bb = self.decoder.layers.backbone()
            self._handles.append(bb.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(bb.register_forward_hook(self._post, with_kwargs=True, always_call=True))
            for l in self.layers:
                # prepend: anything else hooked on the site (e.g. extract.capture) sees the injected output
                module = self.decoder.layers.site_module(self.site, l)
                self._handles.append(module.register_forward_hook(self._site_hook(l), prepend=True))
        self._depth += 1
        return self

    def detach(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._pending = None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
        return False

    @contextlib.contextmanager
    def _attached(self):
        self.attach()
        try:
            yield
        finally:
            self.detach()

    @contextlib.contextmanager
    def _with_source(self, src):
        prev = self._source
        self._source = src
        try:
            with self._attached():
                yield src
        finally:
            self._source = prev

    def static(self, additions: dict[int, torch.Tensor]):
        """Context: decoder calls inside add ``additions`` (``{layer: (B, L, hidden)}`` aligned to
        the ids the caller passes; a call at positions ``[past, past+n)`` gets those rows)."""
        dev = self.decoder.device
        return self._with_source(_Static({l: a.to(dev) for l, a in additions.items()}))

    def session(self, k_ids: list[list[int]]):
        """Context: the encoders read ``k_ids[i]`` now, then every token the decoder is called
        with (left or right padding, with or without the decoder's KV cache)."""
        if self.stack is None:
            raise InjectError("oracle mode has no encoders to run incrementally; use static(oracle_additions(...))")
        return self._with_source(_Session(self, k_ids))

    # -- additions

    def additions(self, k_ids: list[list[int]], x_ids: list[list[int]]) -> dict[int, torch.Tensor]:
        """One-shot encoder additions for a right-padded batch (``encoder_additions``)."""
        if self.stack is None:
            raise InjectError("oracle mode: use oracle_additions(sample_ids, x_ids)")
        return encoder_additions(self.decoder, self.stack, k_ids, x_ids, self.layers, sink=self.sink)

    def oracle_additions(self, samples: list[int | str],
                         x_ids: list[list[int]] | None = None) -> tuple[dict[int, torch.Tensor], list[int]]:
        """Cached deltas for a right-padded batch of cached samples, and per sample how many
        leading positions they cover exactly (see ``oracle_rows``)."""
        if self.cache is None:
            raise InjectError("not an oracle injector (build it with Injector.oracle(decoder, cache))")
        rows, covered = [], []
        read = {l: self.cache.deltas_of(samples, l) for l in self.layers}  # each chunk once per batch
        for i, s in enumerate(samples):
            r, m = oracle_rows(self.cache, s, self.layers, None if x_ids is None else x_ids[i],
                               {l: read[l][i] for l in self.layers})
            rows.append(r)
            covered.append(m)
        length = max(len(x) for x in x_ids) if x_ids is not None else max(covered, default=0)
        return stack_rows(rows, self.layers, length, self.decoder.layers.hidden_size), covered

    # -- running

    @torch.no_grad()
    def forward(self, k_ids: list[list[int]] | None, x_ids: list[list[int]], samples: list[int | str] | None = None,
                pad_id: int | None = None):
        """Teacher-forced ``D(E(K, x) + x)`` logits (B, max len(x), vocab) on right-padded ``x_ids``.
        Oracle mode takes ``samples`` (cache positions or ids) instead of ``k_ids``."""
        add = self.oracle_additions(samples, x_ids)[0] if self.stack is None else self.additions(k_ids, x_ids)
        pad = pad_id if pad_id is not None else (self.decoder.tokenizer.pad_token_id or 0)
        ids, mask = pad_right([list(x) for x in x_ids], pad)
        with self.static(add):
            return self.decoder.model(input_ids=ids.to(self.decoder.device),
                                      attention_mask=mask.to(self.decoder.device), use_cache=False).logits

    @torch.no_grad()
    def generate(self, k_ids: list[list[int]], x_ids: list[list[int]], max_new_tokens: int = 32,
                 **gen_kwargs) -> list[list[int]]:
        """Continuations of each ``x_ids[i]`` with the encoders reading ``k_ids[i]``: new token ids
        per sample. Left-pads the batch (as ``generate`` needs); greedy unless ``gen_kwargs`` say
        otherwise. One encoder token per sample per decode step."""
        return generate_tokens(self.decoder, x_ids, max_new_tokens, context=lambda: self.session(k_ids), **gen_kwargs)


def pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (ids (B, L), attention mask (B, L)) for ``generate``."""
    n = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate_tokens(decoder: Decoder, x_ids: list[list[int]], max_new_tokens: int = 32, context=None,
                    **gen_kwargs) -> list[list[int]]:
    """``model.generate`` on a left-padded batch; returns the new ids of each sample, cut at the
    first EOS (inclusive). ``context``: a callable returning a context manager to run inside."""
    tok = decoder.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = pad_left([list(x) for x in x_ids], pad if pad is not None else 0)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    kw.update(gen_kwargs)
    if kw.get("num_beams", 1) != 1 or kw.get("num_return_sequences", 1) != 1:
        raise InjectError("generation with injection supports greedy decoding and sampling, "
                          "not beam search or several sequences per input")
    with (context() if context is not None else contextlib.nullcontext()):
        out = decoder.model.generate(input_ids=ids.to(decoder.device), attention_mask=mask.to(decoder.device), **kw)
    new = out[:, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    result = []
    for seq in new:
        if eos is not None and eos in seq:
            seq = seq[: seq.index(eos) + 1]
        result.append(seq)
    return result
