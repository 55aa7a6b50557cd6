"""Moved to :mod:`kcache.bench.stages`; this old path still imports it, with a DeprecationWarning.

``register(app)`` adds ``bench extract`` and ``bench fit`` (give it the ``bench`` group app) to a typer app, from the
command table in :mod:`kcache.cli`.
"""

from kcache._moved import forward

_new, __getattr__ = forward(__name__, "kcache.bench.stages")


def register(app) -> None:
    from kcache.cli import COMMANDS, mount

    mount(app, COMMANDS["bench"].commands, names=("extract", "fit"))
