"""Moved to :mod:`kcache.cache.lossy`; this old path still imports it, with a DeprecationWarning."""

from kcache._moved import alias

alias(__name__, "kcache.cache.lossy")
