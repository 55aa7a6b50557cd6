"""Knowledge samples (``schemas/samples-v1.json``): read, validate, write.

A sample is ``(knowledge: list[str], source: str, target: str)`` plus bookkeeping and optional
editing / classification fields. Files are Parquet (``.parquet``) or JSON lines (``.jsonl``);
errors name the file, the row (0-based for Parquet, 1-based line for JSONL) and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kcache._io import atomic_path
from kcache.schemas import arrow_schema, table_fields

SCHEMA_NAME = "samples-v1"


from kcache.errors import KCacheError  # noqa: E402


class SampleError(KCacheError, ValueError):
    """Bad sample data; the message names file, row and field."""


def _where(path: str, row: int | None, field: str | None, jsonl: bool = False) -> str:
    s = str(path)
    if row is not None:
        s += f": line {row + 1}" if jsonl else f": row {row}"
    if field is not None:
        s += f": field '{field}'"
    return s


def _check_value(value: Any, ftype: str, required: bool, where: str) -> None:
    if value is None:
        if required:
            raise SampleError(f"{where}: missing (required)")
        return
    if ftype == "string":
        if not isinstance(value, str):
            raise SampleError(f"{where}: expected a string, got {type(value).__name__}")
    elif ftype == "int64":
        if not isinstance(value, int) or isinstance(value, bool):
            raise SampleError(f"{where}: expected an integer, got {type(value).__name__}")
    elif ftype == "list<string>":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SampleError(f"{where}: expected a list of strings")
    elif ftype.startswith("list<struct<"):
        if not isinstance(value, list) or not all(
            isinstance(v, dict) and isinstance(v.get("prompt"), str) and isinstance(v.get("target"), str) for v in value
        ):
            raise SampleError(f"{where}: expected a list of {{prompt: str, target: str}}")


def validate_records(records: list[dict], path: str = "<memory>", rows: list[int] | None = None,
                     jsonl: bool = False) -> None:
    """Check types, required fields, non-empty source and unique ids. Raises ``SampleError``.

    ``rows[k]`` is the row (or 0-based line, with ``jsonl``) that record ``k`` came from.
    """
    fields = table_fields(SCHEMA_NAME)
    known = {f["name"] for f in fields}
    seen: dict[str, int] = {}
    for k, rec in enumerate(records):
        i = rows[k] if rows is not None else k
        for extra in rec.keys() - known:
            raise SampleError(f"{_where(path, i, extra, jsonl)}: unknown field (schema {SCHEMA_NAME})")
        for f in fields:
            _check_value(rec.get(f["name"]), f["type"], f.get("required", False), _where(path, i, f["name"], jsonl))
        if not rec["source"].strip():
            raise SampleError(f"{_where(path, i, 'source', jsonl)}: empty source")
        opts, label = rec.get("options"), rec.get("label")
        if label is not None and (opts is None or not 0 <= label < len(opts)):
            raise SampleError(f"{_where(path, i, 'label', jsonl)}: label {label} is not an index into options")
        sid = rec["id"]
        if sid in seen:
            raise SampleError(f"{_where(path, i, 'id', jsonl)}: "
                              f"duplicate id {sid!r} (first at {'line' if jsonl else 'row'} "
                              f"{seen[sid] + (1 if jsonl else 0)})")
        seen[sid] = i


def samples_from_records(records: Iterable[dict], path: str = "<memory>", rows: list[int] | None = None,
                         jsonl: bool = False) -> pa.Table:
    """Validate plain dicts and build the samples table with the canonical schema."""
    records = [dict(r) for r in records]
    validate_records(records, path, rows, jsonl)
    schema = arrow_schema(SCHEMA_NAME)
    cols = {f.name: [r.get(f.name) for r in records] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    records, lines = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError(f"{path}: line {lineno + 1}: "
                                  f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SampleError(f"{path}: line {lineno + 1}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise SampleError(f"{path}: line {lineno + 1}: expected a JSON object")
            records.append(rec)
            lines.append(lineno)
    return records, lines


def _read_parquet(path: Path) -> list[dict]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SampleError(f"{path}: cannot read as Parquet: {e}") from None
    for name in table.column_names:
        col = table[name]
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            decoded = []
            for i, v in enumerate(col.to_pylist()):
                if v is None:
                    decoded.append(None)
                    continue
                try:
                    decoded.append(v.decode("utf-8"))
                except UnicodeDecodeError:
                    raise SampleError(f"{_where(str(path), i, name)}: not valid UTF-8") from None
            table = table.set_column(table.column_names.index(name), name, pa.array(decoded, pa.string()))
    return table.to_pylist()


def read_samples(source: str | os.PathLike | pa.Table | Any) -> pa.Table:
    """Read and validate samples from a ``.parquet``/``.jsonl`` path, an Arrow table or a ``datasets.Dataset``."""
    if isinstance(source, pa.Table):
        return samples_from_records(source.to_pylist(), "<table>")
    if hasattr(source, "data") and hasattr(source, "features"):  # datasets.Dataset
        return samples_from_records(source.data.table.to_pylist(), "<datasets.Dataset>")
    path = Path(source)
    if not path.exists():
        raise SampleError(f"{path}: no such samples file")
    if path.suffix == ".jsonl":
        records, lines = _read_jsonl(path)
        return samples_from_records(records, str(path), lines, jsonl=True)
    if path.suffix == ".parquet":
        return samples_from_records(_read_parquet(path), str(path))
    raise SampleError(f"{path}: unknown samples format (expected .parquet or .jsonl)")


def require_usable(usable: int, total: int, skipped: list[tuple[int, str]] = (), where: str = "samples") -> None:
    """Refuse an extraction with no usable sample (an empty file, or every sample skipped) up front.

    A 0-sample cache is of no use to anyone and does not validate; say why instead of writing one.
    ``skipped`` holds (row, reason) pairs, as ``extract.make_plan`` records them.
    """
    if usable > 0:
        return
    if total == 0:
        raise SampleError(f"{where}: no samples (the file is empty); nothing to extract")
    reasons: dict[str, int] = {}
    for _, r in skipped:
        reasons[r.split(":")[0]] = reasons.get(r.split(":")[0], 0) + 1
    why = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
    raise SampleError(f"{where}: none of the {total} samples can be extracted (all "
                      f"skipped{': ' + why if why else ''}); nothing to extract")


def write_samples(table: pa.Table | Iterable[dict], path: str | os.PathLike) -> Path:
    """Validate and write samples to ``.parquet`` or ``.jsonl`` atomically (tmp file + rename)."""
    if not isinstance(table, pa.Table):
        table = samples_from_records(table)
    else:
        table = read_samples(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix not in (".parquet", ".jsonl"):
        raise SampleError(f"{path}: unknown samples format (expected .parquet or .jsonl)")
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for rec in table.to_pylist():
                    rec = {k: v for k, v in rec.items() if v is not None}
                    fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def to_dataset(table: pa.Table):
    """The samples as a ``datasets.Dataset`` (zero-copy over the Arrow table)."""
    import datasets

    return datasets.Dataset(table)


def sample_set_fingerprint(table: pa.Table) -> str:
    """sha256 over the canonical JSON of every sample, in file order."""
    h = hashlib.sha256()
    for rec in table.to_pylist():
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()
