"""Moved to :mod:`kcache.cli.train`; this old path still imports it, with a DeprecationWarning.

``register(app)`` adds ``finetune`` and ``edit`` to a typer app, from the command table in :mod:`kcache.cli`.
"""

from kcache._moved import forward

_new, __getattr__ = forward(__name__, "kcache.cli.train")

from kcache.cli._options import DEVICE_HELP as _DEVICE_HELP  # noqa: E402, F401 - old private name
from kcache.cli._options import MODEL_HELP as _MODEL_HELP  # noqa: E402, F401 - old private name


def register(app) -> None:
    from kcache.cli import COMMANDS, mount

    mount(app, COMMANDS, names=("finetune", "edit"))
