"""Reading caches: one or many parts, local or remote, all treated as untrusted input.

A cache is either a single zarr store (format cache-v1, ``zarr.json`` at the root) or a root
holding ``manifest.json`` (schemas/cache-manifest-v1.json) that lists parts, each such a store:
what ``kcache extract`` writes under torchrun and what ``kcache merge`` writes. ``Cache`` shows
the parts as one cache: a global index (parts in manifest order, samples in each part's layout
order) whose ``row_offset``/``tok_offset`` address the concatenation of the parts' flat arrays.

Everything read from disk is checked before any data is used (``check_part``): the group and
array metadata are parsed as plain JSON first, so an unknown or pickle-based codec, an odd
dtype, a shape that disagrees with the index, or an offset out of range is refused before
zarr instantiates a codec or reads a chunk.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kcache.cache.format import (
    ATTRS_KEY,
    DTYPES,
    FORMAT,
    MANIFEST,
    SCHEMA_VERSION,
    CacheError,
    decode_rows,
    manifest_schema,
)
from kcache.cache.location import Location
from kcache.cache.lossy import decode_block, dequantize_int8_rows, encode_block, storage_spec
from kcache.paths import check_manifest_paths, local_tree_problems, safe_local_path
from kcache.schemas import SchemaError, arrow_schema, validate_document

# Codecs a cache may use (zarr v3 names). Anything else — numcodecs' pickle, object codecs,
# codecs this kcache does not know — is refused before zarr would instantiate it.
SAFE_CODECS = {"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "sharding_indexed"}
# A claimed array may hold at most this many times the bytes of its stored chunk files (plus
# CAPACITY_SLACK): compressed float deltas, token ids and embeddings never come close, and it keeps a
# hostile index or shape (x_len 2e9, vocab_size 1e8) from making a reader allocate what no file holds.
MAX_COMPRESSION = 1000
CAPACITY_SLACK = 1 << 20
BOUNDED_ARRAYS = ("deltas/", "tokens/ids", "embeddings")
FLAT_ARRAYS = {"tokens/ids": "int32", "tokens/offsets": "int64", "masks/loss": "bool", "masks/target": "bool"}


def storage_of(settings: dict) -> dict:
    """The storage option of a cache (``settings.storage``); caches before it existed are lossless."""
    return settings.get("storage") or {"kind": "lossless"}


def delta_dtype(settings: dict) -> str:
    """The zarr data type the delta arrays must have for these settings."""
    if storage_of(settings)["kind"] == "int8":
        return "int8"
    return np.dtype(DTYPES[settings["dtype"]][0]).name


def expected_arrays(attrs: dict, rows: int, tokens: int, samples: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, zarr data type) of every array a part with these counts must have."""
    s, h = attrs["settings"], attrs["hidden_size"]
    base = np.dtype(DTYPES[s["dtype"]][0]).name
    out = {f"deltas/layer_{l:02d}": ((rows, h), delta_dtype(s)) for l in s["layers"]}
    if storage_of(s)["kind"] == "int8":
        out.update({f"deltas/scale_{l:02d}": ((rows,), "float32") for l in s["layers"]})
    out.update({
        "tokens/ids": ((tokens,), "int32"),
        "tokens/offsets": ((samples + 1,), "int64"),
        "masks/loss": ((rows,), "bool"),
        "masks/target": ((rows,), "bool"),
    })
    if has_embeddings(attrs):
        out["embeddings"] = ((attrs["vocab_size"], h), base)
    return out


def has_embeddings(attrs: dict) -> bool:
    """Whether a part stores the embedding matrix: every part does, except the unit parts of an
    elastic extraction after the first (``has_embeddings: false``; the cache's first part holds it)."""
    return attrs.get("has_embeddings", True) is not False


# ---------------------------------------------------------------------------------------------
# untrusted metadata checks (pure: documents in, messages out)


def codec_problems(codecs: list, where: str) -> list[str]:
    """Codec names outside ``SAFE_CODECS``, recursing into sharding's inner and index codecs."""
    out = []
    if not isinstance(codecs, list):
        return [f"{where}: 'codecs' is not a list"]
    for c in codecs:
        name = c.get("name") if isinstance(c, dict) else c
        if name not in SAFE_CODECS:
            out.append(f"{where}: codec {name!r} is not allowed in a kcache cache (allowed: "
                       f"{', '.join(sorted(SAFE_CODECS))}); refusing to read it")
            continue
        conf = c.get("configuration", {}) if isinstance(c, dict) else {}
        for key in ("codecs", "index_codecs"):
            if key in conf:
                out += codec_problems(conf[key], where)
    return out


def array_meta_problems(doc: dict, where: str, shape: tuple[int, ...], dtype: str) -> list[str]:
    """Problems with one array's ``zarr.json`` compared with what the index implies."""
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "array":
        return [f"{where}: not a zarr v3 array document"]
    out = codec_problems(doc.get("codecs", []), where)
    if doc.get("data_type") != dtype:
        out.append(f"{where}: data type {doc.get('data_type')!r}, expected {dtype!r}")
    if tuple(doc.get("shape", ())) != tuple(shape):
        out.append(f"{where}: shape {tuple(doc.get('shape', ()))} disagrees with the index, "
                   f"which implies {tuple(shape)}")
    grid = doc.get("chunk_grid", {})
    if grid.get("name") != "regular":
        out.append(f"{where}: chunk grid {grid.get('name')!r} is not 'regular'")
    return out


def capacity_problems(name: str, doc: dict, shape: tuple[int, ...], dtype: str, sizes: dict[str, int] | None,
                      where: str) -> list[str]:
    """A claimed shape that its stored chunk files cannot hold (``sizes``: every file of the part -> bytes)."""
    grid = (doc.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    if not (isinstance(grid, list) and len(grid) == len(shape) and all(isinstance(g, int) and g > 0 for g in grid)):
        return [f"{where}: chunk shape {grid!r} is not {len(shape)} positive integers"]
    if sizes is None or not name.startswith(BOUNDED_ARRAYS):
        return []
    claimed = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    stored = sum(n for rel, n in sizes.items() if rel.startswith(f"{name}/c/"))
    if claimed > MAX_COMPRESSION * stored + CAPACITY_SLACK:
        return [f"{where}: shape {tuple(shape)} ({claimed:,} bytes) is more than its chunk files "
                f"({stored:,} bytes) can hold; refusing a size the files do not back (edited index x_len/k_len, "
                "vocab_size or hidden_size?)"]
    return []


def index_problems(index: pa.Table, rows: int, tokens: int, where: str) -> list[str]:
    """Offsets and lengths of a part's index that would read outside its arrays."""
    out = []
    ro, xl = index["row_offset"].to_numpy(), index["x_len"].to_numpy().astype(np.int64)
    to, kl = index["tok_offset"].to_numpy(), index["k_len"].to_numpy().astype(np.int64)
    ids = index["sample_id"].to_pylist()
    for name, bad in (
        ("x_len <= 0", xl <= 0),
        ("k_len < 0", kl < 0),
        ("row_offset out of range", (ro < 0) | (ro + xl > rows)),
        ("tok_offset out of range", (to < 0) | (to + kl + xl > tokens)),
    ):
        hit = np.nonzero(bad)[0]
        if len(hit):
            i = int(hit[0])
            out.append(f"{where}: row {i} (sample {ids[i]!r}): {name} (row_offset {ro[i]}, x_len {xl[i]}, "
                       f"tok_offset {to[i]}, k_len {kl[i]}; arrays hold {rows} rows and {tokens} tokens)")
    return out


def read_json(loc: Location, rel: str) -> dict:
    try:
        raw = loc.read_bytes(rel)
    except FileNotFoundError:
        raise CacheError(f"{loc.url(rel)}: missing") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"{loc.url(rel)}: not valid JSON ({e})") from None


def read_group_attrs(loc: Location) -> dict:
    """The ``kcache`` attributes of a store, checked against cache-v1 (no zarr involved)."""
    if not loc.exists("zarr.json"):
        raise CacheError(f"{loc}: not a kcache cache (no zarr.json or {MANIFEST})")
    doc = read_json(loc, "zarr.json")
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise CacheError(f"{loc.url('zarr.json')}: not a zarr v3 group")
    attrs = (doc.get("attributes") or {}).get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise CacheError(f"{loc.url('zarr.json')}: "
                         f"not a kcache cache (attribute '{ATTRS_KEY}.format' is not {FORMAT!r})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"{loc.url('zarr.json')}: cache schema version {attrs.get('schema_version')!r}, "
            f"this kcache reads version {SCHEMA_VERSION}; "
            "re-extract it with this kcache or use a matching kcache release"
        )
    try:
        validate_document(attrs, "cache-v1", loc.url("zarr.json"))
    except SchemaError as e:
        raise CacheError(str(e)) from None
    return attrs


def read_index(loc: Location) -> pa.Table:
    try:
        index = pq.read_table(io.BytesIO(loc.read_bytes("index.parquet")))
    except FileNotFoundError:
        raise CacheError(f"{loc.url('index.parquet')}: missing") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise CacheError(f"{loc.url('index.parquet')}: cannot read: {e}") from None
    want = arrow_schema("cache-index-v1")
    missing = [f.name for f in want if f.name not in index.column_names]
    if missing:
        raise CacheError(f"{loc.url('index.parquet')}: missing column(s) {', '.join(missing)}")
    try:
        return index.select([f.name for f in want]).cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise CacheError(f"{loc.url('index.parquet')}: columns do not match cache-index-v1 ({e})") from None


def read_manifest(loc: Location) -> dict | None:
    """The manifest at ``loc``, schema-checked, or None when there is none (not finalized)."""
    if not loc.exists(MANIFEST):
        return None
    doc = read_json(loc, MANIFEST)
    try:
        validate_document(doc, manifest_schema(doc), loc.url(MANIFEST))
    except SchemaError as e:
        raise CacheError(str(e)) from None
    check_manifest_paths(doc, loc.url(MANIFEST))
    return doc


def local_part_sizes(root: Location, part: Location, files: dict[str, dict] | None) -> dict[str, int] | None:
    """For a local part: refuse links, non-regular files and missing listed files; return file -> size.

    Nothing is read (one lstat per entry), so every open checks that each file the index needs is
    present before zarr would return fill values for a missing shard. None for a remote part.
    """
    if part.local_path is None:
        return None
    if part is not root:
        safe_local_path(root.local_path, os.path.relpath(part.local_path, root.local_path), str(root))
    problems, sizes = local_tree_problems(part.local_path, files, skip_dirs=("parts",) if files is None else ())
    for rel, f in sorted((files or {}).items()):
        # The manifest's sizes bound every claimed shape (capacity_problems) and every read: a local
        # file must have exactly that size, so a forged manifest cannot vouch for bytes that are not there.
        real, want = sizes.get(rel), int(f["size"])
        if real is not None and real != want:
            if real > want:
                problems.append(f"{part.local_path / rel}: longer than the {want} bytes its manifest records "
                                f"({real} bytes)")
            else:
                problems.append(f"{part.local_path / rel}: truncated: {real} of the {want} bytes its manifest records")
    if problems:
        raise CacheError("untrusted cache rejected:\n  " + "\n  ".join(problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return sizes


# ---------------------------------------------------------------------------------------------
# parts


@dataclass
class Part:
    """One store of a cache, checked on open."""

    loc: Location
    attrs: dict
    index: pa.Table
    rows: int
    tokens: int
    name: str = "."
    exclude: frozenset = field(default_factory=frozenset)
    _group: object = None
    _arrays: dict = field(default_factory=dict)

    @classmethod
    def open(cls, loc: Location, name: str = ".", exclude=(), require_complete: bool = True,
             sizes: dict[str, int] | None = None) -> Part:
        """Open and check one store; ``sizes`` (file -> bytes: the manifest's, or a local listing) bounds
        every claimed shape."""
        attrs = read_group_attrs(loc)
        if require_complete and attrs["status"] != "complete":
            raise CacheError(f"{loc}: extraction is not complete (status {attrs['status']!r}); "
                             "rerun the same `kcache extract` command to resume")
        index = read_index(loc)
        rows = int(index["x_len"].to_numpy().astype(np.int64).sum())
        tokens = int((index["x_len"].to_numpy().astype(np.int64) + index["k_len"].to_numpy().astype(np.int64)).sum())
        problems = []
        for arr, (shape, dtype) in expected_arrays(attrs, rows, tokens, index.num_rows).items():
            rel = f"{arr}/zarr.json"
            if not loc.exists(rel):
                problems.append(f"{loc.url(arr)}: array missing")
                continue
            doc = read_json(loc, rel)
            problems += array_meta_problems(doc, loc.url(rel), shape, dtype)
            if isinstance(doc, dict):
                problems += capacity_problems(arr, doc, shape, dtype, sizes, loc.url(rel))
        problems += index_problems(index, rows, tokens, loc.url("index.parquet"))
        if problems:
            raise CacheError("untrusted cache rejected:\n  " + "\n  ".join(problems))
        return cls(loc, attrs, index, rows, tokens, name, frozenset(exclude))

    @property
    def group(self):
        if self._group is None:
            import zarr

            try:
                self._group = zarr.open_group(store=self.loc.zarr_store(), mode="r", zarr_format=3)
            except Exception as e:  # noqa: BLE001 - any zarr failure is a cache problem
                raise CacheError(f"{self.loc}: cannot open as a zarr v3 group: {e}") from None
        return self._group

    def array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]


def combine_stats(parts: list[Part]) -> dict:
    """Per-layer stats of the union of parts, weighting each part by its element count."""
    out: dict = {}
    layers = parts[0].attrs["settings"]["layers"]
    h = parts[0].attrs["hidden_size"]
    for l in map(str, layers):
        n = s1 = s2 = 0.0
        pos: dict[int, list[float]] = {}
        for p in parts:
            st = p.attrs.get("stats", {}).get(l)
            if not st:
                continue
            pn = st.get("n", p.rows * h)
            n += pn
            s1 += st["mean"] * pn
            s2 += st["rms"] ** 2 * pn
            counts = st.get("pos_n") or [p.index.num_rows] * len(st.get("position_norms", []))
            for j, (v, c) in enumerate(zip(st.get("position_norms", []), counts)):
                acc = pos.setdefault(j, [0.0, 0.0])
                acc[0] += v * c
                acc[1] += c
        if not n:
            continue
        mean, ms = s1 / n, s2 / n
        out[l] = {"mean": mean, "std": max(ms - mean * mean, 0.0) ** 0.5, "rms": ms ** 0.5, "n": int(n),
                  "position_norms": [acc[0] / acc[1] for _, acc in sorted(pos.items()) if acc[1]]}
    return out


def combine_errors(per_part: list[dict]) -> dict:
    """Pool per-part storage errors (``sse``/``ssr`` sums) into one relative RMS error per layer."""
    out: dict = {}
    for errs in per_part:
        for l, e in errs.items():
            acc = out.setdefault(l, {"sse": 0.0, "ssr": 0.0, "max_abs_error": 0.0})
            acc["sse"] += e.get("sse", 0.0)
            acc["ssr"] += e.get("ssr", 0.0)
            acc["max_abs_error"] = max(acc["max_abs_error"], e.get("max_abs_error", 0.0))
    for acc in out.values():
        acc["relative_rmse"] = (acc["sse"] / acc["ssr"]) ** 0.5 if acc["ssr"] else 0.0
    return out


# Settings that do not change what a cache holds: the lossless codecs (each array records its own,
# so parts, resumed runs and merges written at another compression level read alike).
DATA_NEUTRAL = ("codecs",)


def settings_differences(a: dict, b: dict, prefix: str = "", ignore=("name", "sample_set")) -> list[str]:
    """'field: A vs B' for every setting that differs (nested keys joined with '.'), leaving out
    ``ignore`` and ``DATA_NEUTRAL`` (at the top level, or under ``settings`` in a record that holds
    them, such as an elastic extraction's)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore or (k in DATA_NEUTRAL and (not prefix or prefix.endswith("settings."))):
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += settings_differences(va, vb, f"{prefix}{k}.", ignore)
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


# ---------------------------------------------------------------------------------------------
# the reader


class Cache:
    """Read access to a cache (one or many parts, local or remote). Use ``Cache.open``.

    ``roundtrip``: None, or the storage option a view made by ``stored_as`` simulates; every delta
    row read passes through that option's encode/decode.
    """

    roundtrip: dict | None = None

    def __init__(self, loc: Location, parts: list[Part], manifest: dict | None):
        self.location, self.parts, self.manifest = loc, parts, manifest
        self.path = loc.local_path if loc.local_path is not None else loc.spec
        first = parts[0].attrs
        if not has_embeddings(first):
            raise CacheError(f"{loc}: its first part ({parts[0].name}) holds no embedding matrix (has_embeddings: "
                             "false); only an elastic extraction's later units may leave it to the first part")
        for p in parts[1:]:
            diffs = settings_differences(first["settings"], p.attrs["settings"])
            if diffs:
                raise CacheError(f"{loc}: part {p.name} was made with other settings than part "
                                 f"{parts[0].name} ({'; '.join(diffs)})")
        self.row_base = np.cumsum([0] + [p.rows for p in parts])
        self.tok_base = np.cumsum([0] + [p.tokens for p in parts])
        tables, part_of = [], []
        for j, p in enumerate(parts):
            t = p.index
            if p.exclude:
                keep = np.array([sid not in p.exclude for sid in t["sample_id"].to_pylist()], dtype=bool)
                t = t.filter(pa.array(keep))
            t = t.set_column(t.schema.get_field_index("row_offset"), "row_offset",
                             pa.array(t["row_offset"].to_numpy() + self.row_base[j], pa.int64()))
            t = t.set_column(t.schema.get_field_index("tok_offset"), "tok_offset",
                             pa.array(t["tok_offset"].to_numpy() + self.tok_base[j], pa.int64()))
            tables.append(t)
            part_of.append(np.full(t.num_rows, j, dtype=np.int32))
        self.index = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.part_of = np.concatenate(part_of)
        self.attrs = self._combined_attrs()
        s = self.attrs["settings"]
        self.layers: list[int] = list(s["layers"])
        self.site: str = s["site"]
        self.dtype: str = s["dtype"]
        self.storage: dict = storage_of(s)
        self.hidden_size: int = self.attrs["hidden_size"]
        self._row_offset = self.index["row_offset"].to_numpy()
        self._x_len = self.index["x_len"].to_numpy()
        self._k_len = self.index["k_len"].to_numpy()
        self._tok_offset = self.index["tok_offset"].to_numpy()
        self._ids = {sid: i for i, sid in enumerate(self.index["sample_id"].to_pylist())}
        self._flat_cache: dict[str, np.ndarray] = {}
        self.verified = None  # the VerifiedFiles every read goes through (Cache.open(verified=...)), if any

    # -- opening

    @classmethod
    def open(cls, spec: str | os.PathLike | Location, require_complete: bool = True, verified=None) -> Cache:
        """Open a cache directory or URL; refuses anything malformed before data is read.

        ``verified`` (a ``kcache.cache.stream.VerifiedFiles``): read every file whole and check it
        against the manifest's sha256 before any of its bytes is used (a finalized cache only).
        """
        loc = spec if isinstance(spec, Location) else Location(spec)
        manifest = read_manifest(loc)
        if manifest is None:
            if verified is not None:
                raise CacheError(f"{loc}: not finalized (no {MANIFEST}), so there are no digests to verify its "
                                 "files against; finalize it (`kcache finalize`), or read it unverified")
            return cls(loc, [Part.open(loc, require_complete=require_complete,
                                       sizes=local_part_sizes(loc, loc, None))], None)
        parts = []
        for p in manifest["parts"]:
            ploc = loc.child(p["path"])
            local_part_sizes(loc, ploc, p["files"])
            # The manifest is the authority on this part's files and their sizes from here on.
            ploc.sizes = {rel: int(f["size"]) for rel, f in p["files"].items()}
            if verified is not None:  # before the part's first read
                ploc.digests = {rel: f["sha256"] for rel, f in p["files"].items()}
                ploc.verified = verified
            parts.append(Part.open(ploc, p["path"], p.get("exclude", ()), require_complete, sizes=ploc.sizes))
        cache = cls(loc, parts, manifest)
        cache.verified = verified
        return cache

    def _combined_attrs(self) -> dict:
        if len(self.parts) == 1 and not self.parts[0].exclude:
            return self.parts[0].attrs
        a = json.loads(json.dumps(self.parts[0].attrs))
        sets = {p.attrs["settings"]["sample_set"] for p in self.parts}
        if len(sets) > 1 or any(p.exclude for p in self.parts):
            # Parts of one extraction share the sample set; a merge gets a new identity.
            a["settings"]["sample_set"] = "sha256:" + hashlib.sha256(
                "\n".join(p.attrs["settings"]["sample_set"] + "|" + ",".join(sorted(p.exclude))
                          for p in self.parts).encode()).hexdigest()
        counts = {k: 0 for k in ("samples_in", "samples", "skipped", "truncated", "input_tokens", "encoder_tokens",
                                 "loss_tokens", "target_tokens")}
        reasons: dict[str, int] = {}
        for p in self.parts:
            for k in counts:
                counts[k] += int(p.attrs["counts"].get(k, 0))
            for r, n in p.attrs["counts"].get("skip_reasons", {}).items():
                reasons[r] = reasons.get(r, 0) + n
        counts["skip_reasons"] = reasons
        excluded = sum(p.index.num_rows for p in self.parts) - self.index.num_rows
        if excluded:
            counts["samples_in"] -= excluded
            counts["samples"] = self.index.num_rows
            counts["input_tokens"] = int(self.index["x_len"].to_numpy().astype(np.int64).sum())
            k_tokens = int(self.index["k_len"].to_numpy().astype(np.int64).sum())
            counts["encoder_tokens"] = counts["input_tokens"] + k_tokens
            counts["truncated"] = int(np.sum(self.index["truncated"].to_numpy(zero_copy_only=False)))
            counts["excluded_duplicates"] = excluded
        a["counts"] = counts
        a["stats"] = combine_stats(self.parts)
        if any("storage_error" in p.attrs for p in self.parts):
            a["storage_error"] = combine_errors([p.attrs.get("storage_error", {}) for p in self.parts])
        a["status"] = "complete" if all(p.attrs["status"] == "complete" for p in self.parts) else "extracting"
        a["parts"] = len(self.parts)
        ex = [p.attrs.get("extraction") or {} for p in self.parts]
        if isinstance(a.get("extraction"), dict) and all(isinstance(e.get("batches"), int) for e in ex):
            a["extraction"]["batches"] = sum(e["batches"] for e in ex)  # the whole cache's, not its first part's
        if isinstance(a.get("extraction"), dict) and all("unit" in e for e in ex):
            del a["extraction"]["unit"]  # an elastic extraction's units: say how many, not the first one's place
            a["extraction"]["units"] = len(ex)
        return a

    # -- metadata

    @property
    def settings(self) -> dict:
        return self.attrs["settings"]

    @property
    def model_fingerprint(self) -> dict:
        return self.settings["model"]

    @property
    def num_samples(self) -> int:
        return self.index.num_rows

    @property
    def total_rows(self) -> int:
        return int(self._x_len.astype(np.int64).sum())

    @property
    def finalized(self) -> bool:
        return self.manifest is not None

    def __str__(self) -> str:
        return str(self.location) + (f" (read as {storage_spec(self.roundtrip)})" if self.roundtrip else "")

    def stored_as(self, storage: dict) -> Cache:
        """This lossless cache read as if it had been extracted with ``--storage`` ``storage``.

        A view (nothing is written): every delta row read goes through ``encode_block`` then
        ``decode_block`` of that option, exactly what the extractor's writer stores and the reader
        decodes. Both options are row-local (bitround per value, int8 per row), so reading by any
        row range gives what reading the stored shards would. From a float16 cache the bitround
        values are bit-identical to a ``--storage bitround:N`` extraction's (both round the same
        float16 values); int8 is quantized from the float16 values instead of the float32 deltas
        an extraction sees, which can move a value to the neighbouring int8 code where the two
        roundings differ (and the row's scale by float16's rounding of its absmax, <= 2^-11 relative).
        ``settings.storage`` is set as the extractor sets it, so the view's fingerprint is that of
        the cache the option would have produced. An option the cache's dtype cannot hold
        (bitround on a float32 cache) is a ValueError here, before any data is read.
        """
        if self.storage["kind"] != "lossless":
            raise CacheError(f"{self.location}: stored {storage_spec(self.storage)}; a storage option can only be "
                             "simulated from a lossless cache (its values are the reference)")
        encode_block(np.zeros((1, self.hidden_size), np.float32), storage, self.dtype)  # refuse bad pairs early
        view = copy.copy(self)
        view.attrs = json.loads(json.dumps(self.attrs))
        if storage["kind"] == "lossless":
            view.attrs["settings"].pop("storage", None)  # lossless caches carry no storage key
        else:
            view.attrs["settings"]["storage"] = dict(storage)
        view.roundtrip = dict(storage)
        return view

    def fingerprint(self) -> str:
        """Identity of this cache's content: settings (sample set included) + counts."""
        doc = {"settings": self.settings, "counts": self.attrs["counts"]}
        return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def position(self, sample: int | str) -> int:
        if isinstance(sample, str):
            if sample not in self._ids:
                raise KeyError(f"{self.location}: no sample {sample!r} in this cache")
            return self._ids[sample]
        return int(sample)

    # -- data

    def flat(self, name: str) -> np.ndarray:
        """A per-token array (``tokens/ids``, ``masks/loss``, ``masks/target``) of all parts, concatenated."""
        if name not in self._flat_cache:
            arrs = [p.array(name)[:] for p in self.parts]
            self._flat_cache[name] = arrs[0] if len(arrs) == 1 else np.concatenate(arrs)
        return self._flat_cache[name]

    _flat = flat

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise CacheError(f"{self.location}: layer {layer} is not in this cache (layers {self.layers})")

    def read_rows(self, layer: int, start: int, stop: int, with_bytes: bool = False, widen: bool = True):
        """Rows ``[start, stop)`` of a layer's (global) delta rows, as float32.

        With ``with_bytes`` also returns the number of stored bytes read (before decoding). With
        ``widen=False`` rows stored losslessly as float16 / float32 come back in that dtype (the same
        values; a consumer that copies them into float32 anyway skips a pass and half the memory).
        """
        self._check_layer(layer)
        out, nbytes = [], 0
        j = int(np.searchsorted(self.row_base, start, side="right") - 1)
        while start < stop and j < len(self.parts):
            p, base = self.parts[j], int(self.row_base[j])
            a, b = start - base, min(stop, int(self.row_base[j + 1])) - base
            if b > a:
                raw = p.array(f"deltas/layer_{layer:02d}")[a:b]
                nbytes += raw.nbytes
                if self.storage["kind"] == "int8":
                    scale = p.array(f"deltas/scale_{layer:02d}")[a:b]
                    nbytes += scale.nbytes
                    out.append(dequantize_int8_rows(raw, scale))
                elif not self._raw_rows(widen):
                    out.append(decode_rows(raw, self.dtype))
                else:
                    out.append(raw)
                start = base + b
            j += 1
        if len(out) == 1:
            rows = out[0]
        else:
            empty = self.dtype if self._raw_rows(widen) else np.float32
            rows = np.concatenate(out) if out else np.zeros((0, self.hidden_size), empty)
        if self.roundtrip is not None and len(rows):
            rows = decode_block(encode_block(rows, self.roundtrip, self.dtype), self.roundtrip, self.dtype)
        return (rows, nbytes) if with_bytes else rows

    def _raw_rows(self, widen: bool) -> bool:
        """Whether ``read_rows(widen=widen)`` returns the stored array itself (lossless float16/32)."""
        return not widen and self.dtype in ("float16", "float32") and self.roundtrip is None \
            and self.storage["kind"] != "int8"

    def deltas_of(self, samples: list[int | str], layer: int) -> list[np.ndarray]:
        """``[deltas(s, layer) for s in samples]`` with one read per chunk: the samples whose rows
        start in the same chunk of the same part are read together (a chunk is decompressed whole,
        so reading its samples one by one decompressed it once per sample)."""
        pos = [self.position(s) for s in samples]
        chunk = int(self.settings.get("chunk_rows") or 1)

        def key(k: int) -> tuple[int, int]:
            r = int(self._row_offset[pos[k]])
            j = int(np.searchsorted(self.row_base, r, side="right") - 1)
            return j, (r - int(self.row_base[j])) // chunk

        groups: dict[tuple[int, int], list[int]] = {}
        for k in range(len(pos)):
            groups.setdefault(key(k), []).append(k)
        out: list[np.ndarray | None] = [None] * len(pos)
        for group in groups.values():
            a = min(int(self._row_offset[pos[g]]) for g in group)
            b = max(int(self._row_offset[pos[g]]) + int(self._x_len[pos[g]]) for g in group)
            rows = self.read_rows(layer, a, b)
            for g in group:
                r0 = int(self._row_offset[pos[g]]) - a
                out[g] = rows[r0 : r0 + int(self._x_len[pos[g]])]
        return out

    def deltas(self, sample: int | str, layer: int) -> np.ndarray:
        """(x_len, hidden) float32 deltas of one sample at one layer."""
        i = self.position(sample)
        a = int(self._row_offset[i])
        return self.read_rows(layer, a, a + int(self._x_len[i]))

    def encoder_tokens(self, sample: int | str) -> tuple[np.ndarray, int]:
        """(``k_ids + x_ids`` as int32, shift = len(k_ids))."""
        i = self.position(sample)
        a = int(self._tok_offset[i])
        return self.flat("tokens/ids")[a : a + int(self._k_len[i] + self._x_len[i])], int(self._k_len[i])

    def loss_mask(self, sample: int | str) -> np.ndarray:
        i = self.position(sample)
        a = int(self._row_offset[i])
        return self.flat("masks/loss")[a : a + int(self._x_len[i])]

    def target_mask(self, sample: int | str) -> np.ndarray:
        i = self.position(sample)
        a = int(self._row_offset[i])
        return self.flat("masks/target")[a : a + int(self._x_len[i])]

    def embeddings(self) -> torch.Tensor:
        """The decoder's input-embedding matrix, float32 (from the first part)."""
        return torch.from_numpy(decode_rows(self.parts[0].array("embeddings")[:], self.dtype).copy())

    def card(self) -> str:
        loc = self.parts[0].loc
        return loc.read_bytes("README.md").decode() if loc.exists("README.md") else ""


def open_cache(spec: str | os.PathLike) -> Cache:
    """Open a complete cache for reading (see ``Cache``)."""
    return Cache.open(spec)
