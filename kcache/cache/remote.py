"""``kcache pull URL DIR``: copy a finalized cache from any fsspec URL into a local directory, resumably.

Conventions:

- Only finalized caches can be pulled: ``manifest.json`` at the cache root (schema
  cache-manifest-v1, or -v2 for elastic extractions) lists every file with its size and sha256.
  Nothing is listed remotely (plain HTTP cannot list directories); the manifest is the list.
- A file of part ``P`` listed as ``R`` lands at ``DIR/P/R`` (``P`` = '.' is the root itself).
  Manifest paths are untrusted: absolute paths, '..', '.', empty components, backslashes, NUL, and
  a symlink anywhere on the way into ``DIR`` are refused before a single byte is fetched
  (``kcache.paths.safe_relpath``/``safe_local_path``, the checks every cache reader uses).
- A file already at its destination with the manifest's size and sha256 is skipped. Any other file
  is downloaded into ``DIR/.kcache-pull/P/R.part`` by byte-range reads of ``block_size`` bytes,
  appended in order, so an interrupted pull keeps every completed block and the next pull of the
  same manifest resumes at the partial file's length (partials from another manifest are dropped).
  The finished partial is checked (size + sha256) and only then renamed into place: a file at its
  final path is always complete and verified.
- ``manifest.json`` is written last, byte for byte as served: a directory without it is an
  unfinished pull (rerun the command to resume), never mistaken for a complete cache.
- Pulled files are made read-only (0444), like the files of any finalized cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import stat
import time
from pathlib import Path

from kcache._io import atomic_write_bytes, sha256_file
from kcache.cache.format import MANIFEST, CacheError, manifest_schema
from kcache.cache.integrity import validate_cache
from kcache.cache.location import Location
from kcache.cache.subset import pull_subset
from kcache.lock import output_lock
from kcache.paths import hash_regular, safe_local_path, safe_relpath
from kcache.schemas import SchemaError, validate_document

STAGING = ".kcache-pull"
BLOCK_SIZE = 4 << 20  # one range request; an interruption loses at most this much
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a backend raises for a failed transfer (a dropped HTTP connection is not an OSError)."""
    errors: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
    try:
        import aiohttp

        errors += (aiohttp.ClientError,)
    except ImportError:
        pass
    return errors


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of the manifest: ``part`` ('.' or 'a/b') and ``rel`` are '/'-separated and checked safe."""

    part: str
    rel: str
    size: int
    sha256: str

    @property
    def key(self) -> str:
        """Path relative to the cache root."""
        return self.rel if self.part == "." else f"{self.part}/{self.rel}"


# ---------------------------------------------------------------------------------------------
# the manifest and its (untrusted) paths


def parse_manifest(raw: bytes, where: str) -> dict:
    """The manifest document, schema-checked; CacheError (naming ``where``) when it is not one."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CacheError(f"{where}: not a kcache manifest (a JSON object is expected)")
    try:
        validate_document(doc, manifest_schema(doc), where)
    except SchemaError as e:
        raise CacheError(str(e)) from None
    return doc


def manifest_files(doc: dict) -> list[FileEntry]:
    """Every file the manifest lists, with its paths checked; refuses duplicates and reserved names."""
    out, seen = [], set()
    for part in doc["parts"]:
        p = part["path"] if part["path"] == "." else safe_relpath(part["path"], MANIFEST, "part path")
        for rel, meta in part["files"].items():
            entry = FileEntry(p, safe_relpath(rel, MANIFEST, f"file path (part {p!r})"), int(meta["size"]),
                              meta["sha256"])
            head = entry.key.split("/")[0]
            if entry.key == MANIFEST or head == STAGING:
                raise CacheError(f"{MANIFEST}: refusing file {entry.key!r}: the name is reserved for kcache pull")
            if entry.key in seen:
                raise CacheError(f"{MANIFEST}: file {entry.key!r} is listed twice")
            seen.add(entry.key)
            out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# files


def is_complete(path: Path, size: int, sha256: str) -> bool:
    """True when ``path`` is a regular file (not a link) with exactly this size and digest."""
    try:
        return hash_regular(path, size) == (size, sha256)
    except (FileNotFoundError, CacheError):
        return False


def fetch(fs, url: str, partial: Path, size: int, block_size: int, advance=lambda n: None) -> tuple[int, int]:
    """Complete ``partial`` to ``size`` bytes from ``url`` by range reads; returns (downloaded, resumed).

    Each block is appended and flushed before the next is requested, so the partial is always a
    prefix of what was served. A server that ignores Range and sends the whole file is tolerated:
    the partial is replaced by it.
    """
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:  # longer than the file: not a prefix of it
        partial.unlink()
        have = 0
    resumed, downloaded = have, 0
    advance(have)
    errors = _transfer_errors()
    with open(partial, "ab") as f:
        while have < size:
            end = min(have + block_size, size)
            try:
                data = fs.cat_file(url, start=have, end=end)
            except FileNotFoundError:
                raise CacheError(f"{url}: listed in the manifest but missing on the remote") from None
            except errors as e:
                raise CacheError(f"{url}: transfer failed at byte {have} of {size} ({type(e).__name__}: {e}); "
                                 "rerun the same `kcache pull` to resume") from e
            if len(data) == size and (have, end) != (0, size):
                # The server ignored the Range header and sent the whole file: keep that instead.
                f.truncate(0)
                f.write(data)
                advance(size - have)
                resumed, downloaded, have = 0, downloaded + size, size
                break
            if len(data) != end - have:
                raise CacheError(f"{url}: asked for bytes {have}-{end - 1}, got {len(data)} bytes; "
                                 "does the server honour HTTP Range requests?")
            f.write(data)
            f.flush()
            have, downloaded = end, downloaded + len(data)
            advance(len(data))
        os.fsync(f.fileno())
    return downloaded, resumed


def start_staging(staging: Path, raw: bytes) -> None:
    """Keep partial files only if they were fetched for this very manifest.

    The manifest being pulled is recorded in the staging directory; partials left by a pull of
    another version are dropped, since appending to them would mix two versions of a file.
    """
    record = staging / MANIFEST
    if staging.exists() and (not record.exists() or record.read_bytes() != raw):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    if not record.exists():
        record.write_bytes(raw)


# ---------------------------------------------------------------------------------------------
# pull


def check_destination(dest: Path, raw: bytes) -> None:
    """Refuse a ``dest`` that holds anything but a pull of the manifest ``raw`` (or an unfinished pull).

    Allowed: no ``dest``, an empty directory, an unfinished pull (staging directory, no manifest;
    partials of another version are dropped) or a finished pull of this very manifest (a rerun
    only verifies). Anything else, a finalized cache of other samples above all, is never replaced.
    """
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir():
        raise CacheError(f"{dest} exists and is not a directory; pull into a new directory")
    old = dest / MANIFEST
    if old.exists() or old.is_symlink():
        if old.is_file() and not old.is_symlink() and old.read_bytes() == raw:
            return
        raise CacheError(f"{dest} already holds a cache with another {MANIFEST} (other samples or another version); "
                         f"pull never replaces a cache: pull into a new directory, or delete {dest} yourself first")
    if (dest / STAGING).is_dir():
        return
    if any(dest.iterdir()):
        raise CacheError(f"{dest} exists, is not empty and is not an unfinished pull; "
                         "pull into a new or empty directory")


def pull(url: str, dest: str | os.PathLike, progress: bool = True, block_size: int = BLOCK_SIZE,
         layers: list[int] | None = None, split: str | None = None, limit_samples: int | None = None) -> dict:
    """Copy the finalized cache at ``url`` (any fsspec URL or a local path) into directory ``dest``.

    Rerunning resumes (verified files are skipped, partial files continue where they stopped).
    Returns ``{"files", "files_skipped", "bytes_downloaded", "bytes_resumed", "seconds"}``.
    Holds the output lock on ``dest`` throughout (kcache.lock) and refuses a ``dest`` holding
    anything but a pull of the same manifest (``check_destination``).

    With ``layers``, ``split`` or ``limit_samples`` it is a partial pull instead: a new, smaller
    finalized cache of those layers and samples (:func:`kcache.cache.subset.pull_subset`, whose
    report it returns).
    """
    if layers is not None or split is not None or limit_samples is not None:
        return pull_subset(url, dest, layers, split, limit_samples, progress)
    with output_lock(dest, "pull into it"):
        return _pull(url, dest, progress, block_size)


def _pull(url: str, dest: str | os.PathLike, progress: bool, block_size: int) -> dict:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    dest = Path(dest)
    src = Location(url)
    try:
        raw = src.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise CacheError(f"{src}: no {MANIFEST} at the cache root; only finalized caches can be pulled") from None
    doc = parse_manifest(raw, src.url(MANIFEST))
    entries = manifest_files(doc)
    # Every path is checked before anything is written.
    targets = [(e, safe_local_path(dest, e.key, MANIFEST), safe_local_path(dest / STAGING, e.key + ".part", MANIFEST))
               for e in entries]

    check_destination(dest, raw)  # before anything is written there
    dest.mkdir(parents=True, exist_ok=True)
    start_staging(dest / STAGING, raw)
    fs = src.fs
    report = {"files": len(entries), "files_skipped": 0, "bytes_downloaded": 0, "bytes_resumed": 0}
    total = sum(e.size for e in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"pull {dest.name}", disable=not progress) as bar:
        for entry, final, partial in targets:
            if is_complete(final, entry.size, entry.sha256):
                report["files_skipped"] += 1
                bar.update(entry.size)
                continue
            downloaded, resumed = fetch(fs, src.child(entry.part).url(entry.rel), partial, entry.size, block_size,
                                        bar.update)
            report["bytes_downloaded"] += downloaded
            report["bytes_resumed"] += resumed
            got_size = partial.stat().st_size
            got = sha256_file(partial, prefix=False)  # bare hex, as the manifest lists it
            if got_size != entry.size or got != entry.sha256:
                partial.unlink()
                raise CacheError(f"{entry.key}: downloaded content does not match the manifest: "
                                 f"{got_size} bytes, sha256 {got} (manifest: {entry.size} bytes, "
                                 f"sha256 {entry.sha256}); the partial download was deleted")
            os.chmod(partial, READ_ONLY)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
    # last: its presence means every file above is in place
    atomic_write_bytes(dest / MANIFEST, raw, fsync=True, mode=READ_ONLY)
    shutil.rmtree(dest / STAGING, ignore_errors=True)
    problems = validate_cache(dest)
    if problems:
        raise CacheError(f"{dest}: pulled every file the manifest lists, but the cache does not validate:\n  "
                         + "\n  ".join(problems))
    report["seconds"] = time.perf_counter() - t0
    return report


def summary_line(url: str, dest: Path, report: dict) -> str:
    skipped = f", {report['files_skipped']} already present" if report["files_skipped"] else ""
    resumed = f", {report['bytes_resumed']:,} bytes resumed" if report["bytes_resumed"] else ""
    return (f"{url} -> {dest}: {report['files']} files{skipped}; "
            f"{report['bytes_downloaded']:,} bytes downloaded{resumed} "
            f"in {report['seconds']:.1f} s")

