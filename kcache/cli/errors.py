"""The one place where the command line turns exceptions into ``error: …`` lines and exit codes.

Every ``kcache`` command runs inside :func:`errors` (the root typer group wraps each invocation,
see ``KCacheGroup``; the sub-apps' commands also enter it themselves, for when their app is
invoked on its own), so the same error gives the same line and exit code in every command. Which
exception gets which code is decided in one table, :data:`EXIT_CODES`:

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success
1     the command ran and found the thing it checks invalid (``kcache validate``: ``invalid: …``)
2     bad input or usage: a kcache error (``KCacheError``: cache, bundle, model, schema, samples,
      KG, injection), ``ValueError``, a missing file (``FileNotFoundError``) or a wrong kind of
      path; also click's own usage errors (unknown option, missing argument)
3     the environment stopped the work: permissions (``PermissionError``, a read-only output
      directory), a full disk or another ``OSError``, a dropped network connection, another
      kcache process writing the same output (``kcache.lock.OutputLocked``). Fix the cause and
      rerun; interrupted extractions, fits and pulls resume.
====  ==========================================================================================

``KCACHE_TRACEBACK=1`` re-raises instead (full traceback, for bug reports).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import typer
from typer.core import TyperGroup

from kcache.errors import KCacheError

EXIT_INVALID = 1
EXIT_INPUT = 2
EXIT_ENVIRONMENT = 3

# OSErrors that say "this input path is wrong", not "the machine said no".
_INPUT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)


def _output_locked(e: BaseException) -> bool:
    """A :class:`kcache.lock.OutputLocked` (looked up lazily: such an exception can only exist once
    its module has been imported, and this module imports no more than it needs)."""
    lock = sys.modules.get("kcache.lock")
    return lock is not None and isinstance(e, lock.OutputLocked)


def _aiohttp(e: BaseException) -> bool:
    """Remote reads: aiohttp's ServerDisconnectedError etc. are not OSErrors."""
    return type(e).__module__.split(".")[0] == "aiohttp"


# The one table: exception kind -> exit code; the first row that matches wins (so more specific
# kinds come first). A row matches an exception type (or tuple of types) by isinstance, or is a
# predicate. An exception no row matches is a bug: re-raised with its traceback.
EXIT_CODES = (
    (_output_locked, EXIT_ENVIRONMENT),  # another kcache process writes the same output (a CacheError)
    (KCacheError, EXIT_INPUT),  # cache, bundle, model, schema, samples, KG, injection
    (_INPUT_OS_ERRORS, EXIT_INPUT),  # a missing file, a wrong kind of path
    (OSError, EXIT_ENVIRONMENT),  # PermissionError, disk full, ConnectionError, TimeoutError, ...
    (_aiohttp, EXIT_ENVIRONMENT),  # a dropped connection during a remote read
    (ValueError, EXIT_INPUT),  # a bad value that no domain check named
)


def exit_code(e: BaseException) -> int | None:
    """The exit code for ``e`` (:data:`EXIT_CODES`), or None when ``e`` is not an error a user can act on (a bug)."""
    for kind, code in EXIT_CODES:
        if isinstance(e, kind) if isinstance(kind, (type, tuple)) else kind(e):
            return code
    return None


def message(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror:  # "[Errno 13] Permission denied: '/x'" -> "/x: Permission denied"
        text = e.strerror if e.filename is None or str(e.filename) in e.strerror else f"{e.filename}: {e.strerror}"
    if not text:
        text = type(e).__name__
    if isinstance(e, (ConnectionError, TimeoutError)) or _aiohttp(e):
        text = f"connection failed ({type(e).__name__}: {text}); rerun the command"
    return text


def fail(msg: str, code: int = EXIT_INPUT):
    """Print ``error: msg`` on stderr and exit with ``code`` (for checks made in the CLI itself)."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def errors():
    """Known error types become one ``error: …`` line on stderr and the exit code of their kind."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - anything else is re-raised untouched
        code = exit_code(e)
        if code is None or os.environ.get("KCACHE_TRACEBACK"):
            raise
        typer.echo(f"error: {message(e)}", err=True)
        raise typer.Exit(code) from None


class KCacheGroup(TyperGroup):
    """The root command group: every command and sub-command runs inside :func:`errors`."""

    def invoke(self, ctx):
        with errors():
            return super().invoke(ctx)


def ensure_writable_dir(path: str | Path, what: str = "output directory") -> None:
    """Refuse, before any work, an output directory that cannot be created or written.

    Checks the directory if it exists, else the nearest existing ancestor (which must be a
    directory), with ``os.access`` and then a probe file (``os.access`` says yes to root, and
    only a real write sees a read-only mount). Raises ``PermissionError`` / ``NotADirectoryError``
    naming the path.
    """
    p = Path(path).expanduser().absolute()
    probe_dir = p
    while not probe_dir.exists():
        if probe_dir.is_symlink():  # dangling link: let the writer report it
            return
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise NotADirectoryError(20, f"cannot create the {what} {p}: {probe_dir} is not a directory", str(p))
    where = "" if probe_dir == p else f" (its parent {probe_dir} is not writable)"
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise PermissionError(13, f"the {what} {p} is not writable{where}; choose another --out or fix its permissions",
                              str(p))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kcache-write-check-", dir=probe_dir)
    except OSError as e:
        raise PermissionError(e.errno or 13, f"the {what} {p} is not writable{where} ({e.strerror}); "
                                             "choose another --out or fix its permissions", str(p)) from None
    os.close(fd)
    os.unlink(tmp)
