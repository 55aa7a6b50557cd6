"""One writer per output: an exclusive lock on the path a command writes, and process-unique temporary names.

``output_lock(out, what)`` holds ``fcntl.flock`` on ``<out>.lock``, a file *beside* the output (so it
works before the output exists and is never inside a cache, its manifest or a bundle). The kernel
releases a flock when its holder exits for any reason (kill -9 included), so a lock is never stale;
a leftover ``.lock`` file from a killed process is simply taken over. The holder writes its pid, host
and command into the file, and a second writer fails at once with :class:`OutputLocked` naming them.
The lock is re-entrant within one process (extract holds it and calls finalize, which takes it too).

Temporary files and directories are named ``<name>.<tag>.<pid>-<random>.tmp`` (:func:`tmp_path`), so
two processes never share one; :func:`remove_stale_tmp` deletes only those whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from kcache.store import CacheError

LOCK_SUFFIX = ".lock"
TMP_SUFFIX = ".tmp"

_held: dict[str, list] = {}  # lock file (absolute) -> [fd, depth]
_guard = threading.Lock()


class OutputLocked(CacheError):
    """Another process holds the lock on an output this command would write."""


def lock_path(out: str | os.PathLike, tag: str | None = None) -> Path:
    """``<out>.lock`` (or ``<out>.<tag>.lock``, e.g. one per rank of a distributed run), beside ``out``."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + (f".{tag}" if tag else "") + LOCK_SUFFIX)


def _holder(fd: int, wait: float = 1.0) -> dict:
    """What the holder wrote into the lock file (it writes right after taking the lock: retry briefly)."""
    end = time.monotonic() + wait
    while True:
        try:
            return json.loads(os.pread(fd, 1 << 16, 0).decode())
        except (ValueError, OSError):
            if time.monotonic() > end:
                return {}
            time.sleep(0.02)


def _message(out: Path, what: str, h: dict, lock: Path) -> str:
    who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}" if h else "pid unknown"
    cmd = f" ({h['command']}, since {h.get('since', '?')})" if h.get("command") else ""
    return (f"another kcache process ({who}) is writing {out}{cmd}; refusing to {what} at the same time. "
            f"Wait for it to finish or stop it (lock: {lock}; the lock is released when that process exits)")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, what: str = "write it", tag: str | None = None):
    """Hold the exclusive lock on output ``out`` for the ``with`` block; raise :class:`OutputLocked` if taken."""
    lock = lock_path(out, tag)
    key = str(lock)
    with _guard:
        mine = _held.get(key)
        if mine is not None:
            mine[1] += 1
    if mine is not None:
        try:
            yield lock
        finally:
            with _guard:
                mine[1] -= 1
        return

    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CacheError(f"cannot write {out}: creating its lock file {lock} failed ({e.strerror}); "
                             f"the directory {lock.parent} must be writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            h = _holder(fd)
            os.close(fd)
            raise OutputLocked(_message(Path(out), what, h, lock)) from None
        # The previous holder unlinks the file on release: make sure we locked the file that is
        # at the path now, not an unlinked one (else two processes could both "hold" the lock).
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["kcache", *sys.argv[1:]])[:500],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    with _guard:
        _held[key] = [fd, 1]
    try:
        yield lock
    finally:
        with _guard:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: whoever opens the path next gets a fresh file
        os.close(fd)


def holds_lock(out: str | os.PathLike, tag: str | None = None) -> bool:
    """Whether this process holds the lock on ``out``."""
    with _guard:
        return str(lock_path(out, tag)) in _held


# ---------------------------------------------------------------------------------------------
# temporary names


def tmp_path(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """A process-unique temporary sibling of ``final``: ``<name>.<tag>.<pid>-<random>.tmp``."""
    final = Path(final)
    return final.with_name(f"{final.name}.{tag}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_tmp_name(name: str) -> bool:
    """Whether a file name is one of kcache's temporary names (never part of a cache)."""
    return name.endswith(TMP_SUFFIX) or name.endswith(".creating")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(final: str | os.PathLike, tag: str = "tmp") -> list[Path]:
    """Delete temporaries of ``final`` (from :func:`tmp_path`) left by processes that are gone.

    A temporary whose process is alive on this host is left alone (it is someone's work in progress).
    """
    final = Path(final)
    removed = []
    prefix = f"{final.name}.{tag}."
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        name = p.name
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[len(prefix):-len(TMP_SUFFIX)].split("-")[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed
