"""The root of kcache's error types.

Every domain has one error type, and all of them derive from :class:`KCacheError` (as well as
from the builtin they always derived from, so ``except ValueError`` keeps working):

=====================  ===========================  =====================================
type                   module                       builtin base
=====================  ===========================  =====================================
``CacheError``         ``kcache.cache``             ``ValueError`` (defined here)
``BundleError``        ``kcache.encoders``          ``ValueError``
``ModelError``         ``kcache.models``            ``RuntimeError``
``SchemaError``        ``kcache.schemas``           ``ValueError``
``SampleError``        ``kcache.data.samples``      ``ValueError`` (``ConvertError`` below it)
``KGError``            ``kcache.kg.tables``         ``ValueError``
``InjectError``        ``kcache.inject``            ``ValueError``
``ConfigError``        ``kcache.config``            ``ValueError``
``OutputLocked``       ``kcache.lock``              ``ValueError`` (a ``CacheError``)
=====================  ===========================  =====================================

The command line turns them into one ``error: …`` line and an exit code in one place,
``kcache.cli.errors`` (its ``EXIT_CODES`` table: 2 bad input for all of these, except
``OutputLocked``, 3: another process, not the input, stopped the work).

``CacheError`` is defined in this module, beside its root, and imported from
:mod:`kcache.cache` (or :mod:`kcache.cache.format`): :mod:`kcache.paths` and :mod:`kcache.lock`,
which the cache package itself imports, raise it too, and importing it from here keeps them
below the package (no import cycle).
"""

from __future__ import annotations


class KCacheError(Exception):
    """An error the user can act on: the message says what is wrong and, where possible, what to do."""


class CacheError(KCacheError, ValueError):
    """A cache is missing, malformed, incomplete or does not match what was asked for."""
