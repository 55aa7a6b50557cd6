"""Training from a cache where it lies: every file checked against the manifest before use, read ahead.

``kcache fit-encoders --cache https://…`` (or ``s3://``, ``memory://``, …) reads a finalized cache in
place. Conventions:

- **Verified per file, before use.** The first read of a file fetches all of it (never more than
  its manifest size + 1 bytes), hashes it and compares size and sha256 with the manifest. Only then
  are its bytes handed to zarr. A mismatch is a :class:`CacheError` naming the file's URL and both
  digests, raised by the read that needed the file: no value of a changed file is ever decoded, so
  training stops before a single step uses it. The manifest is the root of trust (see
  docs/sharing.md, "Threat model").
- **A bounded buffer of verified bytes** (:class:`VerifiedFiles`): zarr reads a shard as byte
  ranges (its index, then its chunks); they are served from the verified whole file, kept in a
  buffer of at most ``capacity`` bytes, least recently used out. A file evicted and needed again
  is fetched and verified again.
- **Read-ahead** (:class:`ReadAhead`): the loader knows its block order for the whole epoch and
  hands it over; background threads fetch and verify the files of the next blocks while the
  trainer works. Files fetched ahead are pinned (the buffer cannot evict them before they are
  read) and at most ``ahead_bytes`` of them are held at a time; the block being read is always
  fetched, whatever its size. The bookkeeping is :class:`AheadWindow` and :class:`LruBudget`,
  pure and tested on their own.
- Local caches are not verified on the fly unless asked (``verify=True``, ``--verify``): a local
  finalized cache is read-only, ``kcache pull`` verified every file it wrote, and ``kcache
  validate`` re-hashes everything; on the fly it costs one extra pass over every shard
  (docs/benchmarks.md). Remote caches always are, unless ``verify=False``.

Memory: at most ``capacity`` bytes of verified files, plus, per reading loader, the files of the
block it is reading when they alone exceed the read-ahead budget, plus the files being fetched. A
file the manifest says is larger than ``capacity`` is refused before it is fetched.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections import OrderedDict

from kcache.cache.format import MANIFEST, CacheError

DEFAULT_BUFFER_MB = 512
AHEAD_FRACTION = 0.5  # of the buffer: files fetched for blocks not read yet; the rest keeps recent files
READ_AHEAD_THREADS = 4  # concurrent fetches: one TCP stream rarely fills a link to object storage

Key = tuple[str, str]  # (part location, file path in the part)


# ---------------------------------------------------------------------------------------------
# pure bookkeeping


def check_file(data: bytes, size: int, sha256: str, where: str) -> None:
    """Raise CacheError unless ``data`` is exactly the file the manifest records (``size``, ``sha256``)."""
    got = hashlib.sha256(data).hexdigest()
    if len(data) == size and got == sha256:
        return
    what = "content differs" if len(data) == size else ("truncated" if len(data) < size else "longer")
    raise CacheError(f"{where}: {what} from the manifest (sha256 {got}, manifest sha256 {sha256}; {len(data)} of "
                     f"{size} bytes); the file was changed after the cache was finalized, or in transit. Stopped "
                     f"before any of its values were used; run `kcache validate` on the cache to list every "
                     f"damaged file")


class LruBudget:
    """Which buffered entries to drop so their sizes stay within ``capacity``: least recently used
    first, never a pinned one. Keys only, no data (the caller keeps the bytes)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.sizes: OrderedDict = OrderedDict()  # key -> size, least recently used first
        self.pins: dict = {}  # key -> count; a key may be pinned before it is added
        self.held = 0

    def __contains__(self, key) -> bool:
        return key in self.sizes

    def touch(self, key) -> None:
        self.sizes.move_to_end(key)

    def add(self, key, size: int) -> list:
        """Record ``key`` (most recently used) and return the keys to drop, possibly ``key`` itself
        when it is unpinned and does not fit beside the pinned entries."""
        if key in self.sizes:
            self.touch(key)
            return []
        self.sizes[key] = int(size)
        self.held += int(size)
        return self._evict()

    def pin(self, key) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key) -> list:
        """Release one pin; returns the keys to drop now that ``key`` may go."""
        n = self.pins.get(key, 0) - 1
        if n > 0:
            self.pins[key] = n
        else:
            self.pins.pop(key, None)
        return self._evict()

    def _evict(self) -> list:
        out = []
        for key in list(self.sizes):
            if self.held <= self.capacity:
                break
            if self.pins.get(key):
                continue
            self.held -= self.sizes.pop(key)
            out.append(key)
        return out


WAIT = "wait"


class AheadWindow:
    """The files a read-ahead may fetch next, holding at most ``budget`` bytes for blocks not yet done.

    ``plan[b]`` lists the files block ``b`` needs (blocks in reading order), ``sizes`` their
    bytes. The consumer reports the block it is about to read with ``advance(b)``; ``next_file``
    returns the next file to fetch (counted in the window), ``WAIT`` when that would exceed the
    budget (or the plan is done as far as the consumer allows), or None when the plan is
    exhausted. A file needed by several blocks in the window is counted once. The block being read
    is never held back, so a block larger than the budget still streams (the only overshoot).
    """

    def __init__(self, plan: list[list], sizes: dict, budget: int):
        self.plan, self.sizes, self.budget = plan, sizes, int(budget)
        self.pos = 0  # the block the consumer reads (or is about to)
        self.cursor, self.k = 0, 0  # next file to consider: plan[cursor][k]
        self.counts: dict = {}  # file -> blocks in the window that need it
        self.counted: dict[int, list] = {}  # block -> files counted for it
        self.held = 0  # bytes of the distinct files in the window

    def next_file(self):
        """The next file to fetch, ``WAIT`` or None (see the class)."""
        while self.cursor < len(self.plan):
            files = self.plan[self.cursor]
            if self.k >= len(files):
                self.cursor, self.k = self.cursor + 1, 0
                continue
            f = files[self.k]
            if f in self.counted.get(self.cursor, ()):  # listed twice for one block
                self.k += 1
                continue
            new = not self.counts.get(f)
            if new and self.cursor > self.pos and self.held + self.sizes[f] > self.budget:
                return WAIT
            self.counts[f] = self.counts.get(f, 0) + 1
            self.counted.setdefault(self.cursor, []).append(f)
            self.k += 1
            if new:
                self.held += self.sizes[f]
                return f
        return None

    def advance(self, pos: int) -> list:
        """The consumer is at block ``pos``: release the blocks before it. Returns the files no
        block in the window needs any more."""
        released = []
        for b in [b for b in self.counted if b < pos]:
            for f in self.counted.pop(b):
                self.counts[f] -= 1
                if not self.counts[f]:
                    del self.counts[f]
                    self.held -= self.sizes[f]
                    released.append(f)
        self.pos = max(self.pos, pos)
        if self.cursor < self.pos:  # the consumer overtook the read-ahead: skip what it already read
            self.cursor, self.k = self.pos, 0
        return released


# ---------------------------------------------------------------------------------------------
# the buffer of verified files (thread-safe: zarr's event loop, the loader and read-ahead threads)


class VerifiedFiles:
    """Verified whole files of a finalized cache, fetched on first use, kept within ``capacity`` bytes."""

    def __init__(self, capacity: int = DEFAULT_BUFFER_MB << 20, ahead_bytes: int | None = None,
                 threads: int = READ_AHEAD_THREADS):
        self.lru = LruBudget(capacity)
        self.ahead_bytes = int(capacity * AHEAD_FRACTION) if ahead_bytes is None else int(ahead_bytes)
        self.threads = threads
        self._data: dict[Key, bytes] = {}
        self._inflight: dict[Key, threading.Event] = {}
        self._lock = threading.Lock()
        self.stats = {"files_fetched": 0, "bytes_fetched": 0, "hits": 0, "fetch_seconds": 0.0, "hash_seconds": 0.0}

    def get(self, loc, rel: str) -> bytes:
        """The bytes of ``rel`` in part location ``loc``, verified against the manifest (``loc.sizes``,
        ``loc.digests``). One fetch per file at a time: a second reader waits for the first."""
        key = (loc.spec, rel)
        while True:
            with self._lock:
                if key in self._data:
                    self.lru.touch(key)
                    self.stats["hits"] += 1
                    return self._data[key]
                event = self._inflight.get(key)
                if event is None:
                    event = self._inflight[key] = threading.Event()
                    break
            event.wait()  # fetched by another thread; a failed fetch is retried (and fails) here
        try:
            data = self._fetch(loc, rel)
            with self._lock:
                self._data[key] = data
                for k in self.lru.add(key, len(data)):
                    self._data.pop(k, None)
            return data
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            event.set()

    def _fetch(self, loc, rel: str) -> bytes:
        size, sha = loc.sizes[rel], loc.digests[rel]
        if size > self.lru.capacity:  # bounded before allocating: one file never exceeds the buffer
            raise CacheError(f"{loc.url(rel)}: {size:,} bytes (manifest), more than the {self.lru.capacity:,}-byte "
                             "stream buffer it must be verified in; give a larger --stream-buffer-mb, or pull the "
                             "cache (`kcache pull`) and train from the copy")
        t0 = time.perf_counter()
        try:
            data = loc.read_unverified(rel, size)
        except FileNotFoundError:
            raise CacheError(f"{loc.url(rel)}: listed in {MANIFEST} but missing; the cache is incomplete "
                             f"(run `kcache validate {loc}`)") from None
        t1 = time.perf_counter()
        check_file(data, size, sha, loc.url(rel))
        with self._lock:
            self.stats["files_fetched"] += 1
            self.stats["bytes_fetched"] += len(data)
            self.stats["fetch_seconds"] += t1 - t0
            self.stats["hash_seconds"] += time.perf_counter() - t1
        return data

    async def aget(self, loc, rel: str) -> bytes:
        """``get`` off the calling event loop (zarr's), so its other reads go on meanwhile."""
        return await asyncio.to_thread(self.get, loc, rel)

    def pin(self, key: Key) -> None:
        with self._lock:
            self.lru.pin(key)

    def unpin(self, key: Key) -> None:
        with self._lock:
            for k in self.lru.unpin(key):
                self._data.pop(k, None)

    @property
    def held_bytes(self) -> int:
        return self.lru.held


# ---------------------------------------------------------------------------------------------
# read-ahead


class ReadAhead:
    """Background threads fetching (and verifying) the files of the next blocks into ``files``.

    ``plan[b]`` lists ``(location, path)`` of the files block ``b`` needs, blocks in reading order.
    The consumer calls ``advance(b)`` before reading block ``b`` and ``close()`` when done. Fetch
    errors are left to the consumer: its own read of the file fetches it again and raises, naming
    the file, at the block that needs it (so the batches before it still train, and none after).
    """

    def __init__(self, files: VerifiedFiles, plan: list[list[tuple]], ahead_bytes: int | None = None,
                 threads: int | None = None):
        self.files = files
        self.where: dict[Key, object] = {}
        keyed = []
        for block in plan:
            keyed.append([self._key(loc, rel) for loc, rel in block])
        sizes = {k: self.where[k].sizes[k[1]] for k in self.where}
        self.window = AheadWindow(keyed, sizes, files.ahead_bytes if ahead_bytes is None else ahead_bytes)
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"kcache-read-ahead-{i}")
                         for i in range(threads or files.threads)]
        for t in self._threads:
            t.start()

    def _key(self, loc, rel: str) -> Key:
        self.where[(loc.spec, rel)] = loc
        return (loc.spec, rel)

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    key = self.window.next_file()
                    if key is None:
                        return
                    if key != WAIT:
                        self.files.pin(key)
                        break
                    self._cond.wait()
            try:
                self.files.get(self.where[key], key[1])
            except Exception:  # noqa: BLE001 - the consumer's own read raises it, at the block that needs the file
                pass

    def advance(self, block: int) -> None:
        with self._cond:
            for key in self.window.advance(block):
                self.files.unpin(key)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop fetching and release every pin (threads finish the fetch they are in, then exit)."""
        with self._cond:
            self._closed = True
            for key in self.window.advance(len(self.window.plan) + 1):
                self.files.unpin(key)
            self._cond.notify_all()


class NoReadAhead:
    """Stands in for :class:`ReadAhead` when the cache is read directly (local, unverified)."""

    def advance(self, block: int) -> None:
        pass

    def close(self) -> None:
        pass


def shard_files(part, name: str, start: int, stop: int) -> list[str]:
    """Paths of the files of array ``name`` of ``part`` that hold its rows ``[start, stop)`` (one per
    shard along the rows; the manifest lists only shards that were written)."""
    if stop <= start:
        return []
    arr = part.array(name)
    rows = int(arr.metadata.chunk_grid.chunk_shape[0])  # a shard, when sharded: one file
    out = []
    for s in range(start // rows, (stop - 1) // rows + 1):
        rel = f"{name}/{arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))}"
        if rel in part.loc.sizes:
            out.append(rel)
    return out


def rows_files(cache, layers: list[int], start: int, stop: int) -> list[tuple]:
    """``(location, path)`` of every file holding the delta rows ``[start, stop)`` (global rows) of
    ``layers``, parts in order."""
    names = [f"deltas/layer_{l:02d}" for l in layers]
    if cache.storage["kind"] == "int8":
        names += [f"deltas/scale_{l:02d}" for l in layers]
    out = []
    for j, part in enumerate(cache.parts):
        base, end = int(cache.row_base[j]), int(cache.row_base[j + 1])
        a, b = max(start, base) - base, min(stop, end) - base
        for name in names:
            out += [(part.loc, rel) for rel in shard_files(part, name, a, b)]
    return out


def read_ahead(cache, layers: list[int], row_ranges: list[tuple[int, int]]):
    """A :class:`ReadAhead` for reading ``row_ranges`` (one ``(start, stop)`` per block, in order) of
    ``layers``, or a :class:`NoReadAhead` when the cache is not read through verified files."""
    files = getattr(cache, "verified", None)
    if files is None:
        return NoReadAhead()
    return ReadAhead(files, [rows_files(cache, layers, a, b) for a, b in row_ranges])


# ---------------------------------------------------------------------------------------------
# opening


def wants_verification(spec, verify: bool | None) -> bool:
    """Verify on the fly? ``verify`` when given; by default remote caches yes, local ones no."""
    from kcache.cache.location import Location, is_url

    if verify is not None:
        return bool(verify)
    return is_url(str(spec)) and Location(spec).remote


def open_streaming(spec: str | os.PathLike, verify: bool | None = None, buffer_mb: int = DEFAULT_BUFFER_MB):
    """Open a cache for training: a :class:`~kcache.cache.reader.Cache` whose every file read is verified
    against the manifest (remote caches by default, local ones when ``verify``), through a buffer of
    ``buffer_mb`` MiB. A cache that is not finalized has no digests: refused when verification is on."""
    from kcache.cache.reader import Cache

    if not wants_verification(spec, verify):
        return Cache.open(spec)
    if buffer_mb <= 0:
        raise CacheError(f"stream buffer of {buffer_mb} MiB: give a positive size")
    return Cache.open(spec, verified=VerifiedFiles(int(buffer_mb) << 20))
