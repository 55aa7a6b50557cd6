"""Moved to :mod:`kcache.cli.errors`; this old path still imports it, with a DeprecationWarning."""

from kcache._moved import alias

alias(__name__, "kcache.cli.errors")
