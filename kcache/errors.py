"""The root of kcache's error types.

Every domain has one error type, and all of them derive from :class:`KCacheError` (as well as
from the builtin they always derived from, so ``except ValueError`` keeps working):

=====================  ===========================  =====================================
type                   module                       builtin base
=====================  ===========================  =====================================
``CacheError``         ``kcache.store``             ``ValueError``
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
"""

from __future__ import annotations


class KCacheError(Exception):
    """An error the user can act on: the message says what is wrong and, where possible, what to do."""
