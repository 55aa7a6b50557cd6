"""Moved to :mod:`kcache.cache.merge`; this old path still imports it, with a DeprecationWarning."""

from kcache._moved import alias

alias(__name__, "kcache.cache.merge")
