"""How many CPU threads torch may use here, and a warning when it would oversubscribe.

On a shared machine torch's default (one thread per visible core) loses badly to fewer threads
when other work is running: one evaluation on a 2-core machine took 255 s with 2 threads and
44 s with 1 while another job ran. ``free_cores`` is what is left of this process's CPUs (affinity
and cgroup quota) after the load average; ``set_threads`` applies a choice and warns when torch
would use more threads than that.
"""

from __future__ import annotations

import math
import os
import warnings


def available_cores() -> int:
    """CPUs this process may run on: its affinity, bounded by a cgroup v2 CPU quota if any."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def free_cores() -> int:
    """Available cores minus the 1-minute load average (at least 1)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        load = 0.0
    return max(1, available_cores() - int(round(load)))


def set_threads(threads: int | None, warn=None) -> int:
    """Use ``threads`` torch threads (``None``: keep torch's choice) and, when that exceeds the free
    cores, pass a warning to ``warn`` (default: ``warnings.warn``). Returns the number in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, not {threads}")
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    free = free_cores()
    if n > free:
        msg = (f"torch uses {n} threads but only {free} of {available_cores()} cores are free (load average); "
               f"oversubscribed threads can be several times slower: pass --threads {free}")
        (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(msg)
    return n
