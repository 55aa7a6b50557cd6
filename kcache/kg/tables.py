"""Knowledge-graph tables as Arrow, the KG directory, embeddings and fingerprints.

A KG directory holds ``entities.parquet``, ``relations.parquet``, ``triples.parquet`` (schemas
``schemas/kg-{entities,relations,triples}-v1.json``) and a JSON manifest ``kg.json``
(``schemas/kg-manifest-v1.json``) with the KG fingerprint: a sha256 over the *content* of the
three tables (column by column, independent of Parquet encoding and Arrow chunking).

Entity and relation ids are dense: row ``i`` has id ``i``. That makes an embedding matrix row
``i`` the vector of entity ``i``.

Embedding tables (``schemas/kg-embeddings-v1.json``) map ``entity_id`` to a
``fixed_size_list<float32>[dim]`` and carry, in the Arrow/Parquet schema metadata, the KG name and
fingerprint and the embedding model. :func:`embeddings_to_torch` turns the vectors into a torch
tensor without copying (``torch.from_numpy`` over the Arrow values buffer).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kcache._io import atomic_path, atomic_write_json, read_json
from kcache.schemas import SchemaError, _parse_type, load_schema, validate_document

ENTITIES = "kg-entities-v1"
RELATIONS = "kg-relations-v1"
TRIPLES = "kg-triples-v1"
EMBEDDINGS = "kg-embeddings-v1"
LINKS = "kg-links-v1"
MANIFEST = "kg-manifest-v1"

MANIFEST_FILE = "kg.json"
TABLE_FILES = {"entities": "entities.parquet", "relations": "relations.parquet", "triples": "triples.parquet"}
SPLITS = ("train", "valid", "test")

# schema-metadata keys (bytes in Arrow, str here)
META_KG_NAME = "kcache.kg.name"
META_KG_FINGERPRINT = "kcache.kg.fingerprint"
META_EMB_MODEL = "kcache.embedding.model"
META_EMB_DIM = "kcache.embedding.dim"
META_EMB_SOURCE = "kcache.embedding.source"
META_EMB_PARAMS = "kcache.embedding.params"


from kcache.errors import KCacheError  # noqa: E402


class KGError(KCacheError, ValueError):
    """Bad KG input or table; the message names the file (and line or row where it applies)."""


class KGCompatibilityError(KGError):
    """Two artefacts (links, embeddings, KG) were built from KGs with different fingerprints."""


# ---------------------------------------------------------------------------------------------
# schemas


@functools.cache
def table_schema(name: str, **params: int) -> pa.Schema:
    """The ``pyarrow.Schema`` of KG table schema ``name``; ``params`` fill ``{dim}``/``{k}``.

    Like :func:`kcache.schemas.arrow_schema`, but for the parameterised tables (embeddings: the
    vector width, links: the candidate count) that ``arrow_schema`` cannot build alone.
    """
    doc = load_schema(name)
    if doc.get("kind") != "arrow-table":
        raise SchemaError(f"schema {name} is not an arrow-table schema")
    needed = set(doc.get("parameters", []))
    if needed != set(params):
        raise SchemaError(f"schema {name} takes parameters {sorted(needed)}, got {sorted(params)}")
    fields = []
    for f in doc["fields"]:
        t = f["type"]
        for k, v in params.items():
            t = t.replace("{" + k + "}", str(int(v)))
        fields.append(pa.field(f["name"], _parse_type(t), nullable=not f.get("required", False)))
    return pa.schema(fields, metadata={"kcache.schema": doc["name"], "kcache.schema_version": str(doc["version"])})


def _meta(table: pa.Table | pa.Schema) -> dict[str, str]:
    schema = table.schema if isinstance(table, pa.Table) else table
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def conform(table: pa.Table, name: str, where: str, *, metadata: Mapping[str, str] | None = None,
            **params: int) -> pa.Table:
    """Check ``table`` against schema ``name`` and return it with the canonical schema.

    Checks the ``kcache.schema``/``kcache.schema_version`` metadata when present (it is always
    present in files kcache wrote), that every required field is there with the declared type and
    no nulls, and that there are no unknown fields. Missing optional fields are added as nulls.
    Extra schema metadata (``kcache.kg.*`` …) is kept; ``metadata`` adds or overrides keys.
    """
    schema = table_schema(name, **params)
    meta = _meta(table)
    want_name = schema.metadata[b"kcache.schema"].decode()
    want_version = schema.metadata[b"kcache.schema_version"].decode()
    if "kcache.schema" in meta and (meta["kcache.schema"],
                                    meta.get("kcache.schema_version")) != (want_name, want_version):
        raise KGError(
            f"{where}: is a {meta['kcache.schema']} v{meta.get('kcache.schema_version')} table, "
            f"expected {want_name} v{want_version}"
        )
    unknown = [c for c in table.column_names if schema.get_field_index(c) < 0]
    if unknown:
        raise KGError(f"{where}: unknown column(s) {unknown} for schema {name}")
    cols = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise KGError(f"{where}: missing required column '{field.name}' (schema {name})")
            cols.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table[field.name]
        if col.type != field.type:
            raise KGError(f"{where}: column '{field.name}' has type {col.type}, schema {name} wants {field.type}")
        if str(col.type) != str(field.type):  # same type, other list item name (Parquet says 'element')
            col = col.cast(field.type)
        if not field.nullable and col.null_count:
            row = pc.index(pc.is_null(col), True).as_py()
            raise KGError(f"{where}: row {row}: column '{field.name}' is null (required)")
        cols.append(col)
    meta.update(metadata or {})
    meta.update({k.decode(): v.decode() for k, v in schema.metadata.items()})
    return pa.Table.from_arrays(cols, schema=schema.with_metadata(meta))


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write Parquet (or Arrow IPC for ``.arrow``) via a temporary file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix == ".arrow":
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        else:
            pq.write_table(table, tmp)
    return path


def read_table_file(path: str | os.PathLike, what: str) -> pa.Table:
    """Read a Parquet file, or an Arrow IPC file (``.arrow``, memory-mapped: zero-copy)."""
    path = Path(path)
    if not path.exists():
        raise KGError(f"{path}: no such {what} file")
    try:
        if path.suffix == ".arrow":
            return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise KGError(f"{path}: cannot read {what} table: {e}") from None


# ---------------------------------------------------------------------------------------------
# fingerprints


def _hash_array(h: hashlib._Hash, arr: pa.Array | pa.ChunkedArray) -> None:
    """Feed a canonical, chunking- and encoding-independent serialisation of ``arr`` to ``h``."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    t = arr.type
    if pa.types.is_integer(t):
        kind = "int"
    elif pa.types.is_floating(t):
        kind = "float"
    else:
        kind = "str" if pa.types.is_string(t) or pa.types.is_large_string(t) else "list"
    h.update(f"<{kind}:{len(arr)}>".encode())  # not str(type): list field names change on Parquet round trips
    if arr.null_count:
        h.update(b"V" + np.packbits(np.asarray(arr.is_valid(), dtype=bool)).tobytes())
    if pa.types.is_integer(t):
        h.update(np.ascontiguousarray(arr.fill_null(0).to_numpy(zero_copy_only=False), dtype="<i8").tobytes())
    elif pa.types.is_floating(t):
        h.update(np.ascontiguousarray(arr.fill_null(0).to_numpy(zero_copy_only=False), dtype="<f8").tobytes())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        filled = arr.fill_null("").cast(pa.large_string())
        offsets = np.frombuffer(filled.buffers()[1], dtype="<i8")[filled.offset : filled.offset + len(filled) + 1]
        h.update(np.diff(offsets).astype("<i8").tobytes())
        if len(filled) and offsets[-1] > offsets[0]:
            h.update(memoryview(filled.buffers()[2])[offsets[0] : offsets[-1]])
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        h.update(np.ascontiguousarray(pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False),
                                      dtype="<i8").tobytes())
        _hash_array(h, arr.flatten())
    else:  # pragma: no cover - not used by the KG schemas
        raise KGError(f"cannot fingerprint a column of type {t}")


def content_fingerprint(entities: pa.Table, relations: pa.Table, triples: pa.Table) -> str:
    """``sha256:…`` over the content of the three KG tables (every schema field, in order)."""
    h = hashlib.sha256(b"kcache-kg-fingerprint-v1\n")
    for label, table, name in (("entities", entities, ENTITIES), ("relations", relations, RELATIONS),
                               ("triples", triples, TRIPLES)):
        h.update(f"[{label}:{table.num_rows}]".encode())
        for field in table_schema(name):
            h.update(f"{field.name}=".encode())
            col = table[field.name] if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
            _hash_array(h, col)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------
# builders


def entities_table(
    keys: list[str],
    names: list[str] | None = None,
    aliases: list[list[str]] | None = None,
    descriptions: list[str | None] | None = None,
    types: list[str | None] | None = None,
) -> pa.Table:
    """Entities with dense ids ``0..n-1`` in the given order; ``names`` default to the keys."""
    n = len(keys)
    cols = {
        "entity_id": pa.array(np.arange(n, dtype=np.int64)),
        "key": pa.array(keys, pa.string()),
        "name": pa.array(names if names is not None else keys, pa.string()),
        "aliases": pa.array(aliases if aliases is not None else [[] for _ in range(n)], pa.list_(pa.string())),
        "description": pa.array(descriptions if descriptions is not None else [None] * n, pa.string()),
        "type": pa.array(types if types is not None else [None] * n, pa.string()),
    }
    return conform(pa.table(cols), ENTITIES, "<entities>")


def relations_table(keys: list[str], names: list[str] | None = None) -> pa.Table:
    """Relations with dense ids ``0..n-1``; names default to the keys without leading ``_`` and
    with ``_`` turned into spaces (``_hypernym`` -> ``hypernym``)."""
    if names is None:
        names = [k.lstrip("_").replace("_", " ") or k for k in keys]
    cols = {
        "relation_id": pa.array(np.arange(len(keys), dtype=np.int64)),
        "key": pa.array(keys, pa.string()),
        "name": pa.array(names, pa.string()),
    }
    return conform(pa.table(cols), RELATIONS, "<relations>")


def triples_table(head: Any, relation: Any, tail: Any, split: Any = "train") -> pa.Table:
    """Triples from id sequences/arrays; ``split`` is one value for all rows or a sequence."""
    head = np.asarray(head, dtype=np.int64)
    n = len(head)
    if isinstance(split, str):
        split_arr = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)),
                                                   pa.array([split])).cast(pa.string())
    else:
        split_arr = pa.array(list(split), pa.string())
    cols = {
        "head": pa.array(head),
        "relation": pa.array(np.asarray(relation, dtype=np.int64)),
        "tail": pa.array(np.asarray(tail, dtype=np.int64)),
        "split": split_arr,
    }
    return conform(pa.table(cols), TRIPLES, "<triples>")


# ---------------------------------------------------------------------------------------------
# the KG


def _check_dense(table: pa.Table, col: str, where: str) -> None:
    ids = table[col].to_numpy()
    if len(ids) and not np.array_equal(ids, np.arange(len(ids), dtype=np.int64)):
        bad = int(np.nonzero(ids != np.arange(len(ids)))[0][0])
        raise KGError(f"{where}: row {bad}: {col} is {int(ids[bad])}, "
                      f"expected {bad} (ids must be dense, row i has id i)")


def _check_unique(table: pa.Table, col: str, where: str) -> None:
    values = table[col]
    if pc.count_distinct(values).as_py() != len(values):
        counts = pc.value_counts(values)
        dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise KGError(f"{where}: duplicate {col} {dup!r}")


@dataclasses.dataclass
class KG:
    """A knowledge graph: entities, relations and triples tables (validated on construction)."""

    name: str
    entities: pa.Table
    relations: pa.Table
    triples: pa.Table
    source: dict = dataclasses.field(default_factory=dict)
    where: str = "<memory>"
    embedding_files: list = dataclasses.field(default_factory=list, repr=False)  # set by load()

    def __post_init__(self):
        self.entities = conform(self.entities, ENTITIES, f"{self.where}: entities")
        self.relations = conform(self.relations, RELATIONS, f"{self.where}: relations")
        self.triples = conform(self.triples, TRIPLES, f"{self.where}: triples")
        _check_dense(self.entities, "entity_id", f"{self.where}: entities")
        _check_dense(self.relations, "relation_id", f"{self.where}: relations")
        _check_unique(self.entities, "key", f"{self.where}: entities")
        _check_unique(self.relations, "key", f"{self.where}: relations")
        ne, nr = self.num_entities, self.num_relations
        for col, n, what in (("head", ne, "entity"), ("tail", ne, "entity"), ("relation", nr, "relation")):
            v = self.triples[col].to_numpy()
            bad = np.nonzero((v < 0) | (v >= n))[0]
            if len(bad):
                raise KGError(f"{self.where}: triples: row {int(bad[0])}: "
                              f"{col} {int(v[bad[0]])} is not a {what} id (0..{n - 1})")
        splits = set(pc.unique(self.triples["split"]).to_pylist())
        if not splits <= set(SPLITS):
            raise KGError(f"{self.where}: triples: unknown split(s) {sorted(splits - set(SPLITS))} "
                          f"(expected {', '.join(SPLITS)})")

    @property
    def num_entities(self) -> int:
        return self.entities.num_rows

    @property
    def num_relations(self) -> int:
        return self.relations.num_rows

    @property
    def num_triples(self) -> int:
        return self.triples.num_rows

    @functools.cached_property
    def fingerprint(self) -> str:
        return content_fingerprint(self.entities, self.relations, self.triples)

    def split_counts(self) -> dict[str, int]:
        counts = {d["values"]: d["counts"] for d in pc.value_counts(self.triples["split"]).to_pylist()}
        return {s: counts[s] for s in SPLITS if s in counts}

    def train_triples(self) -> np.ndarray:
        """``(n, 3)`` int64 array of (head, relation, tail) of the train split."""
        t = self.triples.filter(pc.equal(self.triples["split"], "train"))
        return np.stack([t["head"].to_numpy(), t["relation"].to_numpy(), t["tail"].to_numpy()], axis=1)

    def degrees(self) -> np.ndarray:
        """Number of triples (all splits) each entity takes part in, as head or tail."""
        deg = np.bincount(self.triples["head"].to_numpy(), minlength=self.num_entities)
        return deg + np.bincount(self.triples["tail"].to_numpy(), minlength=self.num_entities)

    def manifest(self, embeddings: Iterable[str] = ()) -> dict:
        doc = {
            "format": "kcache-kg",
            "version": 1,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "counts": {"entities": self.num_entities, "relations": self.num_relations, "triples": self.num_triples,
                       "splits": self.split_counts()},
            "files": dict(TABLE_FILES),
        }
        embeddings = sorted(embeddings)
        if embeddings:
            doc["embeddings"] = embeddings
        return doc

    def tag(self, table: pa.Table) -> pa.Table:
        """``table`` with this KG's name and fingerprint in its schema metadata."""
        meta = _meta(table)
        meta.update({META_KG_NAME: self.name, META_KG_FINGERPRINT: self.fingerprint})
        return table.replace_schema_metadata(meta)

    def save(self, directory: str | os.PathLike, embeddings: Mapping[str, pa.Table] | None = None) -> Path:
        """Write the KG directory (tables first, manifest last; each file atomically).

        ``embeddings`` maps a file name under ``embeddings/`` (e.g. ``"transe.parquet"``) to an
        embeddings table of this KG; they are listed in the manifest.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for label, fname in TABLE_FILES.items():
            write_table_atomic(self.tag(getattr(self, label)), d / fname)
        written = []
        for fname, table in (embeddings or {}).items():
            rel = f"embeddings/{fname}"
            write_embeddings(table, d / rel, kg=self)
            written.append(rel)
        old = d / MANIFEST_FILE
        if old.exists():  # keep embedding files an earlier save listed, if they still match
            try:
                prev = json.loads(old.read_text())
                if prev.get("fingerprint") == self.fingerprint:
                    written += [p for p in prev.get("embeddings", []) if (d / p).exists() and p not in written]
            except (OSError, ValueError):
                pass
        doc = self.manifest(written)
        validate_document(doc, MANIFEST, str(d / MANIFEST_FILE))
        atomic_write_json(d / MANIFEST_FILE, doc, indent=2, sort_keys=True, end="\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, verify: bool = True) -> KG:
        """Read a KG directory; with ``verify`` the fingerprint is recomputed and checked."""
        d = Path(directory)
        mpath = d / MANIFEST_FILE
        if not mpath.exists():
            raise KGError(f"{d}: not a kcache KG directory (no {MANIFEST_FILE}); create one with kcache kg import-*")
        doc = read_json(mpath, KGError)
        validate_document(doc, MANIFEST, str(mpath))
        tables = {label: read_table_file(d / doc["files"][label], label) for label in TABLE_FILES}
        kg = cls(doc["name"], tables["entities"], tables["relations"], tables["triples"], doc.get("source", {}),
                 where=str(d))
        if verify and kg.fingerprint != doc["fingerprint"]:
            raise KGError(f"{mpath}: fingerprint {doc['fingerprint']} does not match the tables "
                          f"({kg.fingerprint}); the files were changed")
        if not verify:
            kg.__dict__["fingerprint"] = doc["fingerprint"]
        kg.embedding_files = [d / p for p in doc.get("embeddings", [])]
        return kg


def load_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise KGError(f"{directory}: not a kcache KG directory (no {MANIFEST_FILE})")
    doc = json.loads(path.read_text())
    validate_document(doc, MANIFEST, str(path))
    return doc


# ---------------------------------------------------------------------------------------------
# embeddings


def embeddings_table(
    vectors: Any,
    *,
    kg: KG | None = None,
    kg_name: str | None = None,
    kg_fingerprint: str | None = None,
    model: str,
    source: str = "",
    params: Mapping[str, Any] | None = None,
    entity_ids: Any = None,
) -> pa.Table:
    """Build an embeddings table from an ``(n, d)`` array (numpy or torch, float32 kept without copy).

    ``entity_ids`` defaults to ``0..n-1``. The KG is named by ``kg`` or by ``kg_name`` +
    ``kg_fingerprint``; ``model`` is the embedding model (TransE, RotatE, RESCAL, …).
    """
    if hasattr(vectors, "detach"):  # torch
        vectors = vectors.detach().cpu()
        if vectors.is_complex():
            import torch

            vectors = torch.view_as_real(vectors).flatten(-2)
        vectors = vectors.numpy()
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise KGError(f"embeddings must be a 2-d (entities x dim) array, got shape {vectors.shape}")
    if np.iscomplexobj(vectors):
        vectors = np.stack([vectors.real, vectors.imag], axis=-1).reshape(len(vectors), -1)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if d < 1:
        raise KGError("embeddings must have at least one dimension")
    ids = np.arange(n, dtype=np.int64) if entity_ids is None else np.asarray(entity_ids, dtype=np.int64)
    if len(ids) != n:
        raise KGError(f"{len(ids)} entity ids for {n} vectors")
    if kg is not None:
        kg_name, kg_fingerprint = kg.name, kg.fingerprint
    if not kg_name or not kg_fingerprint:
        raise KGError("embeddings need the KG they belong to (kg= or kg_name= and kg_fingerprint=)")
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), d)
    meta = {
        META_KG_NAME: kg_name,
        META_KG_FINGERPRINT: kg_fingerprint,
        META_EMB_MODEL: model,
        META_EMB_DIM: str(d),
        META_EMB_SOURCE: source,
        META_EMB_PARAMS: json.dumps(dict(params or {}), sort_keys=True),
    }
    table = pa.Table.from_arrays([pa.array(ids), vec], names=["entity_id", "vector"])
    return validate_embeddings(table, "<embeddings>", metadata=meta, kg=kg)


def embedding_dim(table: pa.Table | pa.Schema) -> int:
    schema = table.schema if isinstance(table, pa.Table) else table
    idx = schema.get_field_index("vector")
    if idx < 0 or not pa.types.is_fixed_size_list(schema.field(idx).type):
        raise KGError("not an embeddings table (no fixed_size_list column 'vector')")
    return schema.field(idx).type.list_size


def validate_embeddings(table: pa.Table, where: str, *, metadata: Mapping[str, str] | None = None,
                        kg: KG | None = None) -> pa.Table:
    """Check an embeddings table: schema, metadata, strictly increasing ids, ids in range of ``kg``."""
    d = embedding_dim(table)
    table = conform(table, EMBEDDINGS, where, metadata=metadata, dim=d)
    meta = _meta(table)
    for key in (META_KG_NAME, META_KG_FINGERPRINT, META_EMB_MODEL, META_EMB_DIM):
        if not meta.get(key):
            raise KGError(f"{where}: schema metadata lacks {key}")
    if meta[META_EMB_DIM] != str(d):
        raise KGError(f"{where}: metadata says dim {meta[META_EMB_DIM]} but vectors have {d}")
    ids = table["entity_id"].to_numpy()
    if len(ids) > 1 and not np.all(np.diff(ids) > 0):
        raise KGError(f"{where}: entity_id must be strictly increasing")
    if len(ids) and ids[0] < 0:
        raise KGError(f"{where}: negative entity_id {int(ids[0])}")
    if kg is not None:
        check_compatible(table, kg, what=(where, f"KG {kg.where}"))
        if len(ids) and ids[-1] >= kg.num_entities:
            raise KGError(f"{where}: entity_id {int(ids[-1])} out of range for KG {kg.name} "
                          f"({kg.num_entities} entities)")
    return table


def write_embeddings(table: pa.Table, path: str | os.PathLike, kg: KG | None = None) -> Path:
    """Validate and write an embeddings table (``.parquet``, or ``.arrow`` for mmap-able IPC)."""
    return write_table_atomic(validate_embeddings(table, str(path), kg=kg), path)


def read_embeddings(path: str | os.PathLike, kg: KG | None = None) -> pa.Table:
    """Read and validate an embeddings file; with ``kg``, refuse one of another KG fingerprint."""
    return validate_embeddings(read_table_file(path, "embeddings"), str(path), kg=kg)


def embedding_info(table: pa.Table) -> dict:
    meta = _meta(table)
    return {
        "kg_name": meta.get(META_KG_NAME),
        "kg_fingerprint": meta.get(META_KG_FINGERPRINT),
        "model": meta.get(META_EMB_MODEL),
        "dim": embedding_dim(table),
        "source": meta.get(META_EMB_SOURCE, ""),
        "params": json.loads(meta.get(META_EMB_PARAMS) or "{}"),
        "rows": table.num_rows,
    }


def embeddings_to_numpy(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(entity_ids, vectors)`` as numpy; ``vectors`` is a read-only view of the Arrow buffer
    (no copy) when the column is a single chunk, as it is after :func:`read_embeddings` of a file
    with one row group; several chunks are combined first (one copy)."""
    d = embedding_dim(table)
    col = table["vector"]
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    flat = arr.flatten()  # a zero-copy slice of the child array, honouring the array offset
    values = flat.to_numpy(zero_copy_only=True)
    return table["entity_id"].to_numpy(), values.reshape(len(arr), d)


def embeddings_to_torch(table: pa.Table):
    """``(entity_ids, vectors)`` as torch tensors sharing memory with the Arrow table.

    Arrow buffers are immutable, so the tensor is read-only in spirit: do not write to it (torch
    cannot mark a tensor read-only; its usual warning about that is silenced here). Call
    ``.clone()`` for a writable copy.
    """
    import torch

    ids, vectors = embeddings_to_numpy(table)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(ids), torch.from_numpy(vectors)


def embedding_matrix(table: pa.Table, num_entities: int):
    """A dense ``(num_entities, d)`` float32 tensor with row ``i`` = vector of entity ``i`` and a
    bool mask of the rows that have a vector. Zero-copy when the table covers ``0..n-1`` in order;
    otherwise missing rows are zeros (copy)."""
    import torch

    ids, vectors = embeddings_to_torch(table)
    if len(ids) == num_entities and (num_entities == 0 or (int(ids[0]) == 0 and int(ids[-1]) == num_entities - 1)):
        return vectors, torch.ones(num_entities, dtype=torch.bool)
    out = torch.zeros(num_entities, vectors.shape[1], dtype=vectors.dtype)
    mask = torch.zeros(num_entities, dtype=torch.bool)
    out[ids] = vectors
    mask[ids] = True
    return out, mask


# ---------------------------------------------------------------------------------------------
# compatibility


def fingerprint_of(obj: Any) -> tuple[str, str]:
    """``(fingerprint, description)`` of a KG, a KG directory, an Arrow table / schema with KG
    metadata (embeddings, links, KG tables written by kcache) or a table file path."""
    if isinstance(obj, KG):
        return obj.fingerprint, f"KG {obj.name}"
    if isinstance(obj, str) and obj.startswith("sha256:"):
        return obj, "fingerprint"
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.is_dir():
            return load_manifest(p)["fingerprint"], f"KG directory {p}"
        if p.suffix == ".arrow":
            schema = pa.ipc.open_file(pa.memory_map(str(p), "r")).schema
        else:
            try:
                schema = pq.read_schema(p)
            except (pa.ArrowInvalid, OSError) as e:
                raise KGError(f"{p}: cannot read: {e}") from None
        obj, label = schema, str(p)
    else:
        label = None
    if isinstance(obj, (pa.Table, pa.Schema)):
        meta = _meta(obj)
        kind = meta.get("kcache.schema", "table")
        fp = meta.get(META_KG_FINGERPRINT)
        if not fp:
            raise KGError(f"{label or kind}: carries no KG fingerprint ({META_KG_FINGERPRINT} metadata)")
        return fp, f"{kind} {label}" if label else kind
    raise TypeError(f"cannot find a KG fingerprint on {type(obj).__name__}")


def check_compatible(*objs: Any, what: tuple[str, ...] | None = None) -> str:
    """Refuse to pair artefacts of different KGs: every argument (KG, KG directory, links or
    embeddings table or file, fingerprint string) must carry the same KG fingerprint.

    Returns the common fingerprint; raises :class:`KGCompatibilityError` naming both sides.
    """
    found = [fingerprint_of(o) for o in objs]
    if what:
        found = [(fp, w) for (fp, _), w in zip(found, what)]
    first_fp, first_what = found[0]
    for fp, desc in found[1:]:
        if fp != first_fp:
            raise KGCompatibilityError(
                f"{desc} was built from KG {fp[:19]}…, but {first_what} is of KG {first_fp[:19]}…; "
                "links, embeddings and entities must come from the same KG (re-link or re-embed "
                "against one KG directory)"
            )
    return first_fp
