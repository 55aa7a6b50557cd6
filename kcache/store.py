"""Moved to :mod:`kcache.cache.writer` (writing a store) and :mod:`kcache.cache.format` (names,
versions, dtypes and their conversion, ``CacheError``); this old path still imports both, with a
DeprecationWarning."""

from kcache._moved import forward

_new, __getattr__ = forward(__name__, "kcache.cache.writer", "kcache.cache.format")

from kcache._io import now  # noqa: E402, F401 - kcache.store.now was the timestamp of every record
