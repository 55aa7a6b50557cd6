"""The decoder's lower blocks over an input, computed once for every method that leaves them as
they are.

Injection at layers ``>= first`` changes nothing below it: at site ``block`` the addition is made
to block ``first``'s output, at ``mlp`` inside block ``first``. So the hidden state leaving block
``u - 1`` (``u = untouched_blocks(site, layers)``) depends only on the input tokens, and methods that
score the same ``x`` (``D(x)``, ``D(E(K,x)+x)`` with every encoder bundle and every knowledge
control, the oracle) can all start from it. ``evaluate`` computes it once per input
(``LowerBlocks.fill``) and runs each of those methods inside ``LowerBlocks.replay()``; finetune keeps
each input's states the first time it sees it (``replay(record=True)``), so later epochs and every
validation after the first start above them.

Inside ``replay()``, a decoder call whose every row is a kept input (matched by its unpadded token
ids) skips blocks ``0 .. u-1`` and starts from the kept states; any other call (another input, left
padding, embeddings instead of ids, a KV cache) runs as usual. Hooks on block ``u - 1`` (an
injection at site ``block``) still see its output, and what is kept is that block's own output,
before any hook.
"""

from __future__ import annotations

import contextlib

import torch

from kcache.align import pad_right
from kcache.models import Decoder


def untouched_blocks(site: str, layers) -> int:
    """How many leading decoder blocks an injection at ``site`` / ``layers`` leaves unchanged:
    ``min(layers) + 1`` at ``block`` (the addition is made to that block's output), ``min(layers)``
    at ``mlp`` (inside it)."""
    first = min(layers)
    return first + 1 if site == "block" else first


def _right_padded_lengths(mask) -> list[int] | None:
    """Each row's length when ``mask`` is a (B, T) tensor of ones then zeros in every row, else None
    (left padding, a 4-D or dict mask)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    m = mask.bool()
    n = m.sum(1)
    if not torch.equal(m, torch.arange(m.shape[1], device=m.device)[None] < n[:, None]):
        return None
    return n.tolist()


_PLAIN_ONLY = ("inputs_embeds", "past_key_values", "cache", "position_ids", "cache_position")


class LowerBlocks:
    """Block ``blocks - 1``'s output over each filled input, ``{token ids: (len, hidden)}``, on the
    decoder's device."""

    def __init__(self, decoder: Decoder, blocks: int, max_bytes: int | None = None):
        if not 1 <= blocks <= decoder.layers.num_layers:
            raise ValueError(f"blocks must be in 1..{decoder.layers.num_layers}, not {blocks}")
        self.decoder, self.blocks, self.max_bytes = decoder, blocks, max_bytes
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.kept_bytes = 0
        self._tuple = False  # whether the blocks return (hidden, ...) (older transformers)
        self._rows: torch.Tensor | None = None  # the current call's start, when replaying it
        self._record = False
        self._missing: list[tuple[int, tuple[int, ...]]] = []  # (row, ids) to keep from the current call

    def _keep(self, key: tuple[int, ...], h: torch.Tensor) -> None:
        if key in self.states or (self.max_bytes is not None and self.kept_bytes + h.nbytes > self.max_bytes):
            return
        self.states[key] = h.detach().clone()
        self.kept_bytes += h.nbytes

    def nbytes(self, seqs: list[list[int]]) -> int:
        """Memory the states of ``seqs`` (unique, not yet kept) would take."""
        todo = {tuple(s) for s in seqs} - self.states.keys()
        return sum(len(s) for s in todo) * self.decoder.layers.hidden_size * self.decoder.dtype.itemsize

    @torch.no_grad()
    def fill(self, seqs: list[list[int]], batches: list[list[int]], pad_id: int) -> int:
        """Run blocks ``0 .. blocks-1`` over ``seqs`` in ``batches`` (lists of indices; the forward
        pass stops there) and keep each new input's states. -> inputs added."""
        from kcache.extract import capture, run_blocks

        added = 0
        last = self.blocks - 1
        for b in batches:
            todo = list(dict.fromkeys(tuple(seqs[i]) for i in b if tuple(seqs[i]) not in self.states))
            if not todo:
                continue
            ids, mask = pad_right([list(s) for s in todo], pad_id)
            dev = self.decoder.device
            with capture(self.decoder, "block", [last], stop=True) as got, self._raw_outputs():
                run_blocks(self.decoder, ids.to(dev), mask.to(dev))
            h = got[last]
            for i, s in enumerate(todo):
                self._keep(s, h[i, : len(s)])
            added += sum(s in self.states for s in todo)
        return added

    @contextlib.contextmanager
    def _raw_outputs(self):
        # First among the block's hooks: capture's own stops the pass right after it.
        handle = self.decoder.layers.block(self.blocks - 1).register_forward_hook(self._note_form, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def _note_form(self, _mod, _inp, out):
        self._tuple = isinstance(out, tuple)

    @contextlib.contextmanager
    def replay(self, record: bool = False):
        """Within: decoder calls over kept inputs start at block ``blocks``. With ``record``, a call
        over other inputs runs every block and keeps their states (up to ``max_bytes``)."""
        outer_record, self._record = self._record, record
        layers = self.decoder.layers
        backbone = layers.backbone()
        handles = [backbone.register_forward_pre_hook(self._start, with_kwargs=True),
                   backbone.register_forward_hook(self._end, always_call=True)]
        swapped = []
        try:
            for i in range(self.blocks):
                block = layers.block(i)
                # An instance attribute (e.g. accelerate's device hooks) is put back as it was.
                swapped.append((block, block.__dict__.get("forward")))
                block.forward = self._stub(block.forward, last=i == self.blocks - 1)
            yield self
        finally:
            for h in handles:
                h.remove()
            for block, before in swapped:
                if before is None:
                    del block.forward
                else:
                    block.forward = before
            self._rows, self._missing, self._record = None, [], outer_record

    def _start(self, _mod, args, kwargs):
        self._rows, self._missing = None, []
        ids = kwargs.get("input_ids", args[0] if args else None)
        # Only a plain call starts from kept states: one that builds a KV cache (``use_cache`` not
        # False) would miss the skipped blocks' keys and values, and given positions or requested
        # per-block outputs would not be those of the kept states.
        if (ids is None or len(args) > 1 or kwargs.get("use_cache", True) is not False
                or any(kwargs.get(k) is not None for k in _PLAIN_ONLY)
                or kwargs.get("output_hidden_states") or kwargs.get("output_attentions")):
            return None
        mask = kwargs.get("attention_mask")
        lens = [ids.shape[1]] * ids.shape[0] if mask is None else _right_padded_lengths(mask)
        if lens is None:
            return None
        keys = [tuple(ids[i, :n].tolist()) for i, n in enumerate(lens)]
        rows = [self.states.get(k) for k in keys]
        if any(r is None for r in rows):
            if self._record:
                self._missing = [(i, k) for i, (k, r) in enumerate(zip(keys, rows)) if r is None]
            return None
        out = rows[0].new_zeros(len(rows), ids.shape[1], rows[0].shape[-1])
        for i, s in enumerate(rows):
            out[i, : s.shape[0]] = s
        self._rows = out
        return None

    def _end(self, *_):
        self._rows, self._missing = None, []

    def _stub(self, forward, last: bool):
        def run(hidden_states, *args, **kwargs):
            if self._rows is None:
                out = forward(hidden_states, *args, **kwargs)
                if last and self._missing:
                    self._tuple = isinstance(out, tuple)
                    h = out[0] if self._tuple else out
                    for i, key in self._missing:
                        self._keep(key, h[i, : len(key)])
                    self._missing = []
                return out
            h = self._rows.to(hidden_states.dtype) if last else hidden_states
            return (h,) if self._tuple else h
        return run
