"""Stop background threads before the interpreter exits.

Daemon threads still running native code when Python finalizes are what aborts a process at exit
with ``terminate called without an active exception`` (rc 134): the interpreter ends them with
``pthread_exit``, which cannot unwind through C++ frames. Two kinds exist in a kcache process:

- zarr's I/O event loop (thread ``zarr_io``) and its codec pool (``zarr_pool``), started by the
  first read of any cache (``Cache.open``). zarr's own atexit hook waits only 0.2 s for the loop
  thread; under load that is not enough and the thread is left running.
- kcache's own reader threads (``fit.BatchLoader``), which a training loop that stops early or
  raises may leave reading ahead.

:func:`install` (run on ``import kcache``) registers :func:`stop_background_threads` with
``threading._register_atexit``: it runs when the main thread is done, before every ``atexit``
hook (zarr's included) and before non-daemon threads are joined. Objects registered with
:func:`track` are closed; zarr's pool is shut down and its loop stopped and joined (up to
``JOIN_SECONDS``), then reset, so anything that reads zarr later starts a fresh loop.
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref

JOIN_SECONDS = 30.0

_tracked: "weakref.WeakSet" = weakref.WeakSet()
_installed = False


def track(obj) -> None:
    """Close ``obj`` (it has ``close()``, which must stop and join its thread) before exit, if still alive."""
    _tracked.add(obj)


def stop_background_threads(timeout: float = JOIN_SECONDS) -> None:
    for obj in list(_tracked):
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    _stop_zarr(timeout)


def _stop_zarr(timeout: float) -> None:
    zs = sys.modules.get("zarr.core.sync")
    if zs is None:
        return
    try:
        ex = getattr(zs, "_executor", None)
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
            zs._executor = None
        loop, thread = zs.loop[0], zs.iothread[0]
        if loop is None or thread is None or thread is threading.current_thread():
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        if not thread.is_alive():
            loop.close()
            zs.loop[0] = None
            zs.iothread[0] = None
    except Exception:  # noqa: BLE001 - never turn a clean exit into a failing one
        pass


def install() -> None:
    """Register :func:`stop_background_threads` to run at interpreter exit (idempotent)."""
    global _installed
    if _installed:
        return
    register = getattr(threading, "_register_atexit", None)  # runs before atexit hooks and thread joins
    try:
        (register or atexit.register)(stop_background_threads)
    except RuntimeError:  # already shutting down
        return
    _installed = True
