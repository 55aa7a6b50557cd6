"""The tests' loopback HTTP file server: kcache.bench.loopback (`kcache bench fit` serves caches with it too)."""

from kcache.bench.loopback import FileServer, parse_range, serve

__all__ = ["FileServer", "parse_range", "serve"]
