"""Where a cache lives: a local directory or any fsspec URL (http(s)://, s3://, gs://, hf://, memory://, file://).

Readers only ever go through a ``Location``, so every command that reads a cache reads remote
ones too. Remote file systems cannot always list directories (plain HTTP cannot), so nothing
here lists: the manifest says which files exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from kcache.cache.format import MANIFEST, CacheError
from kcache.paths import hash_regular, read_limited, read_regular, safe_local_path, safe_relpath

URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "hf://", "memory://", "file://", "az://", "abfs://")


def is_url(spec: str | os.PathLike) -> bool:
    """True for fsspec URLs (``scheme://...``); plain paths are local."""
    return isinstance(spec, str) and "://" in spec


class Location:
    """A read-only cache root. ``child(rel)`` descends; ``read_bytes``/``exists`` take '/' paths."""

    def __init__(self, spec: str | os.PathLike):
        self.spec = str(spec).rstrip("/") if is_url(spec) else str(Path(spec))
        self.remote = is_url(spec) and not str(spec).startswith("file://")
        if is_url(spec) and not self.remote:
            self.spec = str(Path(str(spec)[len("file://"):]))
        self._fs = None
        # For a part of a finalized cache: relpath -> size from the manifest. The manifest is then
        # the authority on which files exist, and no file is read past its recorded size.
        self.sizes: dict[str, int] | None = None
        # With ``verified`` (a kcache.cache.stream.VerifiedFiles) every listed file is read whole and
        # checked against ``digests`` (relpath -> sha256 from the manifest) before any byte is used.
        self.digests: dict[str, str] | None = None
        self.verified = None

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"Location({self.spec!r})"

    @property
    def local_path(self) -> Path | None:
        return None if self.remote else Path(self.spec)

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.spec)
            except (ImportError, ValueError) as e:
                raise CacheError(f"{self.spec}: cannot open this URL ({e}); install the fsspec backend for its scheme "
                                 "(e.g. s3fs, gcsfs, huggingface_hub, aiohttp)") from None
        return self._fs

    def url(self, rel: str = "") -> str:
        if not rel or rel == ".":
            return self.spec
        return f"{self.spec}/{rel}" if self.remote else str(Path(self.spec) / rel)

    def child(self, rel: str) -> Location:
        return Location(self.url(rel)) if rel not in ("", ".") else self

    def exists(self, rel: str) -> bool:
        if self.sizes is not None and rel != MANIFEST:
            return rel in self.sizes
        if not self.remote:
            return (Path(self.spec) / rel).exists()
        try:
            return bool(self.fs.exists(self.url(rel)))
        except (OSError, ValueError):
            return False

    def verifies(self, rel: str) -> bool:
        """True when reads of ``rel`` go through the verified buffer (a listed file, verification on)."""
        return self.verified is not None and self.sizes is not None and rel in self.sizes

    def read_bytes(self, rel: str, size: int | None = None) -> bytes:
        """The file ``rel``, read to at most ``size`` bytes (default: its manifest size, if known).

        Local files are reached without following links and must be regular files; a file longer
        than its size is a CacheError, so a hostile cache cannot make a reader read without end.
        With verification on, a listed file is also checked against its manifest sha256 first.
        """
        if self.verifies(rel) and size in (None, self.sizes[rel]):
            return self.verified.get(self, rel)
        return self.read_unverified(rel, size)

    def read_unverified(self, rel: str, size: int | None = None) -> bytes:
        """``read_bytes`` without the sha256 check (size limits and link checks still apply)."""
        if size is None and self.sizes is not None:
            size = self.sizes.get(rel)
        if not self.remote:
            return read_regular(safe_local_path(self.spec, rel), size)
        safe_relpath(rel, self.spec)
        try:
            protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
            if {"http", "https"} & set(protocols):
                # A streamed GET, read in blocks: a server cannot push more than size + 1 bytes on us.
                # A known size spares fsspec the HEAD request it would send to learn it (a round trip per file).
                known = {} if size is None else {"size": size + 1}
                with self.fs.open(self.url(rel), "rb", block_size=0, **known) as fh:
                    return read_limited(fh, size, self.url(rel))
            if size is not None:
                data = self.fs.cat_file(self.url(rel), start=0, end=size + 1)
                if len(data) > size:
                    raise CacheError(f"{self.url(rel)}: longer than the {size} bytes its manifest records; "
                                     "refusing to read further")
                return data
            return self.fs.cat_file(self.url(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(rel)}: not found") from None
        except OSError as e:
            raise CacheError(f"{self.url(rel)}: cannot read ({e})") from None

    def digest(self, rel: str, size: int | None = None) -> tuple[int, str]:
        """(bytes, sha256 hex) of ``rel``, streamed, reading at most ``size + 1`` bytes (default: manifest size).

        A file longer than ``size`` reports ``size + 1`` bytes: compare with the size you expect.
        """
        if size is None and self.sizes is not None:
            size = self.sizes.get(rel)
        if not self.remote:
            return hash_regular(safe_local_path(self.spec, rel), size)
        try:
            data = self.read_unverified(rel, size)  # validate reports a mismatch, it does not raise it
        except CacheError as e:
            if size is None or "longer than" not in str(e):
                raise
            return size + 1, "0" * 64  # longer than the manifest says: it cannot match, and is not read further
        import hashlib

        return len(data), hashlib.sha256(data).hexdigest()

    def zarr_store(self):
        """A read-only zarr v3 store rooted here."""
        from zarr.storage import FsspecStore, LocalStore

        if not self.remote:
            store = LocalStore(self.spec, read_only=True)
        else:
            try:
                store = FsspecStore.from_url(self.spec, read_only=True)
            except (ImportError, ValueError, TypeError) as e:
                raise CacheError(f"{self.spec}: cannot open as a zarr store ({e})") from None
        return store if self.sizes is None else manifest_store(store, self)


def manifest_store(store, loc: Location):
    """``store`` seen through a part's manifest: the manifest decides which files exist.

    A key the manifest does not list is absent (zarr reads the fill value, as it does for a chunk
    it never wrote) without touching the file system, so nothing unlisted is ever read; a listed
    key the store cannot find is an error naming the file, never silently zeros. No read goes past
    a file's manifest size: a whole-file read asks for ``size + 1`` bytes and refuses a longer
    file, explicit ranges are clamped to ``size`` (a grown file or an endless body is never read).
    With ``loc.verified`` set, ranges are cut from the whole file after it matched the manifest's
    sha256 (kcache.cache.stream), never read from the store directly.
    """
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.storage import WrapperStore

    def bounded(byte_range, size: int):
        if byte_range is None:
            return RangeByteRequest(0, size + 1)
        if isinstance(byte_range, RangeByteRequest):
            start = min(max(byte_range.start, 0), size)
            return RangeByteRequest(start, max(start, min(byte_range.end, size)))
        if isinstance(byte_range, OffsetByteRequest):
            start = min(max(byte_range.offset, 0), size)
            return RangeByteRequest(start, size)
        if isinstance(byte_range, SuffixByteRequest):  # the manifest's end, not the file's
            return RangeByteRequest(max(size - byte_range.suffix, 0), size)
        raise TypeError(f"unexpected byte range {byte_range!r}")

    class ManifestStore(WrapperStore):
        def _with_store(self, inner):
            return ManifestStore(inner)

        async def get(self, key, prototype, byte_range=None):
            if key not in loc.sizes:
                return None
            size = int(loc.sizes[key])
            rng = bounded(byte_range, size)
            if rng.start >= rng.end:  # nothing to read (a range at or past the manifest's end)
                return prototype.buffer.from_bytes(b"")
            if loc.verifies(key):  # the range, cut from the whole file once it matched its sha256
                data = await loc.verified.aget(loc, key)
                return prototype.buffer.from_bytes(data[rng.start : min(rng.end, size)])
            out = await self._store.get(key, prototype, rng)
            if out is None:
                raise CacheError(f"{loc.url(key)}: listed in {MANIFEST} but missing; the cache is incomplete "
                                 f"(run `kcache validate {loc}`)")
            if len(out) > rng.end - rng.start or (byte_range is None and len(out) > size):
                raise CacheError(f"{loc.url(key)}: longer than the {size} bytes its manifest records; "
                                 f"refusing to read further (run `kcache validate {loc}`)")
            return out

        async def get_partial_values(self, prototype, key_ranges):
            return [await self.get(k, prototype, r) for k, r in key_ranges]

        async def exists(self, key):
            return key in loc.sizes

    return ManifestStore(store)
