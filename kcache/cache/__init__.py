"""The stage-one cache: its format, reading and writing it, lossy storage, integrity and sharing.

==============  ===================================================================================
module          job
==============  ===================================================================================
``format``      the format's names and versions, storage dtypes and their conversion, ``CacheError``
``lossy``       optional lossy storage of delta rows: bit rounding, int8 per row, error accounting
``location``    where a cache lives: a local directory or an fsspec URL, read-only, never lists
``reader``      ``Cache``: one or many parts, local or remote, untrusted-input checks before zarr
``writer``      writing one store: creation, the whole-shard delta writer and its commit log, layout figures
``card``        the store card and the dataset card (pure: documents in, Markdown out)
``integrity``   ``finalize`` (manifest, digests, read-only) and ``validate_cache``
``merge``       ``merge``: same-settings caches into one
``subset``      partial pulls: chosen layers and samples of a cache as a new finalized cache
``remote``      ``pull``: resumable, verified download of a finalized cache (or a partial pull)
``publish``     ``push``: resumable, verified upload of a finalized cache, manifest last, with a dataset card
==============  ===================================================================================

Module-level imports only go down that list (``format`` imports nothing of kcache but
:mod:`kcache.errors`), so the package has no import cycle; :mod:`kcache.paths` and
:mod:`kcache.lock` sit below it. The names below are the package's public surface; everything
else is imported from its module.

``kcache.cache`` was a module (today's ``reader``) before it was this package: its other names
(``Part``, ``settings_differences``, ``MANIFEST``, ...) still resolve here, with a
``DeprecationWarning`` naming the module to import them from.

``kcache.cache.merge`` is the function (the public surface wins over the submodule of the same
name): reach the module with ``from kcache.cache.merge import …`` or ``importlib.import_module``.
"""

from __future__ import annotations

from kcache.cache.format import CacheError
from kcache.cache.integrity import finalize, validate_cache
from kcache.cache.location import Location
from kcache.cache.lossy import parse_storage
from kcache.cache.merge import merge
from kcache.cache.publish import push
from kcache.cache.reader import Cache, open_cache
from kcache.cache.remote import pull
from kcache.cache.writer import DeltaWriter, create_cache

validate = validate_cache  # the name of the command (`kcache validate`)

__all__ = [
    "Cache",
    "CacheError",
    "DeltaWriter",
    "Location",
    "create_cache",
    "finalize",
    "merge",
    "open_cache",
    "parse_storage",
    "pull",
    "push",
    "validate",
    "validate_cache",
]


# The old module kcache.cache's other names -> the module that has them now.
_OLD_NAMES = {
    **dict.fromkeys(("MANIFEST", "MANIFEST_FORMAT", "MANIFEST_VERSION", "ATTRS_KEY", "DTYPES", "FORMAT",
                     "SCHEMA_VERSION", "decode_rows"), "kcache.cache.format"),
    **dict.fromkeys(("SAFE_CODECS", "MAX_COMPRESSION", "CAPACITY_SLACK", "BOUNDED_ARRAYS", "FLAT_ARRAYS", "storage_of",
                     "delta_dtype", "expected_arrays", "codec_problems", "array_meta_problems", "capacity_problems",
                     "index_problems", "read_json", "read_group_attrs", "read_index", "read_manifest",
                     "local_part_sizes", "Part", "combine_stats", "combine_errors", "settings_differences"),
                    "kcache.cache.reader"),
}


def __getattr__(name: str):
    """An old name of the module ``kcache.cache``, from the module that has it now, with a DeprecationWarning."""
    if name not in _OLD_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    where = _OLD_NAMES[name]
    warnings.warn(f"kcache.cache.{name} is deprecated and will be removed: import it from {where} instead",
                  DeprecationWarning, stacklevel=2)
    value = globals()[name] = getattr(importlib.import_module(where), name)  # kept: one warning per name
    return value
