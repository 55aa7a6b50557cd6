"""``kcache merge A B ... --out C``: one cache from caches extracted by different teams.

The sources must come from the same model, site, layers, template, dtype and storage (every
setting but the sample set); the first differing field is named. Parts are copied unchanged
(bytes verified against each source's manifest while copying) into ``C/parts/NNNNN`` and a new
manifest lists them. A sample id present in more than one source is an error, unless
``keep_first``: then later copies are hidden through the manifest's per-part ``exclude`` list
(the bytes stay, so every part still matches its digest).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tqdm.auto import tqdm

from kcache.cache.format import MANIFEST, CacheError
from kcache.cache.integrity import finalize, part_digest, part_files
from kcache.cache.reader import Cache, settings_differences
from kcache.lock import fresh_tmp, output_lock
from kcache.paths import safe_local_path


def duplicate_plan(id_lists: list[list[str]], names: list[str], keep_first: bool) -> list[set[str]]:
    """Ids to exclude from each source so every id is kept once (its first occurrence).

    Raises naming the first duplicate and both sources unless ``keep_first``.
    """
    seen: dict[str, int] = {}
    exclude: list[set[str]] = [set() for _ in id_lists]
    dups = 0
    for j, ids in enumerate(id_lists):
        for sid in ids:
            if sid in seen:
                if not keep_first:
                    more = sum(1 for x in ids if seen.get(x, j) < j) - 1
                    raise CacheError(f"sample {sid!r} is in both {names[seen[sid]]} and {names[j]}"
                                     + (f" (and {more} more duplicate(s) in {names[j]})" if more > 0 else "")
                                     + "; pass --keep-first to keep the first copy of each")
                exclude[j].add(sid)
                dups += 1
            else:
                seen[sid] = j
    return exclude


def merge(sources: list[str], out: str | os.PathLike, keep_first: bool = False, progress: bool = True) -> dict:
    """Merge complete caches (paths or URLs) into a new finalized cache at ``out``; returns its manifest.

    Holds the output lock on ``out`` throughout (kcache.lock): one writer per output.
    """
    with output_lock(out, "merge into it"):
        return _merge(sources, out, keep_first, progress)


def _merge(sources: list[str], out: str | os.PathLike, keep_first: bool, progress: bool) -> dict:
    out = Path(out)
    if len(sources) < 2:
        raise CacheError("merge needs at least two caches")
    if out.exists() and any(out.iterdir()):
        raise CacheError(f"{out} exists and is not empty; "
                         "merge writes a new cache (caches are immutable once finalized)")
    caches = [Cache.open(s) for s in sources]
    names = [str(s) for s in sources]
    for name, c in zip(names[1:], caches[1:]):
        diffs = settings_differences(caches[0].settings, c.settings)
        if diffs:
            raise CacheError(f"cannot merge {name} with {names[0]}: settings differ ({'; '.join(diffs)})")
        if c.hidden_size != caches[0].hidden_size:
            raise CacheError(f"cannot merge {name} with {names[0]}: "
                             f"hidden size {c.hidden_size} vs {caches[0].hidden_size}")
    exclude = duplicate_plan([c.index["sample_id"].to_pylist() for c in caches], names, keep_first)

    tmp = fresh_tmp(out, "merging")  # after removing those of a killed merge (never a live process's)
    tmp.mkdir(parents=True)
    records, rels = [], []
    total = sum(sum(f["size"] for f in _files_of(c, j).values()) for c in caches for j in range(len(c.parts)))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress)
    k = 0
    for name, c, excl in zip(names, caches, exclude):
        for j, part in enumerate(c.parts):
            rel = f"parts/{k:05d}"
            files = _copy_part(c, j, tmp / rel, bar)
            part_ids = set(part.index["sample_id"].to_pylist())
            rec = {"path": rel, "samples": part.index.num_rows, "rows": part.rows, "digest": part_digest(files),
                   "files": files, "origin": f"{name}" + ("" if part.name == "." else f" ({part.name})")}
            ex = sorted((excl & part_ids) | set(part.exclude))
            if ex:
                rec["exclude"] = ex
            records.append(rec)
            rels.append(rel)
            k += 1
    bar.close()
    provenance = {"merged": {
        "sources": [{"source": n, "metadata_digest": c.manifest["metadata_digest"] if c.manifest else None,
                     "samples": c.num_samples}
                    for n, c in zip(names, caches)],
        "keep_first": keep_first,
        "excluded_duplicates": sum(len(e) for e in exclude),
    }}
    manifest = finalize(tmp, rels, provenance=provenance, records=records)
    os.replace(tmp, out)
    return manifest


def _files_of(cache: Cache, j: int) -> dict[str, dict]:
    """The files of part ``j``: from the manifest when finalized, else by walking the directory."""
    if cache.manifest is not None:
        return cache.manifest["parts"][j]["files"]
    local = cache.parts[j].loc.local_path
    if local is None:
        raise CacheError(f"{cache.parts[j].loc}: a remote cache must be finalized (have a manifest) to be merged")
    return part_files(local)


def _copy_part(cache: Cache, j: int, dest: Path, bar) -> dict[str, dict]:
    """Copy one part's files, checking each against the source manifest; returns the file list."""
    loc = cache.parts[j].loc
    out = {}
    for rel, want in sorted(_files_of(cache, j).items()):
        target = safe_local_path(dest, rel, str(loc))  # checked before a byte is read or written
        try:
            data = loc.read_bytes(rel, want["size"])  # never more than the manifest's size
        except FileNotFoundError:
            raise CacheError(f"{loc.url(rel)}: "
                             f"listed in {MANIFEST} but missing (run `kcache validate {loc}`)") from None
        got = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if got != want:
            raise CacheError(f"{loc.url(rel)}: does not match its manifest entry (corrupt source; "
                             f"run `kcache validate {loc}`)")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        out[rel] = got
        bar.update(len(data))
    return out
