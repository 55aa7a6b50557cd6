"""Finalizing, digests and validation of caches.

``finalize`` writes ``manifest.json`` (schemas/cache-manifest-v1.json): a SHA-256 per file, a
digest per part and one of the metadata, and makes every file read-only. From then on the
cache is immutable: kcache commands that would write into it refuse. ``validate_cache`` checks
a cache end to end, locally or over any fsspec URL, and names the file, array, chunk or sample
behind each problem.

Digest conventions (so other tools can recompute them):

- file: hex sha256 of the bytes.
- part digest: ``sha256:`` + sha256 of the lines ``"{path} {size} {sha256}\\n"`` over the part's
  files sorted by path ('/'-separated, relative to the part).
- metadata digest: ``sha256:`` + sha256 of, for each part in manifest order, the line
  ``"part {path} {sorted exclude ids joined by ','}\\n"`` followed by the part's file lines for
  every file that is not a chunk (no ``/c/`` component): zarr.json documents, index, skipped,
  card and commit log. It identifies the cache's content up to the chunk bytes.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kcache import __version__
from kcache._io import atomic_path, atomic_write_json, now
from kcache.cache.card import SIDECAR_CARD_NAME
from kcache.cache.format import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, CacheError, decode_rows, manifest_schema
from kcache.cache.location import Location
from kcache.cache.reader import Cache, Part, has_embeddings
from kcache.lock import is_tmp_name, output_lock
from kcache.paths import check_manifest_paths, hash_regular, safe_relpath
from kcache.runtime import available_cores
from kcache.schemas import validate_document

CHUNK_FILE = re.compile(r"^(?P<array>.+)/c/(?P<coord>\d+(?:/\d+)*)$")
RECORD_SUFFIX = ".record.json"


# ---------------------------------------------------------------------------------------------
# digests (pure over (path, size, sha) lists)


def is_chunk(rel: str) -> bool:
    return "/c/" in f"/{rel}"


def part_digest(files: dict[str, dict]) -> str:
    lines = "".join(f"{p} {f['size']} {f['sha256']}\n" for p, f in sorted(files.items()))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def metadata_digest(parts: list[dict]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(f"part {p['path']} {','.join(sorted(p.get('exclude', [])))}\n".encode())
        for rel, f in sorted(p["files"].items()):
            if not is_chunk(rel):
                h.update(f"{rel} {f['size']} {f['sha256']}\n".encode())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------
# finalizing (local only)


def part_files(part_dir: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict]:
    """relpath -> {size, sha256} for every regular file under ``part_dir`` (sub-parts excluded)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(part_dir):
        rel_dir = Path(dirpath).relative_to(part_dir)
        # A multi-part root keeps its parts under parts/: they are listed as parts, not files.
        if rel_dir == Path(".") and "parts" in dirnames and not (part_dir / "zarr.json").exists():
            dirnames.remove("parts")
        dirnames.sort()
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise CacheError(f"{Path(dirpath) / d}: is a symbolic link; a cache never follows links")
        for f in sorted(filenames):
            rel = (rel_dir / f).as_posix()
            # Temporary files (an interrupted write's leftovers) are never part of a cache.
            if rel in skip or rel.endswith(RECORD_SUFFIX) or is_tmp_name(f):
                continue
            found.append((safe_relpath(rel, str(part_dir)), Path(dirpath) / f))
    # hashlib releases the GIL on large buffers, so the shards hash on every core the process may use.
    with ThreadPoolExecutor(min(4, available_cores())) as pool:
        digests = list(pool.map(hash_regular, [p for _, p in found]))  # refuses links, fifos and devices
    return {rel: {"size": size, "sha256": sha} for (rel, _), (size, sha) in zip(found, digests)}


def part_record(root: Path, rel: str, exclude=(), origin: str | None = None) -> dict:
    """The manifest entry of one (complete) part directory ``root/rel``."""
    part = Part.open(Location(Path(root) / rel) if rel != "." else Location(root), rel)
    files = part_files(Path(root) / rel)
    rec = {"path": rel, "samples": part.index.num_rows, "rows": part.rows, "digest": part_digest(files), "files": files}
    if exclude:
        rec["exclude"] = sorted(exclude)
    if origin:
        rec["origin"] = origin
    return rec


def write_part_record(root: Path, rel: str, origin: str | None = None) -> Path:
    """Digest one part and leave the record beside it (``parts/NAME.record.json``).

    Used by distributed extraction: each rank digests its own part in parallel, rank 0 only
    assembles the manifest.
    """
    rec = part_record(root, rel, origin=origin)
    return atomic_write_json(Path(root) / f"{rel}{RECORD_SUFFIX}", rec, sort_keys=True)


def finalize(root: str | os.PathLike, parts: list[str] | None = None, provenance: dict | None = None,
             records: list[dict] | None = None, reproducible: bool = False) -> dict:
    """Write ``root/manifest.json`` for complete parts and make every file read-only.

    ``parts`` defaults to ``["."]`` (a single store at the root). Records already written by
    ``write_part_record`` (or passed in ``records``) are used instead of re-hashing. Holds the
    output lock (kcache.lock) throughout; completes a finalize that was killed part-way (its
    temporary manifest is dropped, files it already made read-only are only read).
    ``reproducible``: a version-2 manifest without ``created``, so its bytes depend on the parts
    and ``provenance`` alone (elastic extraction, kcache.elastic).
    """
    with output_lock(root, "finalize it"):
        return _finalize(root, parts, provenance, records, reproducible)


def _drop_legacy_manifest_tmp(root: Path) -> None:
    """Drop the temporary manifest of a killed finalize of an older version (under the lock, nobody else's);
    those of the current naming go when the next one is named (``kcache._io.atomic_path``)."""
    for p in root.glob(MANIFEST + ".tmp"):  # the name older versions used
        p.unlink(missing_ok=True)


def _finalize(root: str | os.PathLike, parts: list[str] | None, provenance: dict | None,
              records: list[dict] | None, reproducible: bool = False) -> dict:
    root = Path(root)
    if (root / MANIFEST).exists():
        raise CacheError(f"{root}: already finalized ({MANIFEST} exists); a finalized cache is immutable")
    parts = parts or ["."]
    by_path = {r["path"]: r for r in (records or [])}
    recs = []
    for rel in parts:
        rec_file = root / f"{rel}{RECORD_SUFFIX}"
        if rel in by_path:
            recs.append(by_path[rel])
        elif rel != "." and rec_file.exists():
            recs.append(json.loads(rec_file.read_text()))
        else:
            recs.append(part_record(root, rel))
    doc = {
        "format": MANIFEST_FORMAT,
        "schema_version": 2 if reproducible else MANIFEST_VERSION,
        "kcache_version": __version__,
        **({} if reproducible else {"created": now()}),
        "parts": recs,
        "metadata_digest": metadata_digest(recs),
        "provenance": provenance or {},
    }
    validate_document(doc, manifest_schema(doc), str(root / MANIFEST))
    check_manifest_paths(doc, str(root / MANIFEST))
    _drop_legacy_manifest_tmp(root)
    # Written first, then every file is made read-only, then the (read-only) manifest renamed into place.
    with atomic_path(root / MANIFEST, mode=0o444) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        make_read_only(root)
    for rel in parts:
        (root / f"{rel}{RECORD_SUFFIX}").unlink(missing_ok=True)
    return doc


def make_read_only(root: Path) -> None:
    """Clear the write bits of every file (directories stay writable so the cache can be deleted).

    Never follows a link: a symbolic link (or any non-regular file) inside the cache is refused,
    so finalize cannot be made to chmod a file outside it (records passed in skip ``part_files``,
    which would have refused it).
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise CacheError(f"{Path(dirpath) / d}: is a symbolic link; a cache never follows links")
        for f in filenames:
            p = Path(dirpath) / f
            try:
                fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CacheError(f"{p}: is a symbolic link; a cache never follows links") from None
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CacheError(f"{p}: not a regular file (a fifo, socket or device); "
                                     "refusing to finalize a cache holding it")
                os.fchmod(fd, st.st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            finally:
                os.close(fd)


def refuse_if_finalized(path: str | os.PathLike, action: str) -> None:
    """Raise if ``path`` is a finalized cache: finalized caches are never modified."""
    if (Path(path) / MANIFEST).exists():
        raise CacheError(f"{path} is a finalized cache ({MANIFEST} present) and caches are immutable once finalized; "
                         f"refusing to {action}. Delete it yourself or choose another output")


# ---------------------------------------------------------------------------------------------
# validation


def corrupt_chunks(arr, shard_coord: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Inner-chunk grid indices of shard ``shard_coord`` that fail to decode (crc32c, codec)."""
    chunks = arr.chunks
    per = [s // c for s, c in zip(arr.shards or arr.chunks, chunks)]
    bad = []
    for inner in itertools.product(*(range(n) for n in per)):
        coord = tuple(sc * n + i for sc, n, i in zip(shard_coord, per, inner))
        sl = tuple(slice(c * k, min((c + 1) * k, s)) for c, k, s in zip(coord, chunks, arr.shape))
        if any(s.start >= s.stop for s in sl):
            continue
        try:
            arr[sl]
        except Exception:  # noqa: BLE001 - the codec's own error is reported by the caller
            bad.append(coord)
    return bad


def _expected_shards(arr) -> set[tuple[int, ...]]:
    grid = arr.shards or arr.chunks
    counts = [-(-s // g) if s else 0 for s, g in zip(arr.shape, grid)]
    return set(itertools.product(*(range(c) for c in counts)))


def digest_problems(cache: Cache) -> list[str]:
    """Compare every file with the manifest; a bad chunk file is narrowed to the failing chunks."""
    problems = []
    m = cache.manifest
    recomputed = []
    for prec, part in zip(m["parts"], cache.parts):
        loc = part.loc
        files = {}
        for rel, want in sorted(prec["files"].items()):
            try:
                size, sha = loc.digest(rel, want["size"])  # streamed, never past the manifest's size
            except FileNotFoundError:
                problems.append(f"{loc.url(rel)}: listed in {MANIFEST} but missing")
                files[rel] = want
                continue
            except CacheError as e:  # a link, fifo or device: never read
                problems.append(str(e))
                files[rel] = want
                continue
            got = {"size": size, "sha256": sha}
            files[rel] = got
            if got == want:
                continue
            if got["size"] < want["size"]:
                what = "truncated"
            else:
                what = "longer than its manifest size" if got["size"] != want["size"] else "content differs"
            msg = (f"{loc.url(rel)}: {what} (sha256 {got['sha256'][:12]}…, manifest {want['sha256'][:12]}…; "
                   f"{got['size']} of {want['size']} bytes)")
            mt = CHUNK_FILE.match(rel)
            if mt:
                array = mt["array"]
                coord = tuple(int(x) for x in mt["coord"].split("/"))
                try:
                    bad = corrupt_chunks(part.array(array), coord)
                except Exception as e:  # noqa: BLE001
                    bad, msg = [], msg + f"; shard unreadable ({type(e).__name__})"
                failing = f"chunk(s) {', '.join(map(str, bad))} fail their crc32c check; " if bad else ""
                msg = f"{loc.url(array)}: shard {coord}: " + failing + msg
            problems.append(msg)
        if part.loc.local_path is not None:
            extra = set(part_files(part.loc.local_path)) - set(prec["files"])
            if prec["path"] == ".":
                extra.discard(SIDECAR_CARD_NAME)  # the dataset card `kcache push` adds beside a single-store cache
            for rel in sorted(extra):
                problems.append(f"{loc.url(rel)}: not listed in {MANIFEST} (added after finalizing?)")
        if part_digest(prec["files"]) != prec["digest"]:
            problems.append(f"{cache.location.url(MANIFEST)}: part {prec['path']}: digest does not match its file list")
        recomputed.append(prec)
    if metadata_digest(recomputed) != m["metadata_digest"]:
        problems.append(f"{cache.location.url(MANIFEST)}: metadata digest does not match the parts' metadata files")
    return problems


def part_problems(cache: Cache, j: int, progress: bool) -> list[str]:
    """Structure and values of part ``j``: counts, contiguous offsets, every shard, finite values."""
    from tqdm.auto import tqdm

    part = cache.parts[j]
    where = part.loc
    attrs, idx = part.attrs, part.index
    c = attrs["counts"]
    problems: list[str] = []
    n = idx.num_rows
    if n != c["samples"]:
        problems.append(f"{where.url('index.parquet')}: {n} rows but zarr.json counts {c['samples']} samples")
    ids = idx["sample_id"].to_pylist()
    if len(set(ids)) != len(ids):
        seen = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        problems.append(f"{where.url('index.parquet')}: sample {dup!r} appears more than once")
    row_off, x_len = idx["row_offset"].to_numpy(), idx["x_len"].to_numpy().astype(np.int64)
    tok_off, k_len = idx["tok_offset"].to_numpy(), idx["k_len"].to_numpy().astype(np.int64)
    if n:
        exp_rows = np.concatenate([[0], np.cumsum(x_len)[:-1]])
        bad = np.nonzero(row_off != exp_rows)[0]
        if len(bad):
            i = int(bad[0])
            problems.append(f"{where.url('index.parquet')}: row {i} (sample {ids[i]!r}): "
                            f"row_offset {row_off[i]} but the previous samples end at {exp_rows[i]}")
        exp_tok = np.concatenate([[0], np.cumsum(x_len + k_len)[:-1]])
        bad = np.nonzero(tok_off != exp_tok)[0]
        if len(bad):
            i = int(bad[0])
            problems.append(f"{where.url('index.parquet')}: row {i} (sample {ids[i]!r}): "
                            f"tok_offset {tok_off[i]} but the previous samples end at {exp_tok[i]}")
        if (k_len <= 0).any():
            problems.append(f"{where.url('index.parquet')}: a sample has an empty knowledge prefix")
    if part.rows != c["input_tokens"]:
        problems.append(f"{where.url('index.parquet')}: x_len sums to {part.rows} but zarr.json counts "
                        f"{c['input_tokens']} input tokens")
    names = [f"deltas/layer_{l:02d}" for l in cache.layers] + ["tokens/ids", "tokens/offsets", "masks/loss",
                                                               "masks/target"]
    if has_embeddings(attrs):
        names.append("embeddings")
    if cache.storage["kind"] == "int8":
        names += [f"deltas/scale_{l:02d}" for l in cache.layers]
    for name in names:
        arr = part.array(name)
        if cache.manifest is not None:
            # Finalized: the manifest is the authority. A listed shard that is gone is reported by
            # the digest check (and refused on open); a shard it never listed was never written
            # because it held only the fill value (e.g. tokens/offsets [0] of a part with no samples).
            present = None
        elif n == 0:
            present = None  # an empty part: every chunk equals the fill value, zarr wrote none
        elif where.local_path is not None:
            base = where.local_path / name / "c"
            present = {tuple(int(x) for x in p.relative_to(base).parts) for p in base.rglob("*")
                       if p.is_file()} if base.exists() else set()
        else:
            present = None
        if present is not None:
            missing = _expected_shards(arr) - present
            if missing:
                problems.append(f"{where.url(name)}: {len(missing)} shard(s) missing, "
                                f"first at grid index {sorted(missing)[0]}")
    if problems:
        return problems
    offs = part.array("tokens/offsets")[:]
    if not np.array_equal(offs[:-1], tok_off) or offs[-1] != part.tokens:
        problems.append(f"{where.url('tokens/offsets')}: disagrees with index.parquet tok_offset")
    shard = attrs["settings"]["shard_rows"]
    for l in tqdm(cache.layers, desc=f"validate {part.name}", disable=not progress):
        arr = part.array(f"deltas/layer_{l:02d}")
        for a in range(0, part.rows, shard):
            try:
                raw = arr[a : a + shard]
                block = decode_rows(raw, cache.dtype) if raw.dtype != np.int8 else raw.astype(np.float32)
            except Exception as e:  # noqa: BLE001 - codec / checksum failures
                bad = corrupt_chunks(arr, (a // shard, 0))
                failing = f", chunk(s) {', '.join(map(str, bad))} fail" if bad else ""
                problems.append(f"{where.url(f'deltas/layer_{l:02d}')}: rows {a}..{min(a + shard, part.rows)} "
                                f"unreadable{failing} ({type(e).__name__}: {e})")
                continue
            bad = ~np.isfinite(block)
            if bad.any():
                r = a + int(np.nonzero(bad.any(axis=1))[0][0])
                i = int(np.searchsorted(row_off, r, side="right") - 1)
                problems.append(f"{where.url(f'deltas/layer_{l:02d}')}: "
                                f"non-finite value at row {r} (sample {ids[i]!r}, input position {r - row_off[i]})")
    return problems


def validate_cache(spec: str | os.PathLike, progress: bool = False, require_manifest: bool = False) -> list[str]:
    """Every problem found in a cache, as messages naming file/array/chunk/sample; empty = valid.

    Checks: untrusted-input checks on open (schema, codecs, dtypes, shapes, offsets), the
    manifest's digests (every file, every part, the metadata) when finalized, settings equal
    across parts, sample ids unique across parts, per part contiguous offsets, every shard
    present and every value finite (a full read).
    """
    try:
        cache = Cache.open(spec)
    except (CacheError, FileNotFoundError) as e:
        return [str(e)]
    problems: list[str] = []
    if cache.manifest is None:
        if require_manifest:
            problems.append(f"{spec}: not finalized (no {MANIFEST}); run `kcache finalize {spec}`")
    else:
        problems += digest_problems(cache)
    ids = cache.index["sample_id"].to_pylist()
    if len(set(ids)) != len(ids):
        seen: set = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        parts = sorted({cache.parts[int(cache.part_of[i])].name for i, x in enumerate(ids) if x == dup})
        problems.append(f"{spec}: sample {dup!r} appears in more than one part ({', '.join(parts)})")
    for j in range(len(cache.parts)):
        problems += part_problems(cache, j, progress)
    return problems
