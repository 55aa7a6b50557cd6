"""Small file helpers used everywhere, defined once: atomic writes, file hashes, timestamps, figures.

* **Atomic writes.** :func:`atomic_path` names a temporary sibling of the target with
  :func:`kcache.lock.fresh_tmp` (``<name>.<tag>.<pid>-<random>.tmp``: process-unique, recognised as
  a temporary by :func:`kcache.lock.is_tmp_name`, and removed by the next writer once its process
  is gone), lets the caller write it, then renames it over the target (``os.replace``); on an
  error the temporary is deleted and the target is untouched. :func:`atomic_write_bytes`,
  :func:`atomic_write_text` and :func:`atomic_write_json` are the common cases. ``fsync=True``
  flushes the data to disk before the rename (used where a crash must never leave a torn file
  under the final name, e.g. a pulled cache's manifest); ``mode`` sets the permission bits
  before the rename (a read-only manifest is never visible writable).
* **Hashes.** :func:`hash_stream` is the one streaming sha256 (one block in memory whatever the
  file's size); :func:`sha256_file` gives ``"sha256:<hex>"`` (``prefix=False``: bare hex, the form
  cache manifests, ``kcache-source.json`` and the fingerprint memo store).
* **Timestamps.** :func:`now`: UTC, ISO 8601 to the second, ``2025-01-31T12:00:00+00:00`` (every
  ``created`` field).
* **Figures.** :func:`pyplot` (matplotlib on the Agg backend) and :func:`save_png` (tight layout,
  atomic write, figure closed).

No kcache imports at module level: a leaf that :mod:`kcache.paths` and the :mod:`kcache.cache` package import.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

BLOCK = 1 << 20  # bytes per read when hashing


def now() -> str:
    """The current UTC time, ISO 8601 to the second: ``2025-01-31T12:00:00+00:00``."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# hashes


def hash_stream(fh, size: int | None = None) -> tuple[int, str]:
    """(bytes, sha256 hex) of a binary file object, read in blocks; stops after ``size + 1`` bytes.

    The one streaming hash of kcache: memory stays at one block whatever the file's size.
    """
    h, n = hashlib.sha256(), 0
    limit = float("inf") if size is None else size
    while n <= limit:
        chunk = fh.read(int(min(BLOCK, limit + 1 - n)))
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def sha256_file(path: str | os.PathLike, prefix: bool = True) -> str:
    """sha256 of a trusted local file (links followed): ``"sha256:<hex>"``, or bare hex with ``prefix=False``.

    Untrusted files (a cache from a stranger) go through ``kcache.paths.hash_regular`` instead,
    which refuses links and special files and stops at the size the manifest records.
    """
    with open(path, "rb") as fh:
        digest = hash_stream(fh)[1]
    return "sha256:" + digest if prefix else digest


# ---------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, tag: str = "tmp", mode: int | None = None):
    """Yield a fresh temporary sibling of ``path`` to write; on success it replaces ``path``.

    The name comes from :func:`kcache.lock.fresh_tmp` (stale temporaries of ``path`` left by dead
    processes are removed first). On any exception the temporary is deleted and ``path`` is left
    as it was. ``mode``: permission bits set on the temporary before the rename.
    """
    from kcache.lock import fresh_tmp  # lazy: this module stays a leaf (no kcache imports at module level)

    path = Path(path)
    tmp = fresh_tmp(path, tag)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if tmp.is_file() or tmp.is_symlink():
                tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False, mode: int | None = None,
                       tag: str = "tmp") -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (:func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, tag, mode) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False, mode: int | None = None,
                      tag: str = "tmp") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync, mode=mode, tag=tag)


def atomic_write_json(path: str | os.PathLike, obj, *, end: str = "", fsync: bool = False, mode: int | None = None,
                      tag: str = "tmp", **json_kwargs) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj, **json_kwargs) + end``."""
    return atomic_write_text(path, json.dumps(obj, **json_kwargs) + end, fsync=fsync, mode=mode, tag=tag)


# ---------------------------------------------------------------------------------------------
# figures


def read_json(path: str | os.PathLike, error: type[Exception]):
    """The JSON document at ``path``; text that does not parse raises ``error`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out ``fig`` tightly, write it to ``path`` as PNG atomically, and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path
