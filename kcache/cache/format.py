"""The stage-one cache format (v1, ``schemas/cache-v1.json``): names, versions, dtypes, and ``CacheError``.

A cache is a zarr v3 group (docs/cache-format.md)::

    cache.zarr/
      zarr.json               group attributes under key "kcache" (settings, counts, stats)
      index.parquet           one row per sample, in layout order (schemas/cache-index-v1.json)
      skipped.parquet         samples left out, with the reason
      commits.jsonl           append-only commit log written during extraction
      README.md               the cache card
      deltas/layer_LL         (total_input_tokens, hidden), storage dtype, sharded
      tokens/ids, tokens/offsets   encoder tokens k_ids + x_ids, flat int32 + int64 offsets
      masks/loss, masks/target     per input position, bool
      embeddings              the decoder's input embedding matrix (vocab, hidden)

or a root holding ``manifest.json`` (schemas/cache-manifest-v1.json) that lists parts, each such
a group. Writing is :mod:`kcache.cache.writer`, reading :mod:`kcache.cache.reader`.

This module imports nothing else of kcache but :mod:`kcache.errors`, so every module of the
package (and :mod:`kcache.lock`, :mod:`kcache.paths` below it) can use it.
"""

from __future__ import annotations

import numpy as np
import torch

# CacheError is defined beside KCacheError (kcache.errors) so that kcache.paths and kcache.lock,
# which the cache package imports, can raise it without importing this package; this module and
# kcache.cache are where it is imported from.
from kcache.errors import CacheError

__all__ = [
    "ATTRS_KEY",
    "COMMIT_LOG",
    "DTYPES",
    "FLOAT16_MAX",
    "FORMAT",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MANIFEST_VERSIONS",
    "POSITION_STATS",
    "SCHEMA_VERSION",
    "CacheError",
    "decode_rows",
    "encode_rows",
    "manifest_schema",
]

FORMAT = "kcache-cache"
SCHEMA_VERSION = 1
ATTRS_KEY = "kcache"
COMMIT_LOG = "commits.jsonl"
POSITION_STATS = 16  # mean delta norm is reported for input positions 0..15

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kcache-manifest"
MANIFEST_VERSION = 1
# Version 2 only makes "created" optional: elastic extractions leave it out, so their manifest bytes
# do not depend on when or by how many workers the cache was made (kcache.elastic).
MANIFEST_VERSIONS = (1, 2)

# storage dtype -> (numpy dtype on disk, torch dtype it holds). bfloat16 is stored as its raw 16 bits.
DTYPES = {
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
    "float32": (np.float32, torch.float32),
}
FLOAT16_MAX = 65504.0


def manifest_schema(doc) -> str:
    """The schema a manifest document claims (``cache-manifest-v1`` or ``-v2``, by its ``schema_version``).

    An unknown or missing version is checked against v1, whose ``schema_version`` constant then
    names the problem."""
    v = doc.get("schema_version") if isinstance(doc, dict) else None
    return f"cache-manifest-v{v}" if v in MANIFEST_VERSIONS and not isinstance(v, bool) else "cache-manifest-v1"


# ---------------------------------------------------------------------------------------------
# dtype conversion (pure)


def encode_rows(t: torch.Tensor, dtype: str, what: str = "deltas") -> np.ndarray:
    """Float tensor (any float dtype; the values are what matters) -> numpy array in storage dtype.
    float16 overflow is an error, never inf."""
    if dtype not in DTYPES:
        raise CacheError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    t = t.detach()
    # float16: one pass (|t|'s max is NaN or inf when any value is) finds both problems
    peak = float(t.abs().max()) if dtype == "float16" and t.numel() else 0.0
    if (dtype != "float16" or not peak <= FLOAT16_MAX) and not torch.isfinite(t).all():
        raise CacheError(f"{what}: non-finite values (NaN/inf) computed; the decoder itself produced them")
    if dtype == "float16":
        if peak > FLOAT16_MAX:
            raise CacheError(
                f"{what}: value {peak:.4g} is outside the float16 range (±65504); "
                "rerun with --dtype bfloat16 or --dtype float32"
            )
        return t.to(torch.float16).cpu().numpy()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return t.to(torch.float32).cpu().numpy()


def decode_rows(a: np.ndarray, dtype: str) -> np.ndarray:
    """Storage-dtype array -> float32 numpy array (lossless widening)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)
