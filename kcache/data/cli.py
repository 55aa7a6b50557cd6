"""Moved to :mod:`kcache.cli.data` (the ``kcache data`` commands); this old path still imports it, with a
DeprecationWarning. ``app`` is the ``kcache data`` group app built by the command table in :mod:`kcache.cli`.
"""

from kcache._moved import forward

_new, __getattr__ = forward(__name__, "kcache.cli.data")

from kcache.cli import data_app as app  # noqa: E402, F401
