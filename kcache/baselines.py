"""Moved to :mod:`kcache.methods.baselines`; this old path still imports it, with a DeprecationWarning."""

from kcache._moved import alias

alias(__name__, "kcache.methods.baselines")
