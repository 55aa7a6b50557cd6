"""Old import paths of modules that moved (issue 14: kcache/ regrouped into packages).

Each old module (``kcache/baselines.py``, ``kcache/cli_stage3.py``, ``kcache/store.py``, ...) is a
few lines that call one of these and emit a ``DeprecationWarning`` naming the new path:

* :func:`alias` - the old name *is* the new module (``sys.modules`` entry replaced): every name,
  private ones included, and monkeypatching through either path, behave as before. Used for
  library modules.
* :func:`forward` - the old module stays a module of its own and looks up every name it does
  not define in the new module. Used where the old module also offered something the new one
  does not (a command module's ``register(app)``, now served by the command table in
  :mod:`kcache.cli`), or whose contents now live in more than one module (``kcache.store``).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed: import {new} instead", DeprecationWarning, stacklevel=4)


def alias(old: str, new: str) -> ModuleType:
    """Make ``import old`` give the module ``new``; call from the old module's body."""
    warn(old, new)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module


def forward(old: str, new: str, *more: str):
    """``(module, __getattr__)`` for the old module: ``__getattr__ = forward(__name__, "kcache.x")[1]``.

    With ``more`` modules, a name is looked up in ``new`` first, then in each of them in turn (an old
    module whose contents were split, e.g. ``kcache.store`` into ``kcache.cache.writer`` and
    ``kcache.cache.format``).
    """
    warn(old, " or ".join((new, *more)))
    modules = [importlib.import_module(m) for m in (new, *more)]

    def __getattr__(name: str):
        for module in modules[:-1]:
            if hasattr(module, name):
                return getattr(module, name)
        return getattr(modules[-1], name)

    return modules[0], __getattr__
