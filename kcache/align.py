"""The alignment between the with-knowledge and without-knowledge passes, defined once.

Conventions (see docs/alignment.md for a worked example):

* ``x_ids`` - the input: the tokenizer's normal encoding of ``source + target`` (with BOS if the
  tokenizer adds one). Positions ``j = 0 .. len(x_ids)-1`` are *input positions*.
* ``k_ids`` - the knowledge prefix: template head, knowledge, template tail and an optional end
  token, each encoded separately and concatenated. Pass B runs on ``k_ids + x_ids``.
* ``shift = len(k_ids)``: input position ``j`` sits at position ``shift + j`` in pass B.
* ``delta[l, j] = act_B[l, shift + j] - act_A[l, j]``.

Batched tensors are right-padded: sample ``i`` occupies positions ``0 .. len_i - 1``.
Everything here is pure (no I/O, no model).
"""

from __future__ import annotations

import dataclasses

import torch

DEFAULT_TEMPLATE = "Imagine that { <knowledge> } "
DEFAULT_SEPARATOR = " [SEP] "
KNOWLEDGE_SLOT = "<knowledge>"


# ---------------------------------------------------------------------------------------------
# layers


def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """``"3-8"`` / ``"3,5,7"`` / ``"all"`` / a list -> sorted unique 0-based block indices.

    Raises ``ValueError`` naming the offending index when it is outside ``0..num_layers-1``.
    """
    if isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    else:
        spec = spec.strip().lower()
        if spec == "all":
            return list(range(num_layers))
        layers = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                try:
                    lo, hi = int(a), int(b)
                except ValueError:
                    raise ValueError(f"--layers: cannot parse {part!r} (use e.g. 3-8, 3,5,7 or all)") from None
                if hi < lo:
                    raise ValueError(f"--layers: empty range {part!r}")
                layers.extend(range(lo, hi + 1))
            else:
                try:
                    layers.append(int(part))
                except ValueError:
                    raise ValueError(f"--layers: cannot parse {part!r} (use e.g. 3-8, 3,5,7 or all)") from None
    if not layers:
        raise ValueError("--layers: no layers given")
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"--layers: layer {bad[0]} out of range; this model has layers 0..{num_layers - 1}")
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------------
# tokenisation of one sample


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """How knowledge becomes the prefix ``k_ids``.

    ``template`` contains ``<knowledge>`` once; text before it is the head, after it the tail.
    ``end``: ``"eos"`` appends the tokenizer's EOS (the reference implementation does this so
    x keeps its own BOS), ``"none"`` appends nothing.
    """

    template: str = DEFAULT_TEMPLATE
    separator: str = DEFAULT_SEPARATOR
    end: str = "eos"

    def __post_init__(self):
        if self.template.count(KNOWLEDGE_SLOT) != 1:
            raise ValueError(f"template must contain {KNOWLEDGE_SLOT!r} exactly once: {self.template!r}")
        if self.end not in ("eos", "none"):
            raise ValueError(f"template end must be 'eos' or 'none', not {self.end!r}")

    @property
    def head(self) -> str:
        return self.template.split(KNOWLEDGE_SLOT)[0]

    @property
    def tail(self) -> str:
        return self.template.split(KNOWLEDGE_SLOT)[1]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One sample, tokenised. ``skip_reason`` is set (and ids empty) when it cannot be used."""

    k_ids: list[int]
    x_ids: list[int]
    target_mask: list[bool]  # per input position: is it a target token?
    truncated: bool = False
    knowledge_tokens_dropped: int = 0
    skip_reason: str | None = None

    @property
    def shift(self) -> int:
        return len(self.k_ids)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_input(tokenizer, source: str, target: str) -> tuple[list[int], list[bool]]:
    """``x_ids`` of ``source + target`` with the tokenizer's usual specials, and the target mask.

    A token is a target token when its character span reaches into ``target`` (offset mapping of
    the fast tokenizer), so a token straddling the boundary counts as target.
    """
    enc = tokenizer(source + target, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    n_src = len(source)
    mask = [bool(end > n_src and end > start) for start, end in enc["offset_mapping"]]
    return ids, mask


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's normal encoding starts with its BOS token (LLaMA-2: yes, SmolLM2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def prefix_parts(tokenizer, spec: TemplateSpec) -> tuple[list[int], list[int], str]:
    """(ids before the knowledge, ids after it, whitespace that starts the knowledge text).

    The same for every sample of a template: loops over samples compute it once and pass it as
    ``prefix`` (three quarters of the tokenizer calls per sample otherwise)."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    # Pieces are encoded separately; whitespace at a piece boundary goes to the start of the next
    # piece ("{" + " The") as joint tokenisation would do, rather than becoming a lone " " token.
    head_text = spec.head.rstrip()
    tail_text = spec.tail.rstrip() if spec.end == "eos" else spec.tail
    end = [tokenizer.eos_token_id] if spec.end == "eos" else []
    return bos + _ids(tokenizer, head_text), _ids(tokenizer, tail_text) + end, spec.head[len(head_text):]


def encode_knowledge(tokenizer, knowledge: list[str], spec: TemplateSpec,
                     max_knowledge_tokens: int | None = None, prefix=None) -> tuple[list[int], int]:
    """``k_ids`` for a knowledge list and how many knowledge tokens were cut to fit the budget.

    Layout: ``[BOS if the tokenizer adds one] + head + knowledge[:budget] + tail + [EOS if end=eos]``.
    The head's trailing whitespace is encoded with the knowledge (``"Imagine that {"`` +
    ``" The capital…"``); with ``end="eos"`` the tail's trailing whitespace is dropped (EOS ends
    the prefix). Knowledge is cut from its end; head and tail are always kept.
    """
    before, after, lead = prefix or prefix_parts(tokenizer, spec)
    body = _ids(tokenizer, lead + spec.separator.join(knowledge)) if knowledge else []
    dropped = 0
    if max_knowledge_tokens is not None and len(body) > max_knowledge_tokens:
        dropped = len(body) - max(0, max_knowledge_tokens)
        body = body[: max(0, max_knowledge_tokens)]
    return before + body + after, dropped


def scaffold_length(tokenizer, spec: TemplateSpec, prefix=None) -> int:
    """Tokens the prefix needs besides the knowledge itself."""
    before, after, _ = prefix or prefix_parts(tokenizer, spec)
    return len(before) + len(after)


def encode_sample(tokenizer, knowledge: list[str], source: str, target: str, spec: TemplateSpec,
                  max_length: int, prefix=None) -> Encoded:
    """Tokenise one sample under ``len(k_ids) + len(x_ids) <= max_length``.

    ``prefix``: ``prefix_parts(tokenizer, spec)`` when the caller encodes many samples.

    Knowledge tokens are cut to fit, never input tokens. Skips (with a reason): empty knowledge,
    empty source, an input that alone exceeds ``max_length``, or no room left for any knowledge.
    """
    if not any(k.strip() for k in knowledge):
        return Encoded([], [], [], skip_reason="empty knowledge")
    if not source.strip():
        return Encoded([], [], [], skip_reason="empty source")
    x_ids, tmask = encode_input(tokenizer, source, target)
    if len(x_ids) > max_length:
        return Encoded([], [], [], skip_reason=f"input alone has {len(x_ids)} tokens > max_length {max_length}")
    prefix = prefix or prefix_parts(tokenizer, spec)
    budget = max_length - len(x_ids) - scaffold_length(tokenizer, spec, prefix)
    if budget < 1:
        return Encoded([], [], [], skip_reason=f"no room for knowledge: input {len(x_ids)} tokens + template leaves "
                                               f"{budget} of max_length {max_length}")
    k_ids, dropped = encode_knowledge(tokenizer, knowledge, spec, budget, prefix)
    return Encoded(k_ids, x_ids, tmask, truncated=dropped > 0, knowledge_tokens_dropped=dropped)


def loss_mask(x_len: int, skip_first: bool, sink: int = 0) -> list[bool]:
    """Input positions that count in the stage-two loss: all of them, all but position 0
    (``skip_first`` - a leading BOS, whose delta is dominated by attention-sink activations), and
    never the first ``sink`` positions (``sink_keep``: nothing is written there)."""
    return [not (skip_first and j == 0) and j >= sink for j in range(x_len)]


# ---------------------------------------------------------------------------------------------
# what the cache's targets are, and the positions nothing is ever written to

TARGETS = ("independent", "cascade", "distilled")
DEFAULT_TARGETS = "cascade"
DEFAULT_SINK = 1


def targets_of(settings: dict) -> str:
    """The target kind of a cache or bundle (``settings["targets"]``); caches and bundles written
    before targets were recorded hold independent targets."""
    return settings.get("targets", "independent")


def sink_of(settings: dict) -> int:
    """Leading input positions a cache or bundle never writes (``settings["sink"]``); 0 for older ones."""
    return int(settings.get("sink", 0))


def sink_keep(positions: torch.Tensor, sink: int) -> torch.Tensor:
    """Bool mask, same shape as ``positions`` (input positions ``j``): ``j >= sink``.

    The first input position is the attention sink of ``D(x)`` (a model without BOS sinks on x's
    first token; one with BOS on the BOS). In ``D(K, x)`` that token sits mid-sequence and is no
    sink, so writing its with-knowledge state there breaks every later layer. With ``sink = 1``
    extraction stores zeros there, the loss skips it and injection adds nothing there.
    """
    return positions >= sink


def input_keep(x_lens: torch.Tensor, length: int, sink: int) -> torch.Tensor:
    """(B, length) bool: real input positions that may be written (``sink <= j < x_len``)."""
    x_lens = torch.as_tensor(x_lens)
    j = torch.arange(length, device=x_lens.device)[None, :]
    return (j < x_lens[:, None]) & sink_keep(j, sink)


# ---------------------------------------------------------------------------------------------
# shifts (batched, right-padded)


def shift_index(shifts: torch.Tensor, length: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length) positions ``shifts[i] + j`` on knowledge+input positions (clamped to ``seq - 1``)
    and whether each falls inside ``seq``: where ``shift_left`` reads from."""
    idx = shifts[:, None] + torch.arange(length, device=shifts.device)[None, :]
    return idx.clamp(max=seq - 1), idx < seq


def shift_left(t: torch.Tensor, shifts: torch.Tensor | int, length: int | None = None) -> torch.Tensor:
    """Align sequence ``t`` (B, L, ...) on knowledge+input positions to input positions.

    ``out[i, j] = t[i, shifts[i] + j]`` for ``j < length`` (default ``L - min(shifts)``); positions
    that fall past ``L`` are zero. This is DIEKÆ's ``shift_left(E(K, x), |K|)``: the first
    ``|K|`` positions are discarded.
    """
    b, seq = t.shape[0], t.shape[1]
    if isinstance(shifts, int):
        shifts = torch.full((b,), shifts, dtype=torch.long, device=t.device)
    shifts = shifts.to(device=t.device, dtype=torch.long)
    if length is None:
        length = seq - int(shifts.min()) if b else 0
    idx, valid = shift_index(shifts, length, seq)
    gather_idx = idx.view(b, length, *([1] * (t.dim() - 2))).expand(b, length, *t.shape[2:])
    out = torch.gather(t, 1, gather_idx)
    return out * valid.view(b, length, *([1] * (t.dim() - 2))).to(out.dtype)


def shift_right(t: torch.Tensor, shifts: torch.Tensor | int, length: int | None = None) -> torch.Tensor:
    """Inverse of ``shift_left``: ``out[i, shifts[i] + j] = t[i, j]``, zeros elsewhere.

    DIEKÆ's ``shift_right(o(x), |K|)``; the ``|K|`` missing positions are not part of any loss.
    ``length`` defaults to ``L + max(shifts)``.
    """
    b, seq = t.shape[0], t.shape[1]
    if isinstance(shifts, int):
        shifts = torch.full((b,), shifts, dtype=torch.long, device=t.device)
    shifts = shifts.to(device=t.device, dtype=torch.long)
    if length is None:
        length = seq + (int(shifts.max()) if b else 0)
    out = t.new_zeros((b, length, *t.shape[2:]))
    idx = shifts[:, None] + torch.arange(seq, device=t.device)[None, :]
    keep = idx < length
    rows = torch.arange(b, device=t.device)[:, None].expand(b, seq)
    out[rows[keep], idx[keep]] = t[keep]
    return out


def length_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B, max_len) bool: position ``j`` of sample ``i`` is real (``j < lengths[i]``)."""
    lengths = torch.as_tensor(lengths)
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> (ids (B, L) long, attention mask (B, L) long)."""
    n = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# batching


def plan_batches(lengths: list[int], token_budget: int, order: list[int] | None = None) -> list[list[int]]:
    """Greedy length-bucketed batches: walk ``order`` (default: sorted by length) and start a new
    batch when ``(n + 1) * max_len`` would exceed ``token_budget``. A lone over-budget sample still
    gets its own batch. Returns lists of indices into ``lengths``."""
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and (len(cur) + 1) * new_max > token_budget:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches
