"""One writer per output: an exclusive lock on the path a command writes, and process-unique temporary names.

``output_lock(out, what)`` holds ``fcntl.flock`` on ``<out>.lock``, a file *beside* the output (so it
works before the output exists and is never inside a cache, its manifest or a bundle). The kernel
releases a flock when its holder exits for any reason (kill -9 included), so a lock is never stale;
a leftover ``.lock`` file from a killed process is simply taken over. The holder writes its pid, host
and command into the file, and a second writer fails at once with :class:`OutputLocked` naming them.
The lock is re-entrant within one *thread* (extract holds it and calls finalize, which takes it
too); another thread of the same process is refused like another process. The lock file is opened
without following links and must be a regular file (a planted ``<out>.lock`` symlink is refused,
never written through).

Temporary files and directories are named ``<name>.<tag>.<pid>-<random>.tmp`` (:func:`tmp_path`), so
two processes never share one; :func:`remove_stale_tmp` deletes only those whose process is gone
(or, for this process's own, those no live thread of it created). :func:`fresh_tmp` does both.
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
import stat
import sys
import threading
import time
from pathlib import Path

from kcache.errors import CacheError

LOCK_SUFFIX = ".lock"
TMP_SUFFIX = ".tmp"

_held: dict[str, list] = {}  # lock file (absolute) -> [fd, depth, owner thread ident, holder info]
_guard = threading.Lock()
_live_tmp: dict[str, int] = {}  # temporaries this process named (tmp_path) -> ident of the thread that did


class OutputLocked(CacheError):
    """Another process (or another thread of this one) holds the lock on an output this command would write.

    The command line exits 3 (the environment stopped the work), not 2: see ``kcache.cli.errors.EXIT_CODES``."""


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
    me = threading.get_ident()
    with _guard:
        mine = _held.get(key)
        if mine is not None and mine[2] == me:
            mine[1] += 1
    if mine is not None:
        if mine[2] != me:  # another thread of this process: one writer per output, threads included
            raise OutputLocked(_message(Path(out), what, mine[3], lock) + " (held by another thread of this process)")
        try:
            yield lock
        finally:
            with _guard:
                mine[1] -= 1
        return

    while True:
        fd = _open_lock(out, lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            h = _holder(fd)
            os.close(fd)
            raise OutputLocked(_message(Path(out), what, h, lock)) from None
        try:
            # The previous holder unlinks the file on release: make sure we locked the file that is
            # at the path now, not an unlinked one (else two processes could both "hold" the lock).
            try:
                st = os.lstat(lock)
                same = stat.S_ISREG(st.st_mode) and st.st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    # From here on we hold the flock: whatever happens, release it (close) and never leak the fd.
    registered = False
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["kcache", *sys.argv[1:]])[:500],
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _guard:
            _held[key] = [fd, 1, me, info]
            registered = True
        yield lock
    finally:
        if registered:
            with _guard:
                _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: whoever opens the path next gets a fresh file
        os.close(fd)


def _open_lock(out, lock: Path) -> int:
    """Open (create) the lock file without following a link; refuse anything but a regular file.

    A failure to create it (read-only or missing directory) propagates as the ``OSError`` of its
    kind, naming the lock file, so the CLI reports it as the environment problem it is.
    """
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = os.lstat(lock)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise CacheError(_not_regular(out, lock, st.st_mode))
        flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_NONBLOCK", 0))
        fd = os.open(lock, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link planted between lstat and open
            raise CacheError(_not_regular(out, lock, stat.S_IFLNK)) from None
        raise OSError(e.errno, f"cannot write {out}: creating its lock file {lock} failed ({e.strerror}); "
                               f"the directory {lock.parent} must be writable", str(lock)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(_not_regular(out, lock, stat.S_IFIFO))
    return fd


def _not_regular(out, lock: Path, mode: int) -> str:
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    return (f"cannot write {out}: its lock file {lock} is {kind}; refusing to use it (kcache never writes "
            f"through a link). Remove {lock} and rerun")


def holds_lock(out: str | os.PathLike, tag: str | None = None) -> bool:
    """Whether this process holds the lock on ``out``."""
    with _guard:
        return str(lock_path(out, tag)) in _held


# ---------------------------------------------------------------------------------------------
# temporary names


def tmp_path(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """A process-unique temporary sibling of ``final``: ``<name>.<tag>.<pid>-<random>.tmp``."""
    final = Path(final)
    p = final.with_name(f"{final.name}.{tag}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    with _guard:
        _live_tmp[str(p.absolute())] = threading.get_ident()
    return p


def fresh_tmp(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """A new temporary name for ``final`` (:func:`tmp_path`) after removing the stale ones
    (:func:`remove_stale_tmp`)."""
    remove_stale_tmp(final, tag)
    return tmp_path(final, tag)


def is_tmp_name(name: str) -> bool:
    """Whether a file name is one of kcache's temporary names (never part of a cache)."""
    return name.endswith(TMP_SUFFIX) or name.endswith(".creating")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (in this PID namespace)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _live_here(p: Path) -> bool:
    """Whether ``p`` (a temporary named by this process) belongs to a thread of this process that is
    still alive and is not the caller (the caller is not using the temporary it is about to replace)."""
    with _guard:
        owner = _live_tmp.get(str(p.absolute()))
    if owner is None or owner == threading.get_ident():
        return False
    return any(t.ident == owner for t in threading.enumerate())


def remove_stale_tmp(final: str | os.PathLike, tag: str = "tmp") -> list[Path]:
    """Delete temporaries of ``final`` (from :func:`tmp_path`) left by processes that are gone.

    A temporary whose process is alive on this host is left alone (it is someone's work in progress);
    so is one of this process that another live thread of it named. The lock file a killed process
    left on a temporary (``<tmp>.lock``, e.g. a merge's finalize) goes with it.
    """
    final = Path(final)
    removed = []
    prefix = f"{final.name}.{tag}."
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        name = p.name
        if not name.startswith(prefix):
            continue
        if name.endswith(TMP_SUFFIX + LOCK_SUFFIX):
            pid = name[len(prefix):-len(TMP_SUFFIX + LOCK_SUFFIX)].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                with contextlib.suppress(OSError):
                    p.unlink()
                removed.append(p)
            continue
        if not name.endswith(TMP_SUFFIX):
            continue
        pid = name[len(prefix):-len(TMP_SUFFIX)].split("-")[0]
        if not pid.isdigit():
            continue
        if int(pid) == os.getpid() and _live_here(p):
            continue
        if int(pid) != os.getpid() and process_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    # Forget this process's temporaries of ``final`` that are gone (replaced or removed), unless a
    # live other thread named them (it may not have created its temporary yet).
    alive = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
    with _guard:
        for k in [k for k in _live_tmp if Path(k).parent == final.parent.absolute()
                  and Path(k).name.startswith(prefix)]:
            if _live_tmp[k] not in alive and not os.path.lexists(k):
                del _live_tmp[k]
    return removed
