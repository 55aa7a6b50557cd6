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
:func:`track` are closed; zarr's pool is shut down (queued tasks cancelled, never waited on without
a limit) and its loop stopped and joined, then reset, so anything that reads zarr later starts a
fresh loop. All of it shares one deadline, ``JOIN_SECONDS`` in total: a stuck reader or pool task
cannot hold the exit longer. While another non-daemon thread is still running (it may still read
through zarr), zarr is left alone.
"""

from __future__ import annotations

import atexit
import inspect
import sys
import threading
import time
import weakref

JOIN_SECONDS = 30.0  # everything together, at most (plus LOOP_STOP_SECONDS)
LOOP_STOP_SECONDS = 0.2

_tracked: weakref.WeakSet = weakref.WeakSet()
_installed = False


def track(obj) -> None:
    """Close ``obj`` before exit, if still alive. It has ``close()``, which must stop and join its
    thread; a ``close(timeout=...)`` is given what is left of the shared deadline."""
    _tracked.add(obj)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _close(obj, deadline: float) -> None:
    try:
        takes_timeout = "timeout" in inspect.signature(obj.close).parameters
    except (TypeError, ValueError):
        takes_timeout = False
    obj.close(timeout=_left(deadline)) if takes_timeout else obj.close()


def stop_background_threads(timeout: float = JOIN_SECONDS) -> None:
    """Close tracked objects and stop zarr's threads, all within ``timeout`` seconds in total."""
    deadline = time.monotonic() + timeout
    for obj in list(_tracked):
        try:
            _close(obj, deadline)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    _stop_zarr(deadline)


def _stop_zarr(deadline: float) -> None:
    zs = sys.modules.get("zarr.core.sync")
    if zs is None:
        return
    try:
        ex = getattr(zs, "_executor", None)
        pool = set(getattr(ex, "_threads", None) or ()) if ex is not None else set()
        me = threading.current_thread()
        if any(t is not me and t is not zs.iothread[0] and t not in pool and not t.daemon and t.is_alive()
               for t in threading.enumerate()):
            return  # another thread is still working (and may read through zarr): not ours to stop
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)  # a stuck task must not hold the exit forever
            for t in pool:
                t.join(_left(deadline))
            zs._executor = None
        loop, thread = zs.loop[0], zs.iothread[0]
        if loop is None or thread is None or thread is me:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(max(_left(deadline), LOOP_STOP_SECONDS))  # stopping a loop is quick: a short floor
        # Once asked to stop, the loop is never handed out again (zarr would wait on it forever):
        # forget it even if its thread is still finishing, so a later read starts a fresh one.
        zs.loop[0] = None
        zs.iothread[0] = None
        if not thread.is_alive():
            loop.close()
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
