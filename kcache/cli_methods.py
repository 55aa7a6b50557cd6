"""Moved to :mod:`kcache.cli.methods`; this old path still imports it, with a DeprecationWarning.

``register(app)`` adds ``train-baseline``, ``eval-choice`` and the ``knowla`` group to a typer app, from the command
table in :mod:`kcache.cli`.
"""

from kcache._moved import forward

_new, __getattr__ = forward(__name__, "kcache.cli.methods")

from kcache.cli import knowla_app  # noqa: E402, F401
from kcache.cli._options import DeviceOpt as _DEVICE  # noqa: E402, F401 - old private name
from kcache.cli._options import DtypeOpt as _DTYPE  # noqa: E402, F401 - old private name
from kcache.cli._options import ModelOpt as _MODEL  # noqa: E402, F401 - old private name


def register(app) -> None:
    from kcache.cli import COMMANDS, mount

    mount(app, COMMANDS, names=("train-baseline", "eval-choice", "knowla"))
