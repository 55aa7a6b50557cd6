"""Dataset converters: each public dataset's own raw files -> knowledge samples (``samples-v1``).

One small function per dataset, registered in ``CONVERTERS``. A converter yields one item per
candidate sample it reads (a question, a dialogue turn, an editing case): either the finished
sample dict or a ``Drop`` naming why it was left out. ``convert`` counts rows in / out / dropped
from that stream, so no row can vanish silently and no converter keeps its own tallies.
Malformed input raises ``ConvertError`` (a ``SampleError``) naming the file and the line, record,
turn or field. The rule each converter applies is documented in ``docs/data.md``.
"""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kcache.data.samples import SampleError, read_samples, samples_from_records, write_samples


class ConvertError(SampleError):
    """Raw dataset input that cannot be converted; the message names the file and the record."""


class Drop(NamedTuple):
    """A candidate sample left out, with the reason it is counted under."""

    reason: str


# --------------------------------------------------------------------------- splits

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "dev": "validation",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
}


def normalise_split(split: str) -> str:
    """``dev`` / ``val`` / ``valid`` -> ``validation``; other names are kept (lower-cased)."""
    s = split.strip().lower()
    if not s:
        raise ConvertError("empty --split")
    return _SPLIT_ALIASES.get(s, s)


def infer_split(path: Path) -> str | None:
    """The split a file or folder name announces (``dev.json``, ``folio-validation.jsonl``,
    ``Conversations/valid``), or None when it names none or more than one."""
    name = path.name.lower()
    for ext in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(ext)
    found = {_SPLIT_ALIASES[t] for t in re.split(r"[^a-z0-9]+", name) if t in _SPLIT_ALIASES}
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------- raw readers


def _read_text(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConvertError(f"{path}: line {line}: not valid UTF-8 ({e.reason})") from None


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None


def _jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}: line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
    return out


def _read_records(path: Path, keyed: bool = False) -> list[tuple[str, Any]]:
    """Records of a JSON array, a JSON-lines file or (``keyed``) a JSON object of records, each
    paired with where it came from (``file: line N`` / ``file: record N``) for error messages."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # A JSON array with a syntax error is one document: report its line. Anything else
        # (several values -> "Extra data", or a bad first line) is read as JSON lines.
        if text.lstrip().startswith("["):
            raise ConvertError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
        return _jsonl(path, text)
    if isinstance(doc, list):
        return [(f"{path}: record {i}", r) for i, r in enumerate(doc)]
    if keyed and isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
        return [(f"{path}: record {k!r}", r) for k, r in doc.items()]
    return [(f"{path}: line 1", doc)]  # a JSON-lines file holding one record


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "a boolean"}


def _obj(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ConvertError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _field(rec: Any, key: str, where: str, kind: type | tuple | None = str, optional: bool = False) -> Any:
    value = _obj(rec, where).get(key)
    if value is None:
        if optional:
            return None
        raise ConvertError(f"{where}: missing field '{key}'")
    bad_bool = isinstance(value, bool) and kind is int
    if kind is not None and (bad_bool or not isinstance(value, kind)):
        want = _KIND_NAMES.get(kind, str(kind)) if isinstance(kind, type) else " or ".join(_KIND_NAMES[k] for k in kind)
        raise ConvertError(f"{where}: field '{key}': expected {want}, got {type(value).__name__}")
    return value


def _strings(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConvertError(f"{where}: field '{key}': expected a list of strings")
    return [v.strip() for v in value]


def _truthy(value: Any) -> bool:
    # Curiosity's raw JSON has booleans; its HF copy turned them into "True"/"False" strings.
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


# --------------------------------------------------------------------------- sample helpers


def _sample(dataset: str, split: str, key: str, knowledge: list[str], source: str, target: str,
            meta: dict | None = None, **extra) -> dict:
    rec = {
        "id": f"{dataset}-{split}-{key}",
        "dataset": dataset,
        "split": split,
        "knowledge": knowledge,
        "source": source,
        "target": target,
        **extra,
    }
    meta = {k: v for k, v in (meta or {}).items() if v is not None}
    if meta:
        rec["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    return rec


def _question(text: str) -> str:
    return f"[USR] {text.strip()} [SYS]"


def _dialogue_source(history: list[tuple[bool, str]]) -> str:
    """Earlier turns relative to the target's speaker: theirs ``[SYS]``, the other side's ``[USR]``;
    ends with ``[SYS]`` where the target starts (just ``[SYS]`` for an opening turn)."""
    turns = [f"{'[SYS]' if own else '[USR]'} {text}" for own, text in history]
    return " ".join(turns + ["[SYS]"])


TFU_OPTIONS = [" True", " False", " Unknown"]
_TFU = {"true": 0, "false": 1, "unknown": 2, "uncertain": 2}


def _tfu_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return 0 if value else 1
    if isinstance(value, str) and value.strip().lower() in _TFU:
        return _TFU[value.strip().lower()]
    raise ConvertError(f"{where}: label {value!r} is not True / False / Unknown (or Uncertain)")


# --------------------------------------------------------------------------- converters


_SPEAKERS = {"W": "Woman", "M": "Man"}


def reference_dream_line(line: str) -> str:
    """The reference implementation's speaker names: ``W: …`` -> ``Woman: …``, ``M: …`` -> ``Man: …``."""
    head, sep, rest = line.partition(":")
    return f"{_SPEAKERS[head.strip()]}:{rest}" if sep and head.strip() in _SPEAKERS else line


def dream(path: Path, split: str, reference: bool = False) -> Iterator[dict | Drop]:
    """DREAM ``[lines, [{question, choice, answer}], dialogue_id]`` records.

    ``reference``: the paper's preprocessing - the first question of each dialogue only, no
    fill-in-the-blank questions (``_`` in the question), speakers ``W``/``M`` spelled out."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise ConvertError(f"{path}: expected a JSON list of [dialogue, questions, id] records")
    for i, item in enumerate(data):
        where = f"{path}: record {i}"
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], list) and isinstance(item[2], str)):
            raise ConvertError(f"{where}: expected [dialogue lines, questions, dialogue id]")
        lines = [ln for ln in _strings(item[0], where, "dialogue") if ln]
        if reference:
            lines = [reference_dream_line(ln) for ln in lines]
        did = item[2]
        for qi, q in enumerate(item[1]):
            qwhere = f"{where}: question {qi}"
            question = _field(q, "question", qwhere)
            if reference and qi > 0:
                yield Drop("not the dialogue's first question (reference preprocessing)")
                continue
            if reference and "_" in question:
                yield Drop("fill-in-the-blank question (reference preprocessing)")
                continue
            choices = _strings(_field(q, "choice", qwhere, list), qwhere, "choice")
            answer = _field(q, "answer", qwhere).strip()
            if answer not in choices:
                yield Drop("answer not among choices")
                continue
            label = choices.index(answer)
            options = [" " + c for c in choices]
            yield _sample("dream", split, f"{did}-{qi}", lines, _question(question), options[label],
                          {"dialogue_id": did, "question_index": qi}, options=options, label=label)


_CMU_INTRO_FIELDS = [("director", "Director"), ("genre", "Genre"), ("cast", "Cast"), ("rating", "Rating"),
                     ("introduction", None), ("critical_response", "Critical response")]


def _cmu_section(doc: dict, idx: int, where: str) -> str:
    section = doc.get(str(idx))
    if isinstance(section, str):
        return section.strip()
    if not isinstance(section, dict):
        raise ConvertError(f"{where}: docIdx {idx} has no section \"{idx}\" in the wiki document")
    # Section 0 is structured (name, cast, ratings...): flatten it in a fixed order so the text,
    # and so the output file, is the same on every run.
    def text(v):
        return "; ".join(str(x).strip() for x in v) if isinstance(v, list) else str(v).strip()

    title = text(section.get("movieName", ""))
    if section.get("year"):
        title += f" ({text(section['year'])})"
    parts = [title + "."] if title else []
    known = {"movieName", "year"}
    for key, label in _CMU_INTRO_FIELDS:
        known.add(key)
        if section.get(key):
            parts.append(f"{label}: {text(section[key])}" if label else text(section[key]))
    parts += [f"{k}: {text(section[k])}" for k in sorted(set(section) - known) if section[k]]
    return "\n".join(parts)


def _cmu_dog_dirs(path: Path, split: str) -> tuple[Path, Path]:
    if not path.is_dir():
        raise ConvertError(f"{path}: cmu_dog reads a folder: the dataset root (Conversations/, "
                           "WikiData/) or Conversations/<split>")
    if (path / "Conversations").is_dir():
        conv = path / "Conversations" / {"validation": "valid"}.get(split, split)
        if not conv.is_dir():
            raise ConvertError(f"{path}: no conversations for split {split!r} (expected {conv})")
        return conv, path / "WikiData"
    for root in (path.parent, path.parent.parent):
        if (root / "WikiData").is_dir():
            return path, root / "WikiData"
    raise ConvertError(f"{path}: cannot find the WikiData folder (looked in {path.parent} and {path.parent.parent})")


def cmu_dog(path: Path, split: str) -> Iterator[dict | Drop]:
    """CMU_DoG conversation JSONs + WikiData documents; only rating-3 conversations."""
    conv_dir, wiki_dir = _cmu_dog_dirs(path, split)
    docs: dict[int, tuple[str, dict]] = {}
    for f in sorted(wiki_dir.glob("*.json")):
        doc = _read_json(f)
        idx = _field(doc, "wikiDocumentIdx", str(f), int)
        if idx in docs:
            raise ConvertError(f"{f}: wikiDocumentIdx {idx} also used by {docs[idx][0]}")
        docs[idx] = (f.name, doc)
    files = sorted(conv_dir.glob("*.json"))
    if not files:
        raise ConvertError(f"{conv_dir}: no conversation files (*.json)")
    for f in files:
        conv = _read_json(f)
        where = str(f)
        rating = _field(conv, "rating", where, int)
        history = _field(conv, "history", where, list)
        widx = _field(conv, "wikiDocumentIdx", where, int)
        if widx not in docs:
            raise ConvertError(f"{f}: wikiDocumentIdx {widx} has no document in {wiki_dir}")
        if rating < 3:
            for _ in history:
                yield Drop("conversation rating < 3")
            continue
        doc_name, doc = docs[widx]
        said: list[tuple[str, str]] = []  # (uid, text) of the non-empty turns so far
        for t, turn in enumerate(history):
            twhere = f"{f}: turn {t}"
            text = _field(turn, "text", twhere).strip()
            uid = _field(turn, "uid", twhere)
            doc_idx = _field(turn, "docIdx", twhere, int)
            knowledge = _cmu_section(doc, doc_idx, twhere)
            if not text:
                yield Drop("empty turn")
                continue
            meta = {"conversation": f.stem, "turn": t, "speaker": uid, "wiki_document": doc_name,
                    "doc_idx": doc_idx, "rating": rating, "who_saw_doc": conv.get("whoSawDoc")}
            yield _sample("cmu_dog", split, f"{f.stem}-{t:03d}", [knowledge],
                          _dialogue_source([(u == uid, x) for u, x in said]), " " + text, meta)
            said.append((uid, text))


_REF_RE = re.compile(r"< ref >.*?< \/ ref >")  # leftover wiki markup the Curiosity authors strip on read


def _curiosity_facts(db: Path, fids: set[int], where: str) -> dict[int, str]:
    if not fids:
        return {}
    if not db.exists():
        raise ConvertError(f"{where}: the used facts' texts come from {db} (the published wiki_sql.sqlite.db next to "
                           "the dialogs file), which does not exist")
    out: dict[int, str] = {}
    ids = sorted(fids)
    try:
        con = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            for k in range(0, len(ids), 500):
                chunk = ids[k:k + 500]
                rows = con.execute(f"SELECT id, text FROM fact WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                out.update((int(i), _REF_RE.sub("", t or "").strip()) for i, t in rows)
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ConvertError(f"{db}: cannot read the fact table ({e})") from None
    return out


def curiosity(path: Path, split: str) -> Iterator[dict | Drop]:
    """Curiosity dialogs JSON (``{"dialogs": [...]}``) + ``wiki_sql.sqlite.db`` for fact texts."""
    doc = _read_json(path)
    dialogs = doc if isinstance(doc, list) else _field(doc, "dialogs", str(path), list)
    parsed, fids = [], set()
    for d, dialog in enumerate(dialogs):
        where = f"{path}: dialog {d}"
        did = _field(dialog, "dialog_id", where, (int, str))
        msgs = []
        for m, msg in enumerate(_field(dialog, "messages", where, list)):
            mwhere = f"{where}: message {m}"
            sender = _field(msg, "sender", mwhere)
            if sender not in ("user", "assistant"):
                raise ConvertError(f"{mwhere}: field 'sender': expected 'user' or 'assistant', got {sender!r}")
            shown = _field(msg, "facts", mwhere, list, optional=True) or []
            used = [_field(f, "fid", f"{mwhere}: fact {k}", int) for k, f in enumerate(shown)
                    if _truthy(_obj(f, f"{mwhere}: fact {k}").get("used"))]
            fids.update(used)
            msgs.append((sender, _field(msg, "message", mwhere).strip(), used))
        parsed.append((did, dialog, msgs))
    facts = _curiosity_facts(path.parent / "wiki_sql.sqlite.db", fids, str(path))
    for did, dialog, msgs in parsed:
        said: list[tuple[str, str]] = []
        for m, (sender, text, used) in enumerate(msgs):
            if sender == "user":
                if text:
                    said.append((sender, text))
                continue
            if not text:
                yield Drop("empty message")
                continue
            if any(f not in facts for f in used):
                yield Drop("used fact missing from wiki_sql.sqlite.db")
            else:
                # No fact used: the reply itself is the knowledge. The paper paraphrases it so the
                # target is not a copy of the knowledge; we keep it verbatim and flag it in meta.
                knowledge = [facts[f] for f in used] or [text]
                meta = {"dialog_id": did, "message_index": m, "focus_entity": dialog.get("focus_entity"),
                        "known_entities": dialog.get("known_entities"), "fact_ids": used,
                        "knowledge_is_target": not used}
                yield _sample("curiosity", split, f"{did}-{m:02d}", knowledge,
                              _dialogue_source([(s == "assistant", x) for s, x in said]), " " + text, meta)
            said.append((sender, text))  # a dropped reply was still said: later turns see it


def wizard_of_wikipedia(path: Path, split: str) -> Iterator[dict | Drop]:
    """Wizard of Wikipedia ``data.json`` (or a split file): the wizard's turns are the targets."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise ConvertError(f"{path}: expected a JSON list of dialogs")
    for d, dialog in enumerate(data):
        where = f"{path}: dialog {d}"
        persona = _field(dialog, "persona", where).strip()
        said: list[tuple[bool, str]] = []
        for t, turn in enumerate(_field(dialog, "dialog", where, list)):
            twhere = f"{where}: turn {t}"
            speaker = _field(turn, "speaker", twhere)
            text = _field(turn, "text", twhere).strip()
            wizard = speaker.lower().endswith("wizard")
            if not wizard:
                if text:
                    said.append((False, text))
                continue
            checked = _field(turn, "checked_sentence", twhere, dict, optional=True) or {}
            sentences = [v.strip() for v in checked.values() if isinstance(v, str) and v.strip()
                         and v.strip() != "no_passages_used"]
            if not text:
                yield Drop("empty turn")
                continue
            if not sentences:
                yield Drop("no checked sentence (no_passages_used)")
            else:
                meta = {"dialog_index": d, "turn": t, "chosen_topic": dialog.get("chosen_topic"),
                        "checked_sentence_keys": sorted(checked)}
                yield _sample("wizard_of_wikipedia", split, f"{d:05d}-{t:02d}",
                              ([persona] if persona else []) + sentences, _dialogue_source(said), " " + text, meta)
            said.append((True, text))


def _text_of(value: Any, keys: tuple[str, ...]) -> str | None:
    """First text in a string / object / list of either (HF layouts nest answers and questions)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        for k in keys:
            if isinstance(value.get(k), str) and value[k].strip():
                return value[k].strip()
        return None
    if isinstance(value, list):
        for v in value:
            t = _text_of(v, keys)
            if t:
                return t
    return None


def natural_questions(path: Path, split: str) -> Iterator[dict | Drop]:
    """``cjlovering/natural-questions-short`` rows: ``contexts``, ``questions[0].input_text``,
    ``answers[0].span_text`` (also plain ``question`` / ``context`` / ``short_answer(s)``)."""
    for i, (where, rec) in enumerate(_read_records(path)):
        _obj(rec, where)
        qkey = next((k for k in ("questions", "question") if rec.get(k) is not None), None)
        ckey = next((k for k in ("contexts", "context", "long_answer") if rec.get(k) is not None), None)
        akey = next((k for k in ("answers", "short_answers", "short_answer", "answer") if rec.get(k) is not None), None)
        for key, what in ((qkey, "questions/question"), (ckey, "contexts/context/long_answer"),
                          (akey, "answers/short_answer(s)")):
            if key is None:
                raise ConvertError(f"{where}: missing field '{what}'")
        question = _text_of(rec[qkey], ("input_text", "text"))
        context = _text_of(rec[ckey], ("text", "span_text"))
        answer = _text_of(rec[akey], ("span_text", "text"))
        if not question:
            raise ConvertError(f"{where}: field '{qkey}': no question text")
        if not context:
            yield Drop("no context")
            continue
        if not answer:
            yield Drop("no short answer")
            continue
        key = str(rec["id"]) if rec.get("id") is not None else f"{i:06d}"
        meta = {"has_correct_context": rec.get("has_correct_context"), "record": i}
        yield _sample("natural_questions", split, key, [context], _question(question), " " + answer, meta)


def _quasar_files(path: Path, split: str) -> tuple[Path, Path]:
    stem = {"validation": "dev"}.get(split, split)
    if path.is_dir():
        qdir, cdirs = path / "questions", [path / "contexts" / "short"]
    else:
        stem = re.sub(r"_questions\.json(l)?(\.gz)?$", "", path.name)
        qdir, cdirs = path.parent, [path.parent.parent / "contexts" / "short", path.parent]
    qfile = path if not path.is_dir() else next((qdir / f"{stem}_questions.{e}" for e in ("json", "json.gz", "jsonl")
                                                 if (qdir / f"{stem}_questions.{e}").exists()), None)
    if qfile is None:
        raise ConvertError(f"{path}: no {stem}_questions.json[.gz] under {qdir}")
    for cdir in cdirs:
        for e in ("json", "json.gz", "jsonl"):
            if (cdir / f"{stem}_contexts.{e}").exists():
                return qfile, cdir / f"{stem}_contexts.{e}"
    raise ConvertError(f"{qfile}: no matching short-contexts file {stem}_contexts.json[.gz] (looked in "
                       f"{', '.join(map(str, cdirs))})")


def quasar_t(path: Path, split: str) -> Iterator[dict | Drop]:
    """QUASAR-T ``questions/<split>_questions.json`` + ``contexts/short/<split>_contexts.json``."""
    qfile, cfile = _quasar_files(path, split)
    contexts: dict[str, list[str]] = {}
    for where, rec in _read_records(cfile):
        uid = _field(rec, "uid", where)
        pairs = _field(rec, "contexts", where, list)
        texts = []
        for k, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)):
                raise ConvertError(f"{where}: contexts[{k}]: expected a [score, text] pair")
            texts.append(pair[1].strip())
        if uid in contexts:
            raise ConvertError(f"{where}: uid {uid!r} appears twice")
        contexts[uid] = [t for t in texts if t][:2]  # in the published (retrieval) order
    for where, rec in _read_records(qfile):
        uid = _field(rec, "uid", where)
        question = _field(rec, "question", where)
        answer = _field(rec, "answer", where).strip()
        if not contexts.get(uid):
            yield Drop("no contexts for question")
            continue
        if not answer:
            yield Drop("no answer")
            continue
        yield _sample("quasar_t", split, uid, contexts[uid], _question(question), " " + answer,
                      {"uid": uid, "tags": rec.get("tags")})


_PW_PREFIX = re.compile(
    r"^\s*based on the above information, is the following statement true, false, or (unknown|uncertain)\?\s*", re.I)
_OPTION = re.compile(r"^\s*([A-Za-z])\s*[).:]\s*(.+?)\s*$")


def _proofwriter_reformatted(rec: dict, where: str) -> tuple[str, int]:
    statement = _PW_PREFIX.sub("", _field(rec, "question", where)).strip()
    letters = {}
    for k, opt in enumerate(_strings(_field(rec, "options", where, list), where, "options")):
        m = _OPTION.match(opt)
        if not m:
            raise ConvertError(f"{where}: options[{k}] {opt!r} is not 'X) text'")
        letters[m.group(1).upper()] = _tfu_label(m.group(2), f"{where}: options[{k}]")
    answer = _field(rec, "answer", where).strip().upper()
    if answer not in letters:
        raise ConvertError(f"{where}: answer {answer!r} is not one of the option letters {sorted(letters)}")
    return statement, letters[answer]


def proofwriter(path: Path, split: str) -> Iterator[dict | Drop]:
    """ProofWriter JSON lines (``theory`` + ``questions``), its flat per-question form
    (``theory``, ``question``, ``answer``) or the reformatted ``context/question/options/answer``."""
    for i, (where, rec) in enumerate(_read_records(path)):
        _obj(rec, where)
        rid = str(rec["id"]) if rec.get("id") is not None else f"{i:06d}"
        if "theory" in rec and isinstance(rec.get("questions"), (dict, list)):
            theory = _field(rec, "theory", where).strip()
            qs = rec["questions"]
            items = qs.items() if isinstance(qs, dict) else ((str(q.get("id", k)) if isinstance(q, dict) else str(k),
                                                              q) for k, q in enumerate(qs))
            for qkey, q in items:
                qwhere = f"{where}: question {qkey}"
                text = _field(q, "question" if "question" in _obj(q, qwhere) else "text", qwhere)
                label = _tfu_label(q.get("answer", q.get("label")), qwhere)
                meta = {"record_id": rid, "question_id": qkey, "QDep": q.get("QDep"), "layout": "proofwriter"}
                yield _sample("proofwriter", split, f"{rid}-{qkey}", [theory], _question(text),
                              TFU_OPTIONS[label], meta, options=list(TFU_OPTIONS), label=label)
        elif "theory" in rec and "question" in rec:
            label = _tfu_label(rec.get("answer"), where)
            meta = {"record_id": rid, "QDep": rec.get("QDep"), "layout": "proofwriter-flat"}
            yield _sample("proofwriter", split, rid, [_field(rec, "theory", where).strip()],
                          _question(_field(rec, "question", where)),
                          TFU_OPTIONS[label], meta, options=list(TFU_OPTIONS), label=label)
        elif "context" in rec and "question" in rec:
            statement, label = _proofwriter_reformatted(rec, where)
            meta = {"record_id": rid, "layout": "context-question-options"}
            yield _sample("proofwriter", split, rid, [_field(rec, "context", where).strip()], _question(statement),
                          TFU_OPTIONS[label], meta, options=list(TFU_OPTIONS), label=label)
        else:
            raise ConvertError(f"{where}: neither the ProofWriter layout (theory, "
                               "questions) nor the reformatted one (context, question, options, answer)")


def folio(path: Path, split: str) -> Iterator[dict | Drop]:
    """FOLIO JSON lines: ``premises`` (list, or newline-separated text in later releases),
    ``conclusion``, ``label`` True / False / Uncertain."""
    for i, (where, rec) in enumerate(_read_records(path)):
        premises = _field(rec, "premises", where, (list, str))
        if isinstance(premises, list):
            premises = _strings(premises, where, "premises")
        else:
            premises = [p.strip() for p in premises.split("\n")]
        premises = [p for p in premises if p]
        conclusion = _field(rec, "conclusion", where)
        label = _tfu_label(_field(rec, "label", where), where)
        if not premises:
            yield Drop("no premises")
            continue
        key = str(rec["example_id"]) if rec.get("example_id") is not None else f"{i:04d}"
        meta = {"record": i, "story_id": rec.get("story_id"), "example_id": rec.get("example_id"),
                "conclusion_fol": rec.get("conclusion-FOL")}
        yield _sample("folio", split, key, premises, _question(conclusion), TFU_OPTIONS[label], meta,
                      options=list(TFU_OPTIONS), label=label)


def counterfact(path: Path, split: str) -> Iterator[dict | Drop]:
    """CounterFact: the ROME layout (``requested_rewrite`` + paraphrase / neighbourhood prompts)
    or the stems-only layout (``{stem, true, false: [new], case_id}``)."""
    for where, rec in _read_records(path, keyed=True):
        case_id = _field(rec, "case_id", where, (int, str))
        if "requested_rewrite" in rec:
            rw = _field(rec, "requested_rewrite", where, dict)
            rwhere = f"{where}: requested_rewrite"
            prompt, subject = _field(rw, "prompt", rwhere), _field(rw, "subject", rwhere)
            if "{}" not in prompt:
                raise ConvertError(f"{rwhere}: prompt {prompt!r} has no '{{}}' for the subject")
            source = prompt.replace("{}", subject).strip()
            new = _field(_field(rw, "target_new", rwhere, dict), "str", f"{rwhere}: target_new").strip()
            true = _field(_field(rw, "target_true", rwhere, dict), "str", f"{rwhere}: target_true").strip()
            para = rec.get("paraphrase_prompts")
            neigh = rec.get("neighborhood_prompts")
            paraphrases = None if para is None else _strings(para, where, "paraphrase_prompts")
            neighbours = None if neigh is None else [{"prompt": p, "target": " " + true}
                                                     for p in _strings(neigh, where, "neighborhood_prompts")]
            meta = {"case_id": case_id, "subject": subject, "relation_id": rw.get("relation_id"), "layout": "rome"}
        elif "stem" in rec:
            source = _field(rec, "stem", where).strip()
            true = _field(rec, "true", where).strip()
            false = _strings(_field(rec, "false", where, list), where, "false")
            new = false[0] if false else ""
            paraphrases = neighbours = None
            meta = {"case_id": case_id, "layout": "stems"}
        else:
            raise ConvertError(f"{where}: neither the ROME layout (requested_rewrite) nor the stems "
                               "layout (stem, true, false)")
        if not new:
            yield Drop("no new target")
            continue
        if new == true:
            yield Drop("new target equals the true one")
            continue
        yield _sample("counterfact", split, str(case_id), [f"{source} {new}."], source, " " + new, meta,
                      target_true=" " + true, paraphrases=paraphrases, neighbours=neighbours)


def commonsenseqa(path: Path, split: str) -> Iterator[dict | Drop]:
    """CommonsenseQA JSON lines, HF layout (``question``, ``choices{label,text}``, ``answerKey``)
    or the original one (``question{stem, choices[{label,text}]}``)."""
    for i, (where, rec) in enumerate(_read_records(path)):
        q = _field(rec, "question", where, (str, dict))
        if isinstance(q, dict):  # original release
            stem, concept = _field(q, "stem", f"{where}: question"), q.get("question_concept")
            raw = _field(q, "choices", f"{where}: question", list)
            labels = [_field(c, "label", f"{where}: choices[{k}]") for k, c in enumerate(raw)]
            texts = [_field(c, "text", f"{where}: choices[{k}]") for k, c in enumerate(raw)]
        else:
            stem, concept = q, rec.get("question_concept")
            choices = _field(rec, "choices", where, dict)
            labels = _strings(_field(choices, "label", f"{where}: choices", list), where, "choices.label")
            texts = _strings(_field(choices, "text", f"{where}: choices", list), where, "choices.text")
            if len(labels) != len(texts):
                raise ConvertError(f"{where}: choices: {len(labels)} labels but {len(texts)} texts")
        key = str(rec["id"]) if rec.get("id") is not None else f"{i:05d}"
        answer = (rec.get("answerKey") or "").strip()
        if not answer:
            yield Drop("no answer key")
            continue
        if answer not in labels:
            yield Drop("answer key not among choice labels")
            continue
        label = labels.index(answer)
        options = [" " + t.strip() for t in texts]
        yield _sample("commonsenseqa", split, key, [], _question(stem), options[label],
                      {"question_concept": concept, "choice_labels": labels, "answer_key": answer}, options=options,
                      label=label)


CONVERTERS: dict[str, Callable[[Path, str], Iterable[dict | Drop]]] = {
    "cmu_dog": cmu_dog,
    "curiosity": curiosity,
    "dream": dream,
    "natural_questions": natural_questions,
    "quasar_t": quasar_t,
    "wizard_of_wikipedia": wizard_of_wikipedia,
    "proofwriter": proofwriter,
    "folio": folio,
    "counterfact": counterfact,
    "commonsenseqa": commonsenseqa,
}

# Converters whose raw layout is also the hub layout row by row, so ``hf:NAME`` rows can be
# written out as JSON lines and read by the same code.
HF_READY = {"commonsenseqa", "folio", "natural_questions", "proofwriter", "counterfact"}


# --------------------------------------------------------------------------- driver


def _mean_max(values: list[int]) -> dict:
    return {"mean": round(sum(values) / len(values), 1) if values else 0.0, "max": max(values, default=0)}


@dataclass
class ConvertReport:
    """What one conversion read, wrote and left out (``rows_in == rows_out + sum(dropped)``)."""

    dataset: str
    input: str
    output: str
    split: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    knowledge_chars: dict = field(default_factory=dict)
    source_chars: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _hub_to_jsonl(spec: str, split: str | None, tmp: Path) -> Path:
    name, _, config = spec.partition(":")
    if not split:
        raise ConvertError(f"hf:{spec}: pass --split (the hub split to load)")
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # hub unreachable, unknown name or split: say which
        raise ConvertError(f"hf:{spec}: cannot load split {split!r} ({type(e).__name__}: {e})") from None
    out = tmp / f"{name.replace('/', '__')}-{split}.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        for row in ds:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return out


REFERENCE_READY = ("dream",)  # converters with the paper's own preprocessing (reference=True)


def convert(name: str, input_path: str | Path, out_path: str | Path, split: str | None = None,
            reference: bool = False) -> ConvertReport:
    """Convert dataset ``name`` from its raw files at ``input_path`` (or ``hf:NAME[:CONFIG]``)
    into a samples file ``out_path`` (.parquet or .jsonl). The split is ``split`` when given,
    else the one the input's file or folder name announces (``dev.json`` -> validation).
    ``reference``: the reference implementation's preprocessing (datasets in ``REFERENCE_READY``)."""
    if name not in CONVERTERS:
        raise ConvertError(f"unknown dataset {name!r}; known: {', '.join(sorted(CONVERTERS))}")
    if reference and name not in REFERENCE_READY:
        raise ConvertError(f"{name}: --reference-preprocessing is defined for {', '.join(REFERENCE_READY)} only")
    spec = str(input_path)
    with tempfile.TemporaryDirectory(prefix="kcache-convert-") as tmp:
        if spec.startswith("hf:"):
            if name not in HF_READY:
                raise ConvertError(f"{name}: hf: input is not supported (the hub layout differs from the raw "
                                   "files); download the raw files")
            path = _hub_to_jsonl(spec[3:], split, Path(tmp))
        else:
            path = Path(spec)
            if not path.exists():
                raise ConvertError(f"{path}: no such file or folder")
        resolved = normalise_split(split) if split else infer_split(path)
        if resolved is None:
            raise ConvertError(f"{path}: cannot tell the split from the name '{path.name}'; "
                               "pass --split (train, validation or test)")
        records, dropped, seen, rows_in = [], Counter(), set(), 0
        for item in (CONVERTERS[name](path, resolved, reference=True) if reference
                     else CONVERTERS[name](path, resolved)):
            rows_in += 1
            if isinstance(item, Drop):
                dropped[item.reason] += 1
            elif item["id"] in seen:
                dropped["duplicate id"] += 1
            else:
                seen.add(item["id"])
                records.append(item)
    if rows_in == 0:
        raise ConvertError(f"{spec}: no {name} records found")
    write_samples(samples_from_records(records, f"<{name} from {spec}>"), out_path)
    return ConvertReport(
        dataset=name, input=spec, output=str(out_path), split=resolved, rows_in=rows_in, rows_out=len(records),
        dropped=dict(sorted(dropped.items())),
        knowledge_chars=_mean_max([sum(len(k) for k in r["knowledge"]) for r in records]),
        source_chars=_mean_max([len(r["source"]) for r in records]),
    )


def format_report(r: ConvertReport) -> str:
    lines = [
        f"converted {r.dataset} ({r.split}): {r.input} -> {r.output}",
        f"  rows in   {r.rows_in}",
        f"  rows out  {r.rows_out}",
        f"  dropped   {r.rows_in - r.rows_out}",
    ]
    lines += [f"    {reason}: {n}" for reason, n in r.dropped.items()]
    lines.append(f"  knowledge chars  mean {r.knowledge_chars['mean']}  max {r.knowledge_chars['max']}")
    lines.append(f"  source chars     mean {r.source_chars['mean']}  max {r.source_chars['max']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- stats

_OPTIONAL = ("target_true", "paraphrases", "neighbours", "options", "label", "meta")


def stats(path: str | Path) -> dict:
    """Per (dataset, split): rows, knowledge / source / target lengths, label counts; and how many
    rows carry each optional field."""
    rows = read_samples(path).to_pylist()
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["split"]), []).append(r)
    out_groups = []
    for (ds, split), rs in sorted(groups.items()):
        g = {
            "dataset": ds,
            "split": split,
            "rows": len(rs),
            "knowledge_items": _mean_max([len(r["knowledge"]) for r in rs]),
            "knowledge_chars": _mean_max([sum(len(k) for k in r["knowledge"]) for r in rs]),
            "source_chars": _mean_max([len(r["source"]) for r in rs]),
            "target_chars": _mean_max([len(r["target"]) for r in rs]),
        }
        labelled = [r for r in rs if r.get("label") is not None]
        if labelled:
            # Shared options (True / False / Unknown): count answers by text; per-question
            # options (DREAM, CommonsenseQA): by position, which shows answer-position bias.
            shared = all(r["options"] == labelled[0]["options"] for r in labelled)
            g["labels"] = dict(sorted(Counter(r["options"][r["label"]].strip() if shared else f"#{r['label']}"
                                              for r in labelled).items()))
        out_groups.append(g)
    return {
        "path": str(path),
        "rows": len(rows),
        "groups": out_groups,
        "fields": {f: sum(1 for r in rows if r.get(f) is not None) for f in _OPTIONAL},
        "empty_knowledge": sum(1 for r in rows if not r["knowledge"]),
    }


def format_stats(s: dict) -> str:
    lines = [f"{s['path']}: {s['rows']} samples"]
    for g in s["groups"]:
        lines.append(f"  {g['dataset']} / {g['split']}: {g['rows']} rows")
        for key, label in (("knowledge_items", "knowledge items"), ("knowledge_chars", "knowledge chars"),
                           ("source_chars", "source chars"), ("target_chars", "target chars")):
            lines.append(f"    {label:<16} mean {g[key]['mean']:>9}  max {g[key]['max']:>7}")
        if "labels" in g:
            lines.append("    labels           " + ", ".join(f"{k}: {v}" for k, v in g["labels"].items()))
    present = ", ".join(f"{f} {n}" for f, n in s["fields"].items() if n) or "none"
    lines.append(f"  optional fields present (rows): {present}")
    lines.append(f"  rows with empty knowledge: {s['empty_knowledge']}")
    return "\n".join(lines)
