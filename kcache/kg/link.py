"""Entity linking: words of sample texts -> KG entity ids, with character and token spans.

Linking is per word, over the exact text given (for samples: the ``source`` field, the text the
model reads; any other field with ``text_field``):

1. **Words**: maximal runs of letters (``[^\\W\\d_]+``, inner apostrophes kept, so ``don't`` is one
   word); hyphens, digits and punctuation separate words. A trailing possessive ``'s`` is not
   part of the linked span (``James's`` links ``James``).
2. **Stop words** (:data:`STOPWORDS`: NLTK's English list plus modal verbs and a few function
   words) and one-letter words are skipped; the rest are *content words*.
3. **Matching**, against entity names and aliases, strongest rule first:
   ``exact`` (same string), ``lowercase`` (case-folded), ``morph`` (rule-based lemmatisation:
   WordNet's morphy detachment rules per part of speech — plural ``-s/-es/-ies``, verb
   ``-ed/-ied/-ing/-es``, adjective ``-er/-est/-ier/-iest`` — with doubled-consonant undoubling (``running`` ->
   ``run``) and a small table of irregular forms; a base only matches entities of the rule's
   part of speech when the KG records one, as WN18RR does). WordNet's own lemmatiser data cannot
   be downloaded here, so this is an approximation of ``nltk``'s ``wn.morphy``. Like
   ``wn.synsets()``, the surface form and its morphological bases are *both* looked up
   (``looking`` -> the noun *looking* and the verb *look*); ``rule`` names the strongest rule that
   matched and ``match`` lists the matching forms (``|``-separated).
4. **Candidates**: up to ``k`` entity ids, padded with ``-1``, in a deterministic order: by
   rule (surface matches before morphological bases), then by ``order`` — ``"degree"`` (number of
   triples the entity takes part in, most connected first; a proxy for the most common sense)
   or ``"entity_id"`` — and finally by entity id.
5. **Phrases** (``max_ngram`` > 1, off by default): runs of up to ``max_ngram`` words separated
   by one space or hyphen are looked up first (longest first) as multi-word names
   (``revolving door``, ``New York``), the last word with noun morphology; a matched phrase is one
   row covering its words.

Token spans are computed from the tokenizer's offset mapping over the same text
(``tokenizer(text, add_special_tokens=…, return_offsets_mapping=True)``): ``token_start`` is the
first and ``token_end - 1`` the last token whose character range overlaps the word. With
``add_special_tokens=False`` (the default) indices count from the first token of the text; when
the model input is ``prefix + text`` and the prefix ends at a pre-tokenizer boundary (e.g. a
newline or a space-final separator), shift them by the prefix's token count, or link over the
full input text instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kcache.kg.tables import (
    KG,
    LINKS,
    META_KG_FINGERPRINT,
    META_KG_NAME,
    KGError,
    _meta,
    check_compatible,
    conform,
    read_table_file,
    write_table_atomic,
)

# NLTK's English stop-word list (179 words) + modal verbs and a few function words.
_NLTK_STOPWORDS = """
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves
he him his himself she she's her hers herself it it's its itself they them their theirs themselves
what which who whom this that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over
under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don don't should should've
now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn
hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
"""
_EXTRA_STOPWORDS = """
would could might may must shall also yet though although whether either neither upon onto within
without whose i'm i've i'll i'd we're we've we'll we'd they're they've they'll they'd he'd he'll
she'd she'll it'll can't cannot let's there's here's what's where's who's how's
"""
STOPWORDS: frozenset[str] = frozenset(_NLTK_STOPWORDS.split()) | frozenset(_EXTRA_STOPWORDS.split())

WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")

RULES = ("exact", "lowercase", "morph")
ORDERS = ("degree", "entity_id")

# WordNet morphy detachment rules (morphy(7WN)), per part of speech.
_DETACH = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
             ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", ""),
             ("ied", "y")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e"), ("ier", "y"), ("iest", "y")),
}  # the last rule of verb and adj (-ied, -ier, -iest) extends morphy, standing in for its exception lists
# A small stand-in for WordNet's exception lists (irregular forms), which are not available here.
_IRREGULAR = {
    "noun": {
        "children": "child", "men": "man", "women": "woman", "people": "person", "feet": "foot", "teeth": "tooth",
        "mice": "mouse", "geese": "goose", "oxen": "ox", "wives": "wife", "knives": "knife", "lives": "life",
        "leaves": "leaf", "wolves": "wolf", "halves": "half", "shelves": "shelf", "thieves": "thief", "loaves": "loaf",
    },
    "verb": {
        "went": "go", "gone": "go", "ate": "eat", "eaten": "eat", "saw": "see", "seen": "see", "took": "take",
        "taken": "take", "made": "make", "found": "find", "bought": "buy", "thought": "think", "brought": "bring",
        "came": "come", "ran": "run", "gave": "give", "given": "give", "got": "get", "gotten": "get", "kept": "keep",
        "left": "leave", "felt": "feel", "told": "tell", "said": "say", "knew": "know", "known": "know",
        "wrote": "write", "written": "write", "began": "begin", "begun": "begin", "sat": "sit", "stood": "stand",
        "held": "hold", "lost": "lose", "met": "meet", "paid": "pay", "sold": "sell", "sent": "send", "built": "build",
        "spent": "spend", "caught": "catch", "taught": "teach", "fought": "fight", "fell": "fall", "fallen": "fall",
        "drove": "drive", "driven": "drive", "grew": "grow", "grown": "grow", "threw": "throw", "thrown": "throw",
        "flew": "fly", "flown": "fly", "drew": "draw", "drawn": "draw", "wore": "wear", "worn": "wear",
        "broke": "break", "broken": "break", "chose": "choose", "chosen": "choose", "spoke": "speak",
        "spoken": "speak", "stole": "steal", "stolen": "steal", "woke": "wake", "hid": "hide", "hidden": "hide",
        "rode": "ride", "ridden": "ride", "rose": "rise", "risen": "rise", "sang": "sing", "sung": "sing",
        "swam": "swim", "swum": "swim", "slept": "sleep", "lay": "lie", "lain": "lie", "led": "lead", "fed": "feed",
        "hung": "hang", "shot": "shoot", "struck": "strike", "understood": "understand", "won": "win", "dug": "dig",
        "bit": "bite", "bitten": "bite", "forgot": "forget", "forgotten": "forget", "shook": "shake",
        "shaken": "shake", "heard": "hear", "meant": "mean", "read": "read", "fled": "flee", "done": "do", "did": "do",
        "had": "have", "been": "be", "was": "be", "were": "be",
        "sought": "seek", "bound": "bind", "wound": "wind", "lit": "light", "slid": "slide", "swept": "sweep",
        "wept": "weep", "crept": "creep", "dealt": "deal", "dreamt": "dream", "learnt": "learn", "burnt": "burn",
    },
    "adj": {"better": "good", "best": "good", "worse": "bad", "worst": "bad", "further": "far", "farther": "far",
            "elder": "old", "eldest": "old"},
}
_WN_TYPES = {"noun": "noun", "n": "noun", "verb": "verb", "v": "verb", "adj": "adj", "a": "adj", "s": "adj",
             "adjective": "adj", "adj_sat": "adj"}


def morph_bases(word: str) -> list[tuple[str, str]]:
    """Candidate ``(base, part_of_speech)`` pairs of a lower-case ``word`` (without the word
    itself), in a fixed order: irregular forms, then detachment rules, then undoubled forms."""
    out: list[tuple[str, str]] = []
    for pos in ("noun", "verb", "adj"):
        irr = _IRREGULAR[pos].get(word)
        if irr:
            out.append((irr, pos))
        for suffix, ending in _DETACH[pos]:
            if word.endswith(suffix) and len(word) - len(suffix) + len(ending) >= 2:
                base = word[: len(word) - len(suffix)] + ending
                out.append((base, pos))
                # running -> runn -> run, bigger -> bigg -> big, stopped -> stopp -> stop
                if (ending == "" and suffix in ("ing", "ed", "er", "est") and len(base) >= 3 and base[-1] == base[-2]
                        and base[-1] not in "aeiouslz"):
                    out.append((base[:-1], pos))
    seen, uniq = set(), []
    for b in out:
        if b not in seen and b[0] != word:
            seen.add(b)
            uniq.append(b)
    return uniq


@dataclass(frozen=True)
class Word:
    text: str  # surface text of the span
    start: int
    end: int
    stop: bool  # stop word / too short: not a content word


def split_words(text: str) -> list[Word]:
    """Words of ``text`` with character spans (possessive ``'s`` left out of the span)."""
    out = []
    for m in WORD_RE.finditer(text):
        s, e = m.start(), m.end()
        w = m.group()
        low = w.lower().replace("’", "'")
        if low.endswith("'s") and low not in STOPWORDS and len(w) > 3:
            e -= 2
            w = w[:-2]
            low = low[:-2]
        stop = len(w) < 2 or low in STOPWORDS
        out.append(Word(w, s, e, stop))
    return out


class EntityIndex:
    """Name/alias lookup over a KG's entities (exact and lower-cased)."""

    def __init__(self, kg: KG, order: str = "degree"):
        if order not in ORDERS:
            raise KGError(f"unknown candidate order {order!r}; choose one of {', '.join(ORDERS)}")
        self.kg, self.order = kg, order
        names = kg.entities["name"].to_pylist()
        aliases = kg.entities["aliases"].to_pylist()
        types = kg.entities["type"].to_pylist()
        self.pos = [_WN_TYPES.get((t or "").lower()) for t in types]
        self.typed = any(p is not None for p in self.pos)
        exact: dict[str, set[int]] = {}
        lower: dict[str, set[int]] = {}
        for i, (n, al) in enumerate(zip(names, aliases)):
            for form in [n, *(al or [])]:
                exact.setdefault(form, set()).add(i)
                lower.setdefault(form.lower(), set()).add(i)
        if order == "degree":
            deg = kg.degrees()
            self.rank = np.lexsort((np.arange(kg.num_entities), -deg))  # ids, most connected first
        else:
            self.rank = np.arange(kg.num_entities)
        self.position = np.empty(kg.num_entities, dtype=np.int64)
        self.position[self.rank] = np.arange(kg.num_entities)
        self.exact = {k: sorted(v) for k, v in exact.items()}
        self.lower = {k: sorted(v) for k, v in lower.items()}

    def _sorted(self, ids: Iterable[int]) -> list[int]:
        return sorted(ids, key=lambda i: self.position[i])

    def lookup(self, surface: str, morph: bool = True) -> tuple[str, list[str], list[int]] | None:
        """``(rule, matched forms, ordered candidate ids)`` or ``None``."""
        rule, forms, first = None, [], []
        if surface in self.exact:
            rule, forms, first = "exact", [surface], self.exact[surface]
        elif surface.lower() in self.lower:
            rule, forms, first = "lowercase", [surface.lower()], self.lower[surface.lower()]
        morph_ids: set[int] = set()
        if morph:
            low = surface.lower().replace("’", "'")
            for base, pos in morph_bases(low):
                hits = self.lower.get(base)
                if not hits:
                    continue
                if self.typed:
                    hits = [i for i in hits if self.pos[i] in (pos, None)]
                new = [i for i in hits if i not in first]
                if hits:
                    if base not in forms:
                        forms.append(base)
                    morph_ids.update(new)
        if rule is None and morph_ids:
            rule = "morph"
        if rule is None:
            return None
        return rule, forms, self._sorted(first) + self._sorted(morph_ids)


# ---------------------------------------------------------------------------------------------
# tokenizers


def load_tokenizer(spec: str):
    """A fast Hugging Face tokenizer from a model spec (``smollm2-135m``, a model directory, a
    tokenizer-only directory, a ``.gguf`` file or a hub id — resolved like
    :func:`kcache.models.load_decoder` does)."""
    from transformers import AutoTokenizer

    from kcache.models import _resolve_spec

    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and ((p / "tokenizer.json").exists()
                                                            or (p / "tokenizer_config.json").exists()):
        tok = AutoTokenizer.from_pretrained(p)  # a tokenizer-only directory
    else:
        path, gguf = _resolve_spec(spec)
        tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    if not getattr(tok, "is_fast", False):
        raise KGError(f"tokenizer of {spec!r} is not a fast tokenizer; linking needs its offset mapping")
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise KGError("linking needs a fast (Rust) tokenizer with offset mappings")
    return "sha256:" + hashlib.sha256(backend.to_str().encode()).hexdigest()


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int, _starts: list[int] | None = None,
               _index: list[int] | None = None) -> tuple[int, int]:
    """``[first, last + 1)`` of the tokens whose character range ``[s, e)`` overlaps
    ``[start, end)``; zero-width tokens (special tokens) are never part of a span."""
    if _index is None:
        _index = [i for i, (s, e) in enumerate(offsets) if e > s]
        _starts = [offsets[i][0] for i in _index]
    p = max(bisect_right(_starts, start) - 1, 0)
    while p < len(_index) and offsets[_index[p]][1] <= start:
        p += 1
    q = p
    while q < len(_index) and offsets[_index[q]][0] < end:
        q += 1
    if p >= q:
        raise KGError(f"no token covers characters {start}..{end} (tokenizer offsets do not map back to the text)")
    return _index[p], _index[q - 1] + 1


# ---------------------------------------------------------------------------------------------
# linking


def link_texts(
    ids: Sequence[str],
    texts: Sequence[str],
    kg: KG,
    tokenizer,
    *,
    k: int = 5,
    order: str = "degree",
    morph: bool = True,
    max_ngram: int = 1,
    add_special_tokens: bool = False,
    keep_unlinked: bool = False,
    tokenizer_name: str = "",
    text_field: str = "",
    index: EntityIndex | None = None,
) -> tuple[pa.Table, dict]:
    """Link every text; returns the links table (schema ``kg-links-v1``) and statistics."""
    if k < 1:
        raise KGError(f"k must be at least 1 (got {k})")
    if max_ngram < 1:
        raise KGError(f"max_ngram must be at least 1 (got {max_ngram})")
    if len(ids) != len(texts):
        raise KGError(f"{len(ids)} ids for {len(texts)} texts")
    index = index or EntityIndex(kg, order)
    cols: dict[str, list] = {c: [] for c in ("sample_id", "word", "char_start", "char_end", "token_start", "token_end",
                                             "match", "rule", "num_candidates")}
    cand_rows: list[list[int]] = []
    stats = {"samples": len(texts), "words": 0, "content_words": 0, "linked_content_words": 0, "links": 0,
             "by_rule": {r: 0 for r in RULES}}
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    for sid, text, offsets in zip(ids, texts, enc["offset_mapping"]):
        offsets = [tuple(o) for o in offsets]
        nonempty = [j for j, (a, b) in enumerate(offsets) if b > a]
        starts = [offsets[j][0] for j in nonempty]
        words = split_words(text)
        stats["words"] += len(words)
        stats["content_words"] += sum(not w.stop for w in words)
        i = 0
        while i < len(words):
            hit, n_used = None, 1
            for n in range(min(max_ngram, len(words) - i), 1, -1):
                span = words[i : i + n]
                if span[0].stop or span[-1].stop or any(text[a.end : b.start] not in (" ", "-")
                                                        for a, b in zip(span, span[1:])):
                    continue
                phrase = " ".join(w.text for w in span)
                found = index.lookup(phrase, morph=False)
                if found is None and morph:
                    head = " ".join(w.text.lower() for w in span[:-1])
                    for base, pos in morph_bases(span[-1].text.lower()):
                        if pos == "noun" and (head + " " + base) in index.lower:
                            found = ("morph", [head + " " + base], index._sorted(index.lower[head + " " + base]))
                            break
                if found is not None:
                    hit, n_used = found, n
                    break
            w0, w1 = words[i], words[i + n_used - 1]
            if hit is None and not w0.stop:
                hit = index.lookup(w0.text, morph=morph)
            if hit is not None or (keep_unlinked and not w0.stop):
                start, end = w0.start, w1.end
                t0, t1 = token_span(offsets, start, end, starts, nonempty)
                rule, forms, cands = hit if hit is not None else ("none", [], [])
                cols["sample_id"].append(sid)
                cols["word"].append(text[start:end])
                cols["char_start"].append(start)
                cols["char_end"].append(end)
                cols["token_start"].append(t0)
                cols["token_end"].append(t1)
                cols["match"].append("|".join(forms))
                cols["rule"].append(rule)
                cols["num_candidates"].append(len(cands))
                cand_rows.append((cands[:k] + [-1] * k)[:k])
                if hit is not None:
                    stats["links"] += 1
                    stats["by_rule"][rule] += 1
                    stats["linked_content_words"] += sum(not w.stop for w in words[i : i + n_used])
            i += n_used
    stats["link_rate"] = round(stats["linked_content_words"] / stats["content_words"],
                               6) if stats["content_words"] else 0.0
    flat = np.asarray(cand_rows, dtype=np.int64).reshape(-1)
    table = pa.table({c: pa.array(v, pa.string() if c in ("sample_id", "word", "match", "rule") else pa.int64())
                      for c, v in cols.items()})
    table = table.append_column("entity_ids", pa.FixedSizeListArray.from_arrays(pa.array(flat), k))
    meta = {
        META_KG_NAME: kg.name,
        META_KG_FINGERPRINT: kg.fingerprint,
        "kcache.link.tokenizer": tokenizer_name,
        "kcache.link.tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "kcache.link.text_field": text_field,
        "kcache.link.add_special_tokens": json.dumps(add_special_tokens),
        "kcache.link.k": str(k),
        "kcache.link.order": order,
        "kcache.link.morph": json.dumps(morph),
        "kcache.link.max_ngram": str(max_ngram),
        "kcache.link.stats": json.dumps(stats, sort_keys=True),
    }
    return conform(table, LINKS, "<links>", metadata=meta, k=k), stats


def read_texts(path: str | os.PathLike, text_field: str = "source",
               id_field: str = "id") -> tuple[list[str], list[str]]:
    """``(ids, texts)`` from a samples file (``text_field="source"``: read and validated with
    :func:`kcache.data.samples.read_samples`) or, for any other field, from plain JSON lines or
    Parquet rows (dotted names reach into nested objects: ``question.stem``)."""
    path = Path(path)
    if text_field == "source" and id_field == "id":
        from kcache.data.samples import SampleError, read_samples

        try:
            table = read_samples(path)
        except SampleError as e:
            raise KGError(f"{e}\n(not a samples file? for other JSON lines / Parquet name the text "
                          "column with --text-field)") from None
        return table["id"].to_pylist(), table["source"].to_pylist()
    if not path.exists():
        raise KGError(f"{path}: no such file")
    if path.suffix == ".parquet":
        rows = [(i, r) for i, r in enumerate(read_table_file(path, "input").to_pylist())]
        where = lambda i: f"{path}: row {i}"  # noqa: E731
    else:
        rows = []
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise KGError(f"{path}: line {lineno}: invalid JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise KGError(f"{path}: line {lineno}: expected a JSON object")
                rows.append((lineno, rec))
        where = lambda i: f"{path}: line {i}"  # noqa: E731

    def get(rec: dict, dotted: str, loc: int) -> Any:
        cur: Any = rec
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                raise KGError(f"{where(loc)}: no field {dotted!r}")
            cur = cur[part]
        return cur

    ids, texts, seen = [], [], {}
    for loc, rec in rows:
        sid, text = get(rec, id_field, loc), get(rec, text_field, loc)
        if not isinstance(text, str):
            raise KGError(f"{where(loc)}: field {text_field!r} is not a string")
        sid = str(sid)
        if sid in seen:
            raise KGError(f"{where(loc)}: duplicate {id_field} {sid!r} (first at {seen[sid]})")
        seen[sid] = loc
        ids.append(sid)
        texts.append(text)
    return ids, texts


def link_file(
    samples: str | os.PathLike,
    kg: KG | str | os.PathLike,
    tokenizer: str | Any,
    out: str | os.PathLike | None = None,
    *,
    text_field: str = "source",
    id_field: str = "id",
    **kwargs: Any,
) -> tuple[pa.Table, dict]:
    """Read texts (:func:`read_texts`), link them (:func:`link_texts`) and write ``out``."""
    if not isinstance(kg, KG):
        kg = KG.load(kg)
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", "")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    ids, texts = read_texts(samples, text_field, id_field)
    table, stats = link_texts(ids, texts, kg, tok, tokenizer_name=str(name), text_field=text_field, **kwargs)
    if out is not None:
        write_links(table, out)
    return table, stats


def validate_links(table: pa.Table, where: str, kg: KG | None = None) -> pa.Table:
    idx = table.schema.get_field_index("entity_ids")
    if idx < 0 or not pa.types.is_fixed_size_list(table.schema.field(idx).type):
        raise KGError(f"{where}: not a links table (no fixed_size_list column 'entity_ids')")
    k = table.schema.field(idx).type.list_size
    table = conform(table, LINKS, where, k=k)
    meta = _meta(table)
    if not meta.get(META_KG_FINGERPRINT):
        raise KGError(f"{where}: links carry no KG fingerprint ({META_KG_FINGERPRINT})")
    if kg is not None:
        check_compatible(table, kg, what=(where, f"KG {kg.where}"))
    return table


def write_links(table: pa.Table, path: str | os.PathLike) -> Path:
    return write_table_atomic(validate_links(table, str(path)), path)


def read_links(path: str | os.PathLike, kg: KG | None = None) -> pa.Table:
    """Read and validate a links file; with ``kg``, refuse links of another KG fingerprint."""
    return validate_links(read_table_file(path, "links"), str(path), kg)


def link_stats(table: pa.Table) -> dict:
    return json.loads(_meta(table).get("kcache.link.stats", "{}"))
