"""Moved to :mod:`kcache.cli.kg` (the ``kcache kg`` commands); this old path still imports it, with a
DeprecationWarning. ``app`` is the ``kcache kg`` group app built by the command table in :mod:`kcache.cli`.
"""

from kcache._moved import forward

_new, __getattr__ = forward(__name__, "kcache.cli.kg")

from kcache.cli import kg_app as app  # noqa: E402, F401
