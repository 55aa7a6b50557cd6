"""Versioned on-disk formats.

Every format kcache writes is described by one file in ``schemas/`` (shipped in the wheel as
``kcache/_schemas``). JSON documents (cache attributes, encoder configs, manifests) are JSON
Schema; Arrow tables (samples, KG tables, cache index) use a small field list that is turned
into a ``pyarrow.Schema`` here, so the file on disk stays the single source of truth.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import pyarrow as pa

from kcache.errors import KCacheError  # noqa: E402


class SchemaError(KCacheError, ValueError):
    """A document or table does not match its declared schema (message names the file)."""


def _schema_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent / "schemas"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("kcache schemas not found next to the package (expected kcache/_schemas or ../schemas)")


@functools.cache
def load_schema(name: str) -> dict:
    """Load ``schemas/{name}.json``, e.g. ``load_schema("samples-v1")``."""
    path = _schema_dir() / f"{name}.json"
    if not path.exists():
        raise SchemaError(f"unknown schema {name!r} (no {path})")
    return json.loads(path.read_text())


@functools.cache
def _validator(name: str):
    """The validator of schema ``name``, built once: ``jsonschema.validate`` checks the schema itself
    against its meta-schema on every call, which costs ten times the document's own check."""
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_document(doc: dict, name: str, where: str) -> None:
    """Validate a JSON document against JSON Schema ``name``; ``where`` names the file in errors."""
    # best_match: the error ``jsonschema.validate`` would raise
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(doc))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "<root>"
        raise SchemaError(f"{where}: does not match schema {name}: at '{path}': {error.message}") from None


_SCALARS = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}


def _parse_type(t: str) -> pa.DataType:
    t = t.replace(" ", "")
    if t in _SCALARS:
        return _SCALARS[t]
    if t.startswith("list<") and t.endswith(">"):
        return pa.list_(_parse_type(t[5:-1]))
    if t.startswith("fixed_size_list<") and t.endswith(">"):
        inner, _, size = t[16:-1].rpartition(",")
        return pa.list_(_parse_type(inner), int(size))
    if t.startswith("struct<") and t.endswith(">"):
        fields = []
        for part in _split_top(t[7:-1]):
            fname, _, ftype = part.partition(":")
            fields.append(pa.field(fname, _parse_type(ftype)))
        return pa.struct(fields)
    raise SchemaError(f"unsupported type {t!r} in a table schema")


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur else parts


@functools.cache
def arrow_schema(name: str) -> pa.Schema:
    """The ``pyarrow.Schema`` of table schema ``name`` with ``kcache.schema`` metadata set."""
    doc = load_schema(name)
    if doc.get("kind") != "arrow-table":
        raise SchemaError(f"schema {name} is not an arrow-table schema")
    fields = [pa.field(f["name"], _parse_type(f["type"]), nullable=not f.get("required", False)) for f in doc["fields"]]
    return pa.schema(fields, metadata={"kcache.schema": doc["name"], "kcache.schema_version": str(doc["version"])})


def table_fields(name: str) -> list[dict]:
    return load_schema(name)["fields"]
