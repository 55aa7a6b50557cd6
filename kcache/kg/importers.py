"""Importers: OpenKE layout (WN18RR, FB15k-237 …), WordNet names, word2vec text vectors, and a
numpy matrix + names file (KnowLA's ConceptNet ``ent.npy`` + ``concept.txt``).

Every parse error names the file and the 1-based line. Readers return a :class:`KG` (and
embeddings tables); ``import_*`` functions also write the KG directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from kcache.kg.tables import KG, KGError, embeddings_table, entities_table, relations_table, triples_table

OPENKE_TRIPLE_FILES = (("train", "train2id.txt"), ("valid", "valid2id.txt"), ("test", "test2id.txt"))
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # WordNet adjective position markers: afraid(p)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without the newline); errors on invalid UTF-8 name the line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise KGError(f"{path}: line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise KGError(f"{path}: no such {what} file")
    return path


def _records(path: Path, count: list[int]):
    """The non-blank ``(lineno, line)`` records of an OpenKE file after its count line, streamed (the
    files run to millions of lines); the count is appended to ``count`` when its line is read."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        if not count:
            count.append(_count_header(path, lineno, line))
        else:
            yield lineno, line


def _count_header(path: Path, lineno: int, line: str) -> int:
    try:
        n = int(line.strip())
    except ValueError:
        raise KGError(f"{path}: line {lineno}: expected the record count (OpenKE layout), "
                      f"got {line.strip()[:60]!r}") from None
    if n < 0:
        raise KGError(f"{path}: line {lineno}: negative record count {n}")
    return n


def read_openke_ids(path: str | os.PathLike, what: str) -> list[str]:
    """``entity2id.txt`` / ``relation2id.txt``: count line, then ``key<TAB>id`` lines. Returns the
    keys ordered by id; ids must be exactly ``0..n-1``."""
    path = _require(Path(path), what)
    header: list[int] = []
    by_id, keys_seen = {}, {}
    for lineno, line in _records(path, header):
        parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip():
            raise KGError(f"{path}: line {lineno}: expected '<key><TAB><id>', got {line[:80]!r}")
        key, sid = parts[0].strip(), parts[1].strip()
        try:
            i = int(sid)
        except ValueError:
            raise KGError(f"{path}: line {lineno}: id {sid!r} is not an integer") from None
        if i < 0:
            raise KGError(f"{path}: line {lineno}: negative id {i}")
        if i in by_id:
            raise KGError(f"{path}: line {lineno}: id {i} already used by {by_id[i]!r}")
        if key in keys_seen:
            raise KGError(f"{path}: line {lineno}: key {key!r} already listed on line {keys_seen[key]}")
        by_id[i] = key
        keys_seen[key] = lineno
    if not header:
        raise KGError(f"{path}: empty file (expected the {what} count on line 1)")
    count = header[0]
    if len(by_id) != count:
        raise KGError(f"{path}: line 1 declares {count} {what}s but the file lists {len(by_id)}")
    missing = next((i for i in range(count) if i not in by_id), None)
    if missing is not None:
        raise KGError(f"{path}: ids must be 0..{count - 1}, but id {missing} is missing")
    return [by_id[i] for i in range(count)]


def read_openke_triples(path: str | os.PathLike, num_entities: int, num_relations: int) -> np.ndarray:
    """``train2id.txt``-style file: count line, then ``head tail relation`` (OpenKE order).
    Returns an ``(n, 3)`` int64 array of (head, relation, tail)."""
    path = _require(Path(path), "triples")
    header: list[int] = []
    rows = []
    for lineno, line in _records(path, header):
        parts = line.split()
        if len(parts) != 3:
            raise KGError(f"{path}: line {lineno}: expected 'head tail relation' (3 integer ids), got {line[:80]!r}")
        try:
            h, t, r = (int(p) for p in parts)
        except ValueError:
            raise KGError(f"{path}: line {lineno}: ids must be integers, got {line[:80]!r}") from None
        if not 0 <= h < num_entities:
            raise KGError(f"{path}: line {lineno}: head {h} is not an entity id (0..{num_entities - 1})")
        if not 0 <= t < num_entities:
            raise KGError(f"{path}: line {lineno}: tail {t} is not an entity id (0..{num_entities - 1})")
        if not 0 <= r < num_relations:
            raise KGError(f"{path}: line {lineno}: relation {r} is not a relation id (0..{num_relations - 1})")
        rows.append((h, r, t))
    if not header:
        raise KGError(f"{path}: empty file (expected the triple count on line 1)")
    count = header[0]
    if len(rows) != count:
        raise KGError(f"{path}: line 1 declares {count} triples but the file lists {len(rows)}")
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _surface(lemma: str) -> str:
    return _ADJ_MARKER.sub("", lemma.strip()).replace("_", " ").strip()


def read_entity_names(path: str | os.PathLike) -> dict[str, dict]:
    """A names TSV with a header row: the first column is the entity key (e.g. ``synset_offset``);
    ``lemmas`` (``|``-separated; the first is the name, the others aliases) or ``name`` (+
    optional ``aliases``, ``|``-separated) give surface forms; optional ``gloss``/``description``
    and ``pos``/``type``. Underscores become spaces; WordNet markers such as ``(p)`` are dropped.

    Returns ``{key: {"name", "aliases", "description", "type"}}``.
    """
    path = _require(Path(path), "entity names")
    out: dict[str, dict] = {}
    header = None
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        cells = line.split("\t")
        if header is None:
            header = [c.strip().lower() for c in cells]
            if "lemmas" not in header and "name" not in header:
                raise KGError(f"{path}: line {lineno}: header must name a 'lemmas' or 'name' column, got {header}")
            col = {c: i for i, c in enumerate(header)}
            continue
        if len(cells) != len(header):
            raise KGError(f"{path}: line {lineno}: expected {len(header)} tab-separated columns "
                          f"({', '.join(header)}), got {len(cells)}")
        key = cells[0].strip()
        if not key:
            raise KGError(f"{path}: line {lineno}: empty key")
        if key in out:
            raise KGError(f"{path}: line {lineno}: key {key!r} listed twice")
        if "lemmas" in col:
            forms = [_surface(x) for x in cells[col["lemmas"]].split("|")]
        else:
            forms = [_surface(cells[col["name"]])]
            if "aliases" in col and cells[col["aliases"]].strip():
                forms += [_surface(x) for x in cells[col["aliases"]].split("|")]
        forms = list(dict.fromkeys(f for f in forms if f))
        if not forms:
            raise KGError(f"{path}: line {lineno}: no name for key {key!r}")
        desc_col = col.get("gloss", col.get("description"))
        type_col = col.get("pos", col.get("type"))
        out[key] = {
            "name": forms[0],
            "aliases": forms[1:],
            "description": cells[desc_col].strip() or None if desc_col is not None else None,
            "type": cells[type_col].strip() or None if type_col is not None else None,
        }
    if header is None:
        raise KGError(f"{path}: empty names file")
    return out


def _load_npy(path: Path) -> np.ndarray:
    _require(path, "vectors")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise KGError(f"{path}: cannot read as a .npy array: {e}") from None
    if arr.ndim != 2:
        raise KGError(f"{path}: expected a 2-d (entities x dim) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise KGError(f"{path}: expected float vectors, got dtype {arr.dtype}")
    return arr


def read_openke(
    directory: str | os.PathLike,
    *,
    names: str | os.PathLike | None = "auto",
    name: str | None = None,
) -> KG:
    """Read an OpenKE benchmark directory: ``entity2id.txt``, ``relation2id.txt``,
    ``train2id.txt`` and, when present, ``valid2id.txt`` / ``test2id.txt``.

    ``names``: an entity names TSV (see :func:`read_entity_names`); ``"auto"`` uses
    ``entity_names.tsv`` in the directory when it exists; ``None`` names entities by their key.
    """
    d = Path(directory)
    if not d.is_dir():
        raise KGError(f"{d}: no such OpenKE directory")
    ent_keys = read_openke_ids(d / "entity2id.txt", "entity")
    rel_keys = read_openke_ids(d / "relation2id.txt", "relation")
    parts, splits, files = [], [], []
    for split, fname in OPENKE_TRIPLE_FILES:
        p = d / fname
        if split != "train" and not p.exists():
            continue
        arr = read_openke_triples(p, len(ent_keys), len(rel_keys))
        parts.append(arr)
        splits += [split] * len(arr)
        files.append(fname)
    triples = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    source: dict = {"importer": "openke", "path": str(d), "files": files}
    names_path = d / "entity_names.tsv" if names == "auto" else (Path(names) if names is not None else None)
    if names == "auto" and not names_path.exists():
        names_path = None
    if names_path is not None:
        table = read_entity_names(names_path)
        info = [table.get(k) for k in ent_keys]
        source["names"] = names_path.name
        source["unnamed_entities"] = sum(i is None for i in info)
        ents = entities_table(
            ent_keys,
            [i["name"] if i else k for i, k in zip(info, ent_keys)],
            [i["aliases"] if i else [] for i in info],
            [i["description"] if i else None for i in info],
            [i["type"] if i else None for i in info],
        )
    else:
        ents = entities_table(ent_keys)
    return KG(name or d.name, ents, relations_table(rel_keys),
              triples_table(triples[:, 0], triples[:, 1], triples[:, 2], splits), source, where=str(d))


def vectors_from_npy(path: str | os.PathLike, kg: KG, model: str) -> pa.Table:
    """Embeddings of ``kg`` from an ``(num_entities, d)`` ``.npy`` matrix (row i = entity i)."""
    path = Path(path)
    arr = _load_npy(path)
    if arr.shape[0] != kg.num_entities:
        raise KGError(f"{path}: has {arr.shape[0]} rows but KG {kg.name} has {kg.num_entities} entities "
                      "(row i must be entity i)")
    return embeddings_table(arr, kg=kg, model=model, source=f"npy:{path.name}")


def read_word2vec(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """word2vec text layout: optional ``<count> <dim>`` header, then ``<token> v1 … vd`` lines.
    Tokens contain no spaces (multi-word tokens use ``_``). Returns (tokens, matrix)."""
    path = _require(Path(path), "word2vec vectors")
    tokens, rows, seen = [], [], {}
    dim = declared = None
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        if dim is None and not tokens:
            head = line.split()
            if len(head) == 2 and all(h.isdigit() for h in head):
                declared, dim = int(head[0]), int(head[1])
                continue
            dim = len(head) - 1
            if dim < 1:
                raise KGError(f"{path}: line {lineno}: expected '<token> v1 … vd', got {line[:80]!r}")
        parts = line.split()
        if len(parts) != dim + 1:
            raise KGError(f"{path}: line {lineno}: expected a token and {dim} values, got {len(parts) - 1} values")
        try:
            vec = np.array(parts[1:], dtype=np.float32)
        except ValueError:
            raise KGError(f"{path}: line {lineno}: values must be numbers, got {line[:80]!r}") from None
        tok = parts[0]
        if tok in seen:
            raise KGError(f"{path}: line {lineno}: token {tok!r} already on line {seen[tok]}")
        seen[tok] = lineno
        tokens.append(tok)
        rows.append(vec)
    if dim is None:
        raise KGError(f"{path}: empty vectors file")
    if declared is not None and declared != len(tokens):
        raise KGError(f"{path}: header declares {declared} vectors but the file has {len(tokens)}")
    return tokens, (np.stack(rows) if rows else np.zeros((0, dim), np.float32))


def read_names_file(path: str | os.PathLike) -> list[str]:
    """One name per line (e.g. KnowLA's ConceptNet ``concept.txt``); blank lines are errors."""
    path = _require(Path(path), "names")
    names, seen = [], {}
    for lineno, line in _lines(path):
        key = line.strip()
        if not key:
            raise KGError(f"{path}: line {lineno}: empty name (line i names row i-1 of the matrix)")
        if key in seen:
            raise KGError(f"{path}: line {lineno}: {key!r} already on line {seen[key]}")
        seen[key] = lineno
        names.append(key)
    return names


def _entity_only_kg(keys: list[str], name: str, source: dict, where: str) -> KG:
    ents = entities_table(keys, [k.replace("_", " ").strip() or k for k in keys])
    return KG(name, ents, relations_table([]), triples_table([], [], [], []), source, where=where)


def kg_from_word2vec(path: str | os.PathLike, model: str, name: str | None = None) -> tuple[KG, pa.Table]:
    """An entity-only KG (one entity per token; ``_`` -> space in the name) and its vectors."""
    path = Path(path)
    tokens, mat = read_word2vec(path)
    kg = _entity_only_kg(tokens, name or path.stem, {"importer": "word2vec", "path": str(path)}, str(path))
    return kg, embeddings_table(mat, kg=kg, model=model, source=f"word2vec:{path.name}")


def word2vec_for_kg(path: str | os.PathLike, kg: KG, model: str) -> tuple[pa.Table, int]:
    """Vectors of an existing KG from a word2vec file whose tokens are entity *keys*.
    Returns (embeddings of the matched entities, number of tokens without an entity)."""
    path = Path(path)
    tokens, mat = read_word2vec(path)
    index = {k: i for i, k in enumerate(kg.entities["key"].to_pylist())}
    pairs = sorted((index[t], r) for r, t in enumerate(tokens) if t in index)
    if not pairs:
        raise KGError(f"{path}: no token is an entity key of KG {kg.name}")
    ids = np.array([p[0] for p in pairs], dtype=np.int64)
    rows = np.array([p[1] for p in pairs], dtype=np.int64)
    return embeddings_table(mat[rows], kg=kg, model=model, source=f"word2vec:{path.name}",
                            entity_ids=ids), len(tokens) - len(pairs)


def kg_from_numpy(npy: str | os.PathLike, names_file: str | os.PathLike, model: str,
                  name: str | None = None) -> tuple[KG, pa.Table]:
    """An entity-only KG from a names file (line i = entity i) and an ``(n, d)`` ``.npy`` matrix."""
    npy, names_file = Path(npy), Path(names_file)
    keys = read_names_file(names_file)
    arr = _load_npy(npy)
    if arr.shape[0] != len(keys):
        raise KGError(f"{npy}: has {arr.shape[0]} rows but {names_file} lists {len(keys)} names "
                      "(line i must name row i)")
    kg = _entity_only_kg(keys, name or names_file.stem, {"importer": "numpy", "vectors": str(npy),
                                                         "names": str(names_file)}, str(names_file))
    return kg, embeddings_table(arr, kg=kg, model=model, source=f"npy:{npy.name}")


def _emb_file(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model.lower()).strip("-") + ".parquet"


def import_openke(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    *,
    names: str | os.PathLike | None = "auto",
    name: str | None = None,
    vectors: str | os.PathLike | None = None,
    vectors_model: str | None = None,
) -> KG:
    """:func:`read_openke` and write the KG directory ``out`` (with ``embeddings/<model>.parquet``
    when a ``vectors`` ``.npy`` is given)."""
    kg = read_openke(directory, names=names, name=name)
    emb = {}
    if vectors is not None:
        if not vectors_model:
            raise KGError("--vectors needs the embedding model that produced them (--vectors-model, e.g. transe)")
        emb[_emb_file(vectors_model)] = vectors_from_npy(vectors, kg, vectors_model)
    kg.save(out, emb)
    return kg


def import_word2vec(path: str | os.PathLike, out: str | os.PathLike, *, model: str, name: str | None = None,
                    kg_dir: str | os.PathLike | None = None) -> tuple[KG, pa.Table, int]:
    """Import word2vec vectors: as a new entity-only KG in ``out``, or, with ``kg_dir``, as
    embeddings of that KG (tokens matched to entity keys) written to ``out`` (a file).
    Returns (KG, embeddings, unmatched tokens)."""
    if kg_dir is not None:
        kg = KG.load(kg_dir)
        emb, unmatched = word2vec_for_kg(path, kg, model)
        from kcache.kg.tables import write_embeddings

        write_embeddings(emb, out, kg=kg)
        return kg, emb, unmatched
    kg, emb = kg_from_word2vec(path, model, name)
    kg.save(out, {_emb_file(model): emb})
    return kg, emb, 0


def import_numpy(npy: str | os.PathLike, names_file: str | os.PathLike, out: str | os.PathLike, *, model: str,
                 name: str | None = None) -> tuple[KG, pa.Table]:
    kg, emb = kg_from_numpy(npy, names_file, model, name)
    kg.save(out, {_emb_file(model): emb})
    return kg, emb
