"""Held-out splits that keep related samples together (e.g. every question of one DREAM dialogue).

``split_by_group(table, sizes, key, seed)`` shuffles the groups (samples sharing ``meta[key]``,
or their own id when the key is absent) with ``seed`` and fills ``train``, ``validation`` and
``test`` in that order with whole groups until each holds at least its size; groups left over
are dropped. No group is ever in two splits, so a test question never shares its knowledge
with a training one.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from kcache.data.samples import SampleError

SPLITS = ("train", "validation", "test")


def group_keys(table: pa.Table, key: str) -> list[str]:
    """Per row: ``meta[key]`` (``meta`` is the samples' JSON metadata column), else the row's id."""
    ids = table["id"].to_pylist()
    metas = table["meta"].to_pylist() if "meta" in table.column_names else [None] * table.num_rows
    out = []
    for i, (sid, m) in enumerate(zip(ids, metas)):
        try:
            v = json.loads(m).get(key) if m else None
        except (ValueError, AttributeError):
            raise SampleError(f"row {i} (id {sid!r}): meta is not a JSON object") from None
        out.append(str(v) if v is not None else sid)
    return out


def split_by_group(table: pa.Table, sizes: dict[str, int], key: str, seed: int = 0) -> pa.Table:
    """Rows re-labelled ``train`` / ``validation`` / ``test`` by whole groups; ``sizes`` are the
    minimum sample counts per split (a split of size 0 gets nothing). Rows of groups not needed
    are dropped. Raises ``SampleError`` when there are not enough samples."""
    need = sum(sizes.get(s, 0) for s in SPLITS)
    if table.num_rows < need:
        raise SampleError(f"{table.num_rows} samples, but the splits ask for {need}")
    keys = group_keys(table, key)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    labels: dict[int, str] = {}
    it = iter(order)
    for split in SPLITS:
        got = 0
        while got < sizes.get(split, 0):
            g = next(it, None)
            if g is None:
                raise SampleError(f"not enough groups (by {key!r}) to fill split {split!r} with {sizes[split]} samples")
            for i in groups[g]:
                labels[i] = split
            got += len(groups[g])
    rows = sorted(labels)
    out = table.take(rows)
    col = out.column_names.index("split")
    return out.set_column(col, "split", pa.array([labels[i] for i in rows], pa.string()))
