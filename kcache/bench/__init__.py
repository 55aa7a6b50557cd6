"""Benchmarks: time, memory and size of the stages, measured side by side in one run.

* :mod:`kcache.bench.inject` - ``kcache bench inject``: ``D(E(K,x)+x)`` vs ``D(K,x)`` as ``|K|`` grows.
* :mod:`kcache.bench.stages` - ``kcache bench extract`` / ``bench fit``: stage one and stage two.
* :mod:`kcache.bench.storage` - ``kcache bench store``: lossless vs lossy storage of a cache.

Library code only: the ``kcache bench`` commands are in ``kcache/cli/bench.py``. Results are JSON
with a PNG beside it (docs/bench/).
"""

from __future__ import annotations

# Names of the former module kcache/bench.py (now kcache.bench.inject), and its sub-app (now
# built by the command table in kcache.cli): still importable from here, with a DeprecationWarning.
_MOVED = {
    **{n: "kcache.bench.inject" for n in ("bench_inject", "format_row", "format_verdict", "plot_bench", "TIME_TARGET",
                                          "MEMORY_TARGET", "_bench_tokens", "_param_bytes", "_bench_inject")},
    "bench_app": "kcache.cli",
    "inject_cmd": "kcache.cli.bench",
}


def __getattr__(name: str):
    new = _MOVED.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"kcache.bench.{name} is deprecated and will be removed: use {new}.{name}", DeprecationWarning,
                  stacklevel=2)
    value = globals()[name] = getattr(importlib.import_module(new), name)  # warn once
    return value
