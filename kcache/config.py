"""One way to build a settings dataclass from a TOML table (``kcache run``) or a dict of options.

``config_from(ExtractConfig, cfg["extract"], "extract", file=path)`` checks the table against the
dataclass's fields and returns the instance:

* aliases: ``lr`` is accepted for ``lr_max`` (``ALIASES``; the command line spells it ``--lr``);
  giving both is refused;
* unknown keys are refused with a :class:`ConfigError` naming the file (when known), the section
  and the key, a close match when there is one, and the known keys;
* a key without a default in the dataclass is required;
* values are checked against the field's annotation and converted where TOML has no such type:
  ``int`` (not ``bool``), ``float`` (an integer is accepted), ``str``, ``bool``, ``list[...]`` and
  ``tuple[...]`` (TOML arrays; a fixed-length tuple checks its length), ``dict`` (a TOML table),
  unions (``str | list[int]``, ``int | None``: the first member that fits). A mismatch names
  ``section.key``, what was expected and what was given.

``configs_from((FinetuneConfig, StageIO), table, "finetune")`` splits one table over several
dataclasses (each key goes to the first class that has it) and returns one instance per class.
Tables that are not settings of a library function (``[run]``, ``[data]``, ``[evaluate]``) are
small dataclasses too (``kcache.pipeline``, ``kcache.stages``), so every section is checked the
same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from kcache.errors import KCacheError

# alias -> field; applied only where the dataclass has the field.
ALIASES = {"lr": "lr_max"}


class ConfigError(KCacheError, ValueError):
    """A pipeline config or options table that does not fit the settings it is built into."""


class _Mismatch(Exception):
    pass


def _prefix(file: str | Path | None) -> str:
    return f"{file}: " if file is not None else ""


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is dict or origin is dict:
        return "a table"
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if args and len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {len(args)} values"
    return getattr(tp, "__name__", str(tp))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, "values")


# scalar annotation -> (TOML types accepted, conversion)
_SCALARS = {bool: (bool, bool), int: (int, int), float: ((int, float), float), str: (str, str),
            Path: ((str, Path), Path)}


def _convert(value, tp):
    """``value`` checked against annotation ``tp`` (converted where needed), or ``_Mismatch``."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp in _SCALARS:
        accepted, make = _SCALARS[tp]
        # bool is an int subclass, but `epochs = true` is a typo, not 1
        if isinstance(value, accepted) and (tp is bool or not isinstance(value, bool)):
            return make(value)
        raise _Mismatch
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(v, args[0]) for v in value] if args else list(value)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a) for v, a in zip(value, args))
    return value  # an annotation this module does not know: passed through unchecked


def _shown(value) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (list, tuple, dict)) else f"{value!r}"


def _hints(cls) -> dict:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config_from needs a dataclass, not {cls!r}")
    return typing.get_type_hints(cls)


def known_keys(*classes) -> list[str]:
    """The keys a table built into ``classes`` may hold (fields; aliases not included)."""
    return sorted({f.name for cls in classes for f in dataclasses.fields(cls) if f.init})


def check_keys(table: dict, known, where: str, file: str | Path | None = None, aliases: dict | None = None) -> None:
    """Refuse keys of ``table`` not in ``known``, naming file, section and key."""
    if not isinstance(table, dict):
        raise ConfigError(f"{_prefix(file)}[{where}] must be a table, got {_shown(table)}")
    known = set(known)
    aliases = {a: f for a, f in (aliases or {}).items() if f in known}
    unknown = [k for k in table if k not in known and k not in aliases]
    if not unknown:
        return
    names = ", ".join(repr(k) for k in unknown)
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, sorted(known | set(aliases)), n=1)
        if close:
            hints.append(f"did you mean {close[0]!r}?" if len(unknown) == 1 else f"{k!r}: did you mean {close[0]!r}?")
    listing = ", ".join(sorted(known))
    if aliases:
        listing += "; aliases: " + ", ".join(f"{a} = {f}" for a, f in sorted(aliases.items()))
    raise ConfigError(f"{_prefix(file)}[{where}] unknown key{'s' if len(unknown) > 1 else ''} {names} "
                      f"({' '.join(hints) + ' ' if hints else ''}known: {listing})")


def configs_from(classes, table: dict | None, where: str, file: str | Path | None = None) -> tuple:
    """One instance per dataclass in ``classes`` from one table (see the module docstring)."""
    classes = tuple(classes)
    table = {} if table is None else table
    fields = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.init:
                fields.setdefault(f.name, cls)
    aliases = {a: f for a, f in ALIASES.items() if f in fields}
    check_keys(table, fields, where, file, aliases)
    opts = dict(table)
    for alias, name in aliases.items():
        if alias in opts:
            if name in opts:
                raise ConfigError(f"{_prefix(file)}[{where}] both {alias!r} and {name!r} given ({alias!r} is another "
                                  f"name for {name!r}): keep one")
            opts[name] = opts.pop(alias)
    hints = {cls: _hints(cls) for cls in classes}
    per_class: dict = {cls: {} for cls in classes}
    for key, value in opts.items():
        cls = fields[key]
        try:
            per_class[cls][key] = _convert(value, hints[cls][key])
        except _Mismatch:
            raise ConfigError(f"{_prefix(file)}{where}.{key}: "
                              f"expected {_describe(hints[cls][key])}, got {_shown(value)}") from None
    out = []
    for cls in classes:
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in per_class[cls]
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{_prefix(file)}[{where}] missing key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(k) for k in missing)} "
                              f"({', '.join(f'{k} = {_describe(hints[cls][k])}' for k in missing)})")
        try:
            out.append(cls(**per_class[cls]))
        except ValueError as e:  # a check of the settings' own (__post_init__): name the file and section
            raise ConfigError(f"{_prefix(file)}[{where}] {e}") from None
    return tuple(out)


def config_from(cls, table: dict | None, where: str, file: str | Path | None = None):
    """``cls`` (a dataclass) built from ``table`` (a TOML section or an options dict); ``where`` is
    the section's name (``"fit"``, ``"evaluate.edit"``) and ``file`` the config file, for the
    messages. Raises :class:`ConfigError`."""
    return configs_from((cls,), table, where, file)[0]
