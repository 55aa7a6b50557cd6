"""``kcache push CACHE URL``: publish a finalized local cache to any writable fsspec URL, resumably.

Conventions:

- Only a finalized cache that validates is pushed (``validate_cache``: every digest, every value).
- Order at the destination: a marker ``.kcache-push.json`` (schemas/push-marker-v1.json: which
  manifest is being pushed), then every file the manifest lists with each part's root
  ``zarr.json`` after the part's other files (so an unfinished part is never readable as a store),
  then the dataset card (:mod:`kcache.cache.card`), then ``manifest.json`` byte for byte, then the
  marker is removed. A reader opening the URL sees no cache until every file is in place.
- Each file is uploaded whole (``fs.put_file``), then checked: its size, and, by reading it back
  and hashing it (``readback=True``, the default), its sha256. A store that refuses reads of what
  was written (a write-only bucket policy) gets the size check only, and the report says so.
- Resumable: a file already at the destination with the manifest's size and sha256 is skipped, so
  rerunning an interrupted push uploads only what is missing; a push of the same cache to a
  destination that already holds it uploads nothing and verifies every file (a verified no-op).
- Never overwrites another cache: a destination whose ``manifest.json`` differs, one holding an
  unfinished push of another manifest, or a non-empty destination without either, is refused
  naming the URL (on the Hugging Face Hub, a new repository's ``.gitattributes`` and default
  ``README.md`` count as empty). Right before the manifest is written the marker is read again and
  must still be this push's, and no other manifest may have appeared: a concurrent push is refused.
  Nothing is ever deleted at the destination except the marker.
- The card is not listed in the manifest, which stays byte-identical. A single-store cache keeps
  its own ``README.md`` (the store card, one of its files), so its dataset card is written as
  ``DATASET_CARD.md``; a multi-part cache (torchrun, merge) gets it as ``README.md``.
- Local destinations (paths, ``file://``) hold the output lock (kcache.lock) and get read-only
  cache files like a pull; remote stores cannot be locked: one push per URL at a time is up to you.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import time
from pathlib import Path

from kcache import __version__
from kcache._io import hash_stream, now
from kcache.cache.card import CARD_NAME, SIDECAR_CARD_NAME, dataset_card
from kcache.cache.format import MANIFEST, CacheError
from kcache.cache.integrity import validate_cache
from kcache.cache.location import is_url
from kcache.cache.reader import Cache
from kcache.cache.remote import FileEntry, manifest_files, parse_manifest
from kcache.cache.writer import OBJECT_STORE_FOLDER_LIMIT
from kcache.lock import output_lock
from kcache.paths import read_regular, safe_local_path
from kcache.schemas import SchemaError, validate_document

MARKER = ".kcache-push.json"
MARKER_FORMAT = "kcache-push"
MARKER_VERSION = 1
MAX_SMALL = 1 << 20  # markers and cards read back from a destination: never more than this
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


# ---------------------------------------------------------------------------------------------
# pure: order, folders, card name, marker


def upload_order(entries: list[FileEntry]) -> list[FileEntry]:
    """Manifest order, except that each part's root ``zarr.json`` comes after every other file: until it
    is there, the part is not a zarr group, so an interrupted push never looks like a readable store."""
    roots = [e for e in entries if e.rel == "zarr.json"]
    return [e for e in entries if e.rel != "zarr.json"] + roots


def folder_entries(keys) -> dict[str, int]:
    """Folder ('' = the root) -> number of distinct entries (files and sub-folders) directly in it, for
    '/'-separated file keys (what an object store lists under a prefix with a '/' delimiter)."""
    children: dict[str, set] = collections.defaultdict(set)
    for key in keys:
        parts = key.split("/")
        for i in range(len(parts)):
            children["/".join(parts[:i])].add(parts[i])
    return {folder: len(names) for folder, names in children.items()}


def crowded_folders(keys, limit: int = OBJECT_STORE_FOLDER_LIMIT) -> list[tuple[str, int]]:
    """Folders holding more than ``limit`` entries, largest first."""
    big = [(f, n) for f, n in folder_entries(keys).items() if n > limit]
    return sorted(big, key=lambda fn: (-fn[1], fn[0]))


def card_name(entries: list[FileEntry]) -> str | None:
    """Where the dataset card goes: ``README.md`` unless the cache lists a root file of that name (a
    single-store cache's store card), then ``DATASET_CARD.md``; None if both are taken."""
    listed = {e.key for e in entries}
    return next((n for n in (CARD_NAME, SIDECAR_CARD_NAME) if n not in listed), None)


def marker_document(raw_manifest: bytes, manifest: dict) -> dict:
    """The push marker (schemas/push-marker-v1.json) for the manifest bytes ``raw_manifest``."""
    return {"format": MARKER_FORMAT, "schema_version": MARKER_VERSION, "kcache_version": __version__,
            "started": now(), "manifest_sha256": hashlib.sha256(raw_manifest).hexdigest(),
            "metadata_digest": manifest["metadata_digest"]}


HUB_DEFAULTS = (".gitattributes",)  # what the Hugging Face Hub puts in every new repository


def listing_is_empty(names, hub: bool) -> bool:
    """Whether a destination whose root lists ``names`` (paths or names) counts as empty. On the
    Hugging Face Hub (``hub``) a new dataset repository already holds ``.gitattributes`` and perhaps
    a default ``README.md``: those alone count as empty (the README is replaced by the dataset card)."""
    left = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in names}
    if hub:
        left -= set(HUB_DEFAULTS)
        if left == {CARD_NAME}:
            left = set()
    return not left


def dataset_counts(cache: Cache) -> dict[str, int]:
    """Samples per value of the index's ``dataset`` column."""
    return dict(collections.Counter(cache.index["dataset"].to_pylist()))


# ---------------------------------------------------------------------------------------------
# the destination (I/O)


@dataclasses.dataclass
class Destination:
    """A writable fsspec location: ``fs`` and the ``root`` path inside it; ``url`` as given."""

    url: str
    fs: object
    root: str
    local: Path | None

    def path(self, key: str) -> str:
        if self.local is not None:  # no symbolic link on the way into a local destination (kcache.paths)
            return str(safe_local_path(self.local.absolute(), key, self.url))
        return f"{self.root.rstrip('/')}/{key}"

    def where(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    @classmethod
    def open(cls, url: str | os.PathLike, storage_options: dict | None = None) -> Destination:
        import fsspec

        spec = str(url)
        local = None if is_url(spec) and not spec.startswith("file://") else Path(spec.removeprefix("file://"))
        try:
            fs, root = fsspec.core.url_to_fs(str(local.absolute()) if local else spec, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise CacheError(f"{spec}: cannot open this URL for writing ({e}); install the fsspec backend for its "
                             "scheme (e.g. s3fs, gcsfs, huggingface_hub)") from None
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        if {"http", "https"} & set(protocols):
            raise CacheError(f"{spec}: http(s) URLs are read-only; push to a store that takes writes (s3://, gs://, "
                             "hf://, az://, file:// or a local path) and serve that over HTTP")
        return cls(spec, fs, root, local)

    def info(self, key: str) -> dict | None:
        """The store's info about ``key`` (None when absent)."""
        try:
            return self.fs.info(self.path(key))
        except FileNotFoundError:
            return None

    def read_small(self, key: str) -> bytes | None:
        """A small file (marker, card, manifest), read to at most ``MAX_SMALL`` bytes; None when absent."""
        try:
            data = self.fs.cat_file(self.path(key), start=0, end=MAX_SMALL + 1)
        except FileNotFoundError:
            return None
        if len(data) > MAX_SMALL:
            raise CacheError(f"{self.where(key)}: larger than {MAX_SMALL} bytes; not a kcache {key}")
        return data

    def digest(self, key: str, size: int) -> tuple[int, str]:
        """(bytes, sha256 hex) of ``key`` read back, never past ``size + 1`` bytes."""
        with self.fs.open(self.path(key), "rb") as fh:
            return hash_stream(fh, size)

    def prepare(self, key: str) -> None:
        """Local destinations: create the folders on the way to ``key`` and remove a file already there (a
        failed earlier upload, or a read-only file of an earlier push: replaced, never written into).
        Object stores need neither."""
        if self.local is not None:
            path = Path(self.path(key))
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def write_small(self, key: str, data: bytes) -> None:
        self.prepare(key)
        self.fs.pipe_file(self.path(key), data)

    @property
    def hub(self) -> bool:
        """Whether this is a Hugging Face Hub repository (``hf://``)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return "hf" in protocols

    def is_empty(self) -> bool:
        try:
            if self.fs.isfile(self.root):
                return False
            return listing_is_empty(self.fs.ls(self.root, detail=False), self.hub)
        except FileNotFoundError:
            return True


def upload_file(dest: Destination, src: Path, key: str) -> None:
    """Upload one local file to ``key`` (the whole file; tests replace this to interrupt a push)."""
    dest.prepare(key)
    dest.fs.put_file(str(src), dest.path(key))


def check_destination(dest: Destination, raw: bytes) -> str:
    """``"published"`` (holds this very manifest), ``"resume"`` (an unfinished push of it) or ``"new"``
    (empty); anything else is refused naming the URL."""
    if dest.local is not None and (dest.local.is_symlink() or dest.local.exists()) and not dest.local.is_dir():
        raise CacheError(f"{dest.url} exists and is not a directory; push into a new or empty directory")
    old = dest.read_small(MANIFEST)
    if old is not None:
        if old == raw:
            return "published"
        raise CacheError(f"{dest.url} already holds a different cache (its {MANIFEST} differs from the one being "
                         f"pushed: {_digest_of(old)} vs {_digest_of(raw)}); push never overwrites a published cache: "
                         f"push to another URL, or delete {dest.url} yourself first")
    marker = dest.read_small(MARKER)
    if marker is not None:
        doc = _parse_marker(marker, dest.where(MARKER))
        if doc["manifest_sha256"] == hashlib.sha256(raw).hexdigest():
            return "resume"
        raise CacheError(f"{dest.url} holds an unfinished push of another cache (metadata "
                         f"{doc['metadata_digest'][:19]}…, started {doc['started']}); finish that push, or delete "
                         f"{dest.url} yourself first")
    if not dest.is_empty():
        raise CacheError(f"{dest.url} is not empty and holds neither this cache nor an unfinished push of it; "
                         "push into a new or empty location")
    return "new"


def check_still_ours(dest: Destination, raw: bytes, marker: bytes) -> None:
    """Right before the manifest is written: the push marker must still be the one this push wrote, and
    no other ``manifest.json`` may have appeared (two pushes to one URL at once); refused naming the URL."""
    now_marker = dest.read_small(MARKER)
    if now_marker != marker:
        what = "is gone" if now_marker is None else "names another push"
        raise CacheError(f"{dest.url}: the push marker {MARKER} {what}: another push to this URL ran at the same "
                         f"time; {MANIFEST} was not written. Push one cache per URL at a time, check {dest.url}, "
                         "and rerun")
    old = dest.read_small(MANIFEST)
    if old is not None and old != raw:
        raise CacheError(f"{dest.url}: another push wrote a different {MANIFEST} meanwhile ({_digest_of(old)} vs "
                         f"{_digest_of(raw)}); this push did not overwrite it. Push one cache per URL at a time")


def _digest_of(raw: bytes) -> str:
    try:
        return f"metadata {json.loads(raw)['metadata_digest'][:19]}…"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "not a kcache manifest"


def _parse_marker(raw: bytes, where: str) -> dict:
    try:
        doc = json.loads(raw)
        validate_document(doc, "push-marker-v1", where)
    except (ValueError, UnicodeDecodeError, SchemaError) as e:
        raise CacheError(f"{where}: not a kcache push marker ({e}); delete it if nothing is pushing there") from None
    return doc


# ---------------------------------------------------------------------------------------------
# push


def push(cache: str | os.PathLike, url: str, license: str = "other", dataset_licenses: dict[str, str] | None = None,
         readback: bool = True, progress: bool = True, storage_options: dict | None = None) -> dict:
    """Publish the finalized local cache ``cache`` at ``url`` (any writable fsspec URL or a local path).

    Returns ``{"url", "state", "files", "files_skipped", "files_uploaded", "bytes_uploaded",
    "verified_sha256", "verified_size_only", "card", "card_written", "manifest_written", "warnings",
    "seconds"}``; ``state`` is what the destination held before: ``new``, ``resume`` or ``published``.
    ``license``/``dataset_licenses`` go into the dataset card; ``storage_options`` to fsspec.
    """
    cache = Path(str(cache).removeprefix("file://"))
    dest = Destination.open(url, storage_options)
    lock = output_lock(dest.local, "push into it") if dest.local is not None else contextlib.nullcontext()
    with lock:
        return _push(cache, dest, license, dataset_licenses, readback, progress)


def _source(cache: Path) -> tuple[Cache, bytes, dict, list[FileEntry]]:
    """The source cache, checked: local, finalized, valid. Returns it with its manifest bytes, document and files."""
    if is_url(str(cache)):
        raise CacheError(f"{cache}: push publishes a local cache; pull it first (`kcache pull {cache} DIR`)")
    if not (cache / MANIFEST).is_file():
        raise CacheError(f"{cache}: not a finalized cache (no {MANIFEST}); only finalized caches can be pushed: "
                         "finish the extraction (rerun it) or run `kcache finalize`")
    problems = validate_cache(cache, require_manifest=True)
    if problems:
        raise CacheError(f"{cache}: does not validate, refusing to push it:\n  " + "\n  ".join(problems[:20]))
    raw = read_regular(safe_local_path(cache, MANIFEST))
    doc = parse_manifest(raw, str(cache / MANIFEST))
    return Cache.open(cache), raw, doc, manifest_files(doc)


def _push(cache: Path, dest: Destination, license: str, dataset_licenses, readback: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    src, raw, doc, entries = _source(cache)
    if any(e.key == MARKER for e in entries):
        raise CacheError(f"{cache / MANIFEST}: lists {MARKER!r}, a name reserved for kcache push")
    state = check_destination(dest, raw)
    report = {"url": dest.url, "state": state, "files": len(entries), "files_skipped": 0, "files_uploaded": 0,
              "bytes_uploaded": 0, "verified_sha256": 0, "verified_size_only": 0, "card": card_name(entries),
              "card_written": False, "manifest_written": False, "warnings": _folder_warnings(entries)}
    marker = json.dumps(marker_document(raw, doc), indent=1, sort_keys=True).encode()
    if state != "published":
        dest.write_small(MARKER, marker)
    with tqdm(total=sum(e.size for e in entries), unit="B", unit_scale=True, desc=f"push {cache.name}",
              disable=not progress) as bar:
        for entry in upload_order(entries):
            _push_file(cache, dest, entry, readback, report)
            bar.update(entry.size)
    if report["card"] is not None:
        card = dataset_card(doc, src.attrs, dataset_counts(src), license, dataset_licenses, dest.url).encode()
        report["card_written"] = _put_small(dest, report["card"], card)
    if state != "published":
        check_still_ours(dest, raw, marker)
        _put_small(dest, MANIFEST, raw, mode=READ_ONLY)  # last: from here on the URL is a cache
        report["manifest_written"] = True
    with contextlib.suppress(FileNotFoundError):
        dest.fs.rm_file(dest.path(MARKER))
    report["seconds"] = time.perf_counter() - t0
    return report


def _verify(dest: Destination, entry: FileEntry, readback: bool) -> str | None:
    """``"sha256"`` / ``"size"`` when the file at the destination matches the manifest (read back and
    hashed / sized only, where the store refuses reads), None when it is missing or differs."""
    info = dest.info(entry.key)
    if info is None or int(info.get("size", -1)) != entry.size:
        return None
    if not readback:
        return "size"
    try:
        size, sha = dest.digest(entry.key, entry.size)
    except (PermissionError, NotImplementedError):
        return "size"  # the store does not let us read what we wrote: its size is all we can check
    except FileNotFoundError:
        return None
    return "sha256" if (size, sha) == (entry.size, entry.sha256) else None


def _push_file(cache: Path, dest: Destination, entry: FileEntry, readback: bool, report: dict) -> None:
    """Skip ``entry`` if it is already at the destination, else upload and verify it."""
    how = _verify(dest, entry, readback)
    if how is not None:
        report["files_skipped"] += 1
    else:
        upload_file(dest, safe_local_path(cache, entry.key), entry.key)
        how = _verify(dest, entry, readback)
        if how is None:
            info = dest.info(entry.key) or {}
            raise CacheError(f"{dest.where(entry.key)}: uploaded, but the store holds something else "
                             f"({info.get('size', 'no')} bytes; manifest: {entry.size} bytes, sha256 "
                             f"{entry.sha256[:12]}…); rerun the same `kcache push` to upload it again")
        report["files_uploaded"] += 1
        report["bytes_uploaded"] += entry.size
        if dest.local is not None:
            os.chmod(dest.path(entry.key), READ_ONLY)  # a finalized cache's files are read-only, as after a pull
    report["verified_sha256" if how == "sha256" else "verified_size_only"] += 1


def _put_small(dest: Destination, key: str, data: bytes, mode: int | None = None) -> bool:
    """Write a small file unless it already holds ``data``; read it back. True when written."""
    if dest.read_small(key) == data:
        return False
    dest.write_small(key, data)
    if dest.read_small(key) != data:
        raise CacheError(f"{dest.where(key)}: written, but reads back differently; rerun the same `kcache push`")
    if mode is not None and dest.local is not None:
        os.chmod(dest.path(key), mode)
    return True


def _folder_warnings(entries: list[FileEntry]) -> list[str]:
    out = []
    for folder, n in crowded_folders([e.key for e in entries], OBJECT_STORE_FOLDER_LIMIT)[:3]:
        out.append(f"folder {folder or '.'!r} holds {n:,} entries, more than the {OBJECT_STORE_FOLDER_LIMIT:,} "
                   "object stores handle well (the Hugging Face Hub's recommended maximum); re-extract with a larger "
                   "--shard-rows (kcache.cache.writer.shard_rows_within) or split the cache")
    return out


def summary_line(cache, report: dict) -> str:
    how = ("every file read back and hashed" if not report["verified_size_only"]
           else f"{report['verified_size_only']} file(s) checked by size only (the store refused reads)")
    if report["state"] == "published" and not report["files_uploaded"]:
        head = f"{cache} -> {report['url']}: already published, {report['files']} files verified ({how})"
    else:
        skipped = f", {report['files_skipped']} already there" if report["files_skipped"] else ""
        head = (f"{cache} -> {report['url']}: {report['files']} files{skipped}; "
                f"{report['bytes_uploaded']:,} bytes uploaded, {how}")
    card = f"; card {report['card']}" + ("" if report["card_written"] else " unchanged") if report["card"] else ""
    return head + card + f" in {report['seconds']:.1f} s"
