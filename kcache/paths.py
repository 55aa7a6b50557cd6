"""Paths and files of untrusted caches: one place that decides what a manifest key may name.

A cache from a stranger is data, never instructions. Every key of a manifest (and every path
kcache derives from one) goes through ``safe_relpath`` before it is joined to anything, and every
local file of a cache is reached through ``safe_local_path`` + ``read_regular``/``hash_regular``:

- a key is a relative POSIX path inside its part: not empty, no leading '/', no backslash, no NUL,
  no Windows drive ('c:...'), no empty, '.' or '..' component;
- resolved against a local directory, no component below that directory may be a symlink
  (checked with lstat, component by component), and the file itself must be a regular file
  (no fifo, device, socket or directory);
- a file is never read past the size the manifest records for it (at most ``size + 1`` bytes
  are read, and a longer file is an error), so /dev/zero or a grown file cannot exhaust memory.

schemas/cache-manifest-v1.json states the same key rules (``propertyNames``), so other tools
reading a manifest see them too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kcache._io import BLOCK, hash_stream  # noqa: F401 - re-exported: the one streaming hash
from kcache._io import sha256_file as _sha256_file
from kcache.errors import CacheError

MANIFEST = "manifest.json"
# Files a manifest does not size (metadata of a cache that is not finalized) are still read with a limit.
UNLISTED_LIMIT = 1 << 30
# The largest file a manifest may list (schemas/cache-manifest-v1.json says the same): sizes beyond
# it are refused before any capacity check trusts them.
MAX_FILE_SIZE = 1 << 40


def safe_relpath(key: object, where: str, what: str = "file path") -> str:
    """``key`` if it is a plain relative '/'-path inside its part, else CacheError naming ``where``."""
    if not isinstance(key, str) or not key:
        raise CacheError(f"{where}: {what} {key!r} is not a relative path")
    bad = (
        key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or (len(key) > 1 and key[1] == ":")  # a Windows drive
        or any(c in ("", ".", "..") for c in key.split("/"))
    )
    if bad:
        raise CacheError(f"{where}: refusing unsafe {what} {key!r} (absolute paths, backslashes, NUL, '..', '.' "
                         "and empty components are not allowed in a cache)")
    return key


def check_manifest_paths(doc: dict, where: str) -> None:
    """Every part path and file key of a manifest document, checked with ``safe_relpath``; every
    file size an integer in ``0..MAX_FILE_SIZE`` (also in the schema: checked here whatever validated it)."""
    for part in doc.get("parts", []):
        path = part.get("path")
        if path != ".":
            safe_relpath(path, where, "part path")
        for key, f in part.get("files", {}).items():
            safe_relpath(key, where, f"file path (part {path!r})")
            size = f.get("size") if isinstance(f, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
                raise CacheError(f"{where}: file {key!r} (part {path!r}): "
                                 f"size {size!r} is not an integer in 0..{MAX_FILE_SIZE}")


def safe_local_path(root: str | os.PathLike, key: str, where: str | None = None) -> Path:
    """``root/key`` after ``safe_relpath``, refusing a symlink at any existing component below ``root``.

    Components that do not exist yet are fine (a writer creates them); ``root`` itself is the
    caller's choice and may be a link.
    """
    root = Path(root)
    safe_relpath(key, where or str(root))
    p = root
    for comp in key.split("/"):
        p = p / comp
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            raise CacheError(f"{p}: is a symbolic link; a cache never follows links (refusing {key!r})")
    return root / key


def regular_file(path: Path) -> os.stat_result:
    """lstat of ``path``; CacheError unless it is a regular file (not a link, fifo, device, directory)."""
    st = os.lstat(path)  # FileNotFoundError propagates: callers say "missing"
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"{path}: is a symbolic link; a cache never follows links")
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"{path}: not a regular file (a directory, fifo, socket or device); refusing to read it")
    return st


def _open_regular(path: Path):
    regular_file(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CacheError(f"{path}: cannot open ({e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between lstat and open
        os.close(fd)
        raise CacheError(f"{path}: not a regular file; refusing to read it")
    return os.fdopen(fd, "rb")


def read_limited(fh, size: int | None, where: str) -> bytes:
    """Read a file object to its end, but never more than ``size + 1`` bytes (CacheError when longer)."""
    limit = UNLISTED_LIMIT if size is None else size
    out = bytearray()
    while len(out) <= limit:
        chunk = fh.read(min(BLOCK, limit + 1 - len(out)))
        if not chunk:
            break
        out += chunk
    if len(out) > limit:
        if size is not None:
            what = f"the {size} bytes its manifest records"
        else:
            what = f"{UNLISTED_LIMIT} bytes (no manifest size)"
        raise CacheError(f"{where}: longer than {what}; refusing to read further")
    return bytes(out)


def read_regular(path: Path, size: int | None = None) -> bytes:
    """The bytes of regular file ``path``, reading at most ``size + 1`` (CacheError when longer)."""
    with _open_regular(path) as fh:
        return read_limited(fh, size, str(path))


def hash_regular(path: Path, size: int | None = None) -> tuple[int, str]:
    """(bytes, sha256 hex) of regular file ``path`` in blocks; stops after ``size + 1`` bytes (reported as longer)."""
    with _open_regular(path) as fh:
        return hash_stream(fh, size)


def sha256_file(path: str | os.PathLike) -> str:
    """Bare hex sha256 of a trusted local file (links followed: e.g. model files in the Hugging Face cache).

    The form manifests store; ``kcache._io.sha256_file`` gives the ``sha256:``-prefixed one."""
    return _sha256_file(path, prefix=False)


def local_tree_problems(root: Path, listed: dict[str, dict] | None,
                        skip_dirs: tuple[str, ...] = ()) -> tuple[list[str], dict[str, int]]:
    """Links and non-regular files anywhere under ``root`` (never followed), and listed files that are missing.

    ``listed`` is the part's manifest ``files`` (None when not finalized). Returns the problems and
    the size of every regular file found. Cheap: one lstat per entry, nothing is read.
    """
    problems: list[str] = []
    seen: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = (rel_dir / name).as_posix()
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{p}: is a symbolic link; a cache never follows links")
                if name in dirnames:
                    dirnames.remove(name)
            elif name in dirnames:
                continue
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{p}: not a regular file (fifo, socket or device)")
            else:
                seen[rel] = st.st_size
    if listed is not None:
        for rel in sorted(set(listed) - set(seen)):
            if not any(p.startswith(f"{root / rel}:") for p in problems):
                problems.append(f"{root / rel}: listed in {MANIFEST} but missing")
    return problems, seen
