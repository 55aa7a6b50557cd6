"""Generation with injected knowledge, and the side-by-side comparison behind ``kcache generate``.

The prompt is used as the sample's ``source`` (e.g. ``"[USR] What is the capital of Zorbia?
[SYS]"``), the knowledge goes through the bundle's template exactly as in training
(``align.encode_sample`` with the bundle's ``max_length``: over-long knowledge is cut from its
end). Decoding is greedy by default and uses the decoder's KV cache; the encoders keep their own
KV cache, so each new token costs one encoder token (``kcache.inject.Injector.session``).
"""

from __future__ import annotations

import dataclasses
import shutil
import textwrap

from kcache.align import encode_sample
from kcache.inject import Injector, generate_tokens
from kcache.models import Decoder


@dataclasses.dataclass
class Generation:
    """Continuations of one prompt. ``plain``/``in_context`` are ``None`` without ``compare``."""

    prompt: str
    injected: str
    plain: str | None = None
    in_context: str | None = None
    knowledge_tokens: int = 0
    truncated: bool = False
    tokens: dict = dataclasses.field(default_factory=dict)

    def columns(self) -> dict[str, str]:
        cols = {}
        if self.plain is not None:
            cols["D(x): no knowledge"] = _shown(self.plain)
        if self.in_context is not None:
            cols["D(K,x): knowledge in context"] = _shown(self.in_context)
        cols["D(E(K,x)+x): injected"] = _shown(self.injected)
        return cols


def _shown(text: str) -> str:
    """What to print for a continuation; an immediate end of sequence would otherwise be blank."""
    return text if text.strip() else "(no text: the model ended the sequence)"


def generate(decoder: Decoder, injector: Injector, knowledge: list[str] | str, prompt: str, max_new_tokens: int = 48,
             compare: bool = False, **gen_kwargs) -> Generation:
    """Continue ``prompt`` with ``knowledge`` injected by ``injector``; with ``compare`` also
    without knowledge and with the knowledge in context (same template)."""
    if isinstance(knowledge, str):
        knowledge = [knowledge]
    tok = decoder.tokenizer
    info = injector.info
    enc = encode_sample(tok, knowledge, prompt, "", injector.template_spec(), info.max_length)
    if enc.skip_reason:
        raise ValueError(f"cannot use this prompt/knowledge: {enc.skip_reason}")
    k, x = enc.k_ids, enc.x_ids
    out = Generation(prompt, "", knowledge_tokens=len(k), truncated=enc.truncated)
    ids = injector.generate([k], [x], max_new_tokens=max_new_tokens, **gen_kwargs)[0]
    out.tokens["injected"] = ids
    out.injected = tok.decode(ids, skip_special_tokens=True)
    if compare:
        plain = generate_tokens(decoder, [x], max_new_tokens, **gen_kwargs)[0]
        ctx = generate_tokens(decoder, [k + x], max_new_tokens, **gen_kwargs)[0]
        out.tokens["plain"], out.tokens["in_context"] = plain, ctx
        out.plain = tok.decode(plain, skip_special_tokens=True)
        out.in_context = tok.decode(ctx, skip_special_tokens=True)
    return out


def side_by_side(columns: dict[str, str], width: int | None = None) -> str:
    """Columns of wrapped text under their headers, separated by `` │ ``."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    n = max(1, len(columns))
    col = max(16, (width - 3 * (n - 1)) // n)
    wrapped = [[h, "─" * min(col, max(len(h), 8))] + (textwrap.wrap(t.strip(), col) or [""])
               for h, t in columns.items()]
    rows = max(len(w) for w in wrapped)
    lines = []
    for r in range(rows):
        cells = [(w[r] if r < len(w) else "").ljust(col) for w in wrapped]
        lines.append(" │ ".join(cells).rstrip())
    return "\n".join(lines)


def render(g: Generation, width: int | None = None) -> str:
    head = (f"prompt: {g.prompt}\nknowledge: {g.knowledge_tokens} tokens in the prefix"
            + (" (truncated to fit max_length)" if g.truncated else ""))
    if g.plain is None:
        return head + "\n\n" + _shown(g.injected).strip()
    return head + "\n\n" + side_by_side(g.columns(), width)
