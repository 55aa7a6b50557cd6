"""Where a cache lives: a local directory or any fsspec URL (http(s)://, s3://, gs://, hf://, memory://, file://).

Readers only ever go through a ``Location``, so every command that reads a cache reads remote
ones too. Remote file systems cannot always list directories (plain HTTP cannot), so nothing
here lists: the manifest says which files exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from kcache.store import CacheError

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
                raise CacheError(f"{self.spec}: cannot open this URL ({e}); install the fsspec backend for its scheme (e.g. s3fs, gcsfs, huggingface_hub, aiohttp)") from None
        return self._fs

    def url(self, rel: str = "") -> str:
        if not rel or rel == ".":
            return self.spec
        return f"{self.spec}/{rel}" if self.remote else str(Path(self.spec) / rel)

    def child(self, rel: str) -> "Location":
        return Location(self.url(rel)) if rel not in ("", ".") else self

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (Path(self.spec) / rel).exists()
        try:
            return bool(self.fs.exists(self.url(rel)))
        except (OSError, ValueError):
            return False

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            return (Path(self.spec) / rel).read_bytes()
        try:
            return self.fs.cat_file(self.url(rel))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(rel)}: not found") from None
        except OSError as e:
            raise CacheError(f"{self.url(rel)}: cannot read ({e})") from None

    def zarr_store(self):
        """A read-only zarr v3 store rooted here."""
        from zarr.storage import FsspecStore, LocalStore

        if not self.remote:
            return LocalStore(self.spec, read_only=True)
        try:
            return FsspecStore.from_url(self.spec, read_only=True)
        except (ImportError, ValueError, TypeError) as e:
            raise CacheError(f"{self.spec}: cannot open as a zarr store ({e})") from None
