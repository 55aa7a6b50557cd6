"""How many CPU threads torch uses here: the free cores, measured when the command starts.

On a shared machine torch's default (one thread per physical core) loses badly to fewer threads
when other work is running: one evaluation on a 2-core machine took 255 s with 2 threads and
44 s with 1 while another job ran. So the CLI picks ``min(torch's default, free cores)``:

* ``available_cores``: this process's CPUs (its affinity), bounded by a cgroup v2 CPU quota.
* ``busy_cores``: how many of the affinity's CPUs other work keeps busy *now*, from two readings
  of ``/proc/stat`` 50 ms apart (the 1-minute load average lags by minutes: it still counts a job
  that has just ended and misses one that has just started).
* ``free_cores = min(quota, affinity - busy)`` (at least 1).

``--threads N`` (or ``KCACHE_THREADS``) is used as given, with a warning when N is more than the
free cores; ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the environment also leave torch's choice
alone (the user has decided).

The CLI also keeps memory that torch frees inside the process (``keep_freed_memory``): glibc
hands large freed blocks back to the kernel (above its mmap threshold, or at the heap's top above
its trim threshold), so the next batch's tensors fault in and zero fresh pages. On this project's
2-core VM that was ~790,000 page faults per extraction of 300 samples; its bf16 passes went from
9.1-9.4 s to 7.7 s without them (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import os
import time
import warnings

_USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_default_threads: int | None = None  # torch's own choice, before kcache changed it


def affinity_cores() -> int:
    """CPUs this process may be scheduled on (its affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def quota_cores() -> int | None:
    """The cgroup v2 CPU quota in whole cores (None: no quota)."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            return max(1, math.floor(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return None


def available_cores() -> int:
    """CPUs this process may run on: its affinity, bounded by a cgroup v2 CPU quota if any."""
    quota = quota_cores()
    return affinity_cores() if quota is None else min(affinity_cores(), quota)


def cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """``/proc/stat`` text -> {cpu: (busy jiffies, total jiffies)} for each ``cpuN`` line.

    Busy is user + nice + system + irq + softirq; total adds idle, iowait and steal (time the
    hypervisor gave to another guest is not this machine's work)."""
    out = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        v = [int(f) for f in fields[:8]] + [0] * max(0, 8 - len(fields))
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        busy = user + nice + system + irq + softirq
        out[int(name[3:])] = (busy, busy + idle + iowait + steal)
    return out


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus) -> float:
    """CPUs' worth of busy time among ``cpus`` between two ``cpu_times`` readings (0 .. len(cpus))."""
    busy = 0.0
    for c in cpus:
        if c in before and c in after:
            db, dt = after[c][0] - before[c][0], after[c][1] - before[c][1]
            busy += db / dt if dt > 0 else 0.0
    return busy


def busy_cores(window: float = 0.05) -> float | None:
    """How many of this process's CPUs are busy over the next ``window`` seconds (None where
    ``/proc/stat`` cannot be read: not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        with open("/proc/stat") as f:
            before = cpu_times(f.read())
        time.sleep(window)
        with open("/proc/stat") as f:
            after = cpu_times(f.read())
    except (AttributeError, OSError, ValueError):
        return None
    return busy_between(before, after, cpus)


def free_cores() -> int:
    """The CPUs of this process's affinity that nothing else keeps busy, bounded by its cgroup
    quota (at least 1). ``/proc/stat`` counts the whole host, so the busy CPUs are taken from the
    affinity set and the quota applies after: a container with a 8-core quota on a busy 64-core
    host still gets 8 when 40 host cores are busy. Falls back to the 1-minute load average where
    ``/proc/stat`` is not there."""
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover
            busy = 0.0
    free = affinity_cores() - int(round(busy))
    quota = quota_cores()
    return max(1, free if quota is None else min(quota, free))


def default_threads() -> int:
    """torch's own thread count (one per physical core), as it was before kcache set any."""
    global _default_threads
    if _default_threads is None:
        import torch

        _default_threads = torch.get_num_threads()
    return _default_threads


def choose_threads() -> int:
    """The CLI's default: ``min(torch's default, free cores)`` (no measurement when that is 1)."""
    d = default_threads()
    return 1 if d <= 1 else max(1, min(d, free_cores()))


def set_threads(threads: int | None, warn=None) -> int:
    """Use ``threads`` torch threads; ``None`` picks :func:`choose_threads` (or keeps torch's choice
    when ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is set). An explicit count above the free cores
    passes a warning to ``warn`` (default: ``warnings.warn``). Returns the number in use."""
    import torch

    default_threads()  # remember torch's choice before changing it
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, not {threads}")
        torch.set_num_threads(threads)
        free = free_cores() if threads > 1 else 1
        if threads > free:
            msg = (f"torch uses {threads} threads but only {free} of {available_cores()} cores are free now; "
                   f"oversubscribed threads can be several times slower: pass --threads {free}")
            (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(msg)
    elif not any(os.environ.get(v) for v in _USER_THREAD_VARS):
        torch.set_num_threads(choose_threads())
    return torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation rather than return it to the
    kernel: no ``mmap`` per large block (``M_MMAP_MAX`` 0) and no trimming of the heap's top below
    2 GiB (``M_TRIM_THRESHOLD``). Same results, same peak memory for a loop of similar batches,
    none of the page faults and zeroing (module docstring). ``malloc_trim`` still returns it
    (``evaluate.PeakMemory`` does so before each measurement).

    Process-wide, so the CLI calls it, not the library. Does nothing (returns False) off glibc, or
    when the environment already tunes malloc (any ``MALLOC_*`` variable, ``glibc.malloc.`` in
    ``GLIBC_TUNABLES``, or another allocator preloaded). Returns whether it was applied.

    Costs: heaps of other threads (64 MiB each) keep what they freed too; a large ``calloc`` is
    zeroed by hand where fresh pages came zeroed.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc" or any(v.startswith("MALLOC_") for v in os.environ):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
        return False
