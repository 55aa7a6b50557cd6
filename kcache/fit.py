"""Stage two: fit one encoder per cached layer to that layer's deltas, from the cache alone.

The decoder is never loaded: token embeddings come from the matrix stored in the cache.

Conventions
* Loss per layer = mean over loss-mask positions and hidden dims of ``(pred - delta)^2``;
  padding never counts. The training loss is the sum over layers, and gradients are clipped
  per encoder, so every encoder trains exactly as it would alone.
* FVU = MSE / Var(delta), with Var the per-dimension (centred) variance over the evaluated
  positions: 1.0 is what predicting the mean delta scores, < 1 is learning.
* Learning rate: linear warm-up from ``lr_min`` to ``lr_max`` over ``warmup`` optimizer steps,
  then cosine back to ``lr_min`` at the last step; steps are optimizer steps, i.e.
  ``ceil(batches_per_epoch / grad_accum) * epochs`` (``kcache.train.lr_at``, shared with finetune and edit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kcache import distributed, shutdown
from kcache._io import now, pyplot, save_png
from kcache.align import sink_of, targets_of
from kcache.cache.format import CacheError
from kcache.cache.reader import Cache
from kcache.cache.stream import open_streaming
from kcache.encoders import CONFIG_FILE, WEIGHTS_FILE, EncoderConfig, EncoderStack, publish_bundle, save_bundle
from kcache.precision import autocast_for
from kcache.train import (  # noqa: F401 - OptimConfig, lr_at, optimizer_step, CHECKPOINT_* are also re-exported
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    OptimConfig,
    adamw,
    checkpoint_dir,
    length_grouped_batches,
    load_checkpoint,
    lr_at,
    new_state,
    optimizer_step,
    run_settings,
    save_checkpoint,
    schedule_steps,
)

# Shared with finetune and edit (kcache.train); the old names stay importable from here.
_save_checkpoint, _load_checkpoint, final_dir = save_checkpoint, load_checkpoint, checkpoint_dir


_READ_ONLY_SETTINGS = ("parallel", "verify", "stream_buffer_mb")
VAL_KEEP_BYTES = 1 << 30  # validation batches (float32 targets) kept in memory up to this size


@dataclasses.dataclass
class FitConfig(OptimConfig):
    layers: list[int] | None = None  # default: every cached layer
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    checkpoint_every: int = 50
    val_fraction: float = 0.1  # used only when the cache has no "validation" split
    val_max_samples: int = 512
    buffer_samples: int = 2048  # shuffling buffer (bounds memory)
    device: str | None = None
    parallel: str = "layers"  # on several processes: "layers" (each trains its own layers); ignored in one
    verify: bool | None = None  # check every file read against the manifest (None: remote caches only)
    stream_buffer_mb: int = 512  # verified files kept in memory when verifying (kcache.cache.stream)

    def run_config(self) -> dict:
        """The settings that define the run (resume check, bundle metadata). ``parallel``, ``verify`` and
        ``stream_buffer_mb`` are left out: how the cache is read does not change the results."""
        return {k: v for k, v in run_settings(self).items() if k not in _READ_ONLY_SETTINGS}

    def encoder_config(self, d_model: int) -> EncoderConfig:
        return EncoderConfig(d_model=d_model, hidden_size=self.hidden_size, num_layers=self.num_layers,
                             num_heads=self.num_heads, intermediate_size=self.intermediate_size)


# ---------------------------------------------------------------------------------------------
# pure pieces


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``(pred - target)^2`` over positions where ``mask`` (B, X) is true and all dims."""
    m = mask.to(pred.dtype).unsqueeze(-1)
    denom = m.sum() * pred.shape[-1]
    return ((pred - target).pow(2) * m).sum() / denom.clamp(min=1)


def shuffle_schedule(blocks: list[list[int]], buffer: int, rng: np.random.Generator) -> list[int]:
    """Order in which samples leave a bounded shuffling buffer fed block by block.

    ``blocks`` (already in reading order) lists sample positions; once the buffer holds
    ``buffer`` samples, each new sample evicts a uniformly chosen one. Deterministic in ``rng``,
    so the same order is reproduced on resume without storing it.
    """
    out, buf = [], []
    for block in blocks:
        for s in block:
            buf.append(s)
            if len(buf) > buffer:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                out.append(buf.pop())
    rng.shuffle(buf)
    return out + buf


def split_samples(cache: Cache, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sample positions, held out by sample.

    The cache's own ``validation`` split when it has one (``test`` is never used); otherwise a
    deterministic hash of the sample id picks ``val_fraction`` of the non-test samples.
    """
    import hashlib

    splits = np.array(cache.index["split"].to_pylist())
    if (splits == "validation").any():
        return np.nonzero(splits == "train")[0], np.nonzero(splits == "validation")[0]
    ids = cache.index["sample_id"].to_pylist()
    h = np.array([int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) / 2**32 for i in ids])
    pool = splits != "test"
    return np.nonzero(pool & (h >= val_fraction))[0], np.nonzero(pool & (h < val_fraction))[0]


def layers_of_rank(layers: list[int], rank: int, world: int) -> list[int]:
    """Layers trained by process ``rank`` of ``world`` in layer-parallel mode (round robin)."""
    return list(layers[rank::world])


VAL_KEYS = ("mse", "fvu", "fvu_mean_baseline", "fvu_zero_baseline")


def share_layer_values(values: dict[int, list[float]], layers: list[int], width: int) -> dict[int, list[float]]:
    """Give every process the per-layer numbers each process computed for its own layers.

    All-reduces (SUM) a float64 table with one row per global layer that is zero in the rows of
    layers this process does not own. Adding zeros is exact, so every process ends with the very
    floats the owner computed (hence identical global decisions, and sums taken afterwards in
    global layer order equal the single-process ones bit for bit).
    """
    t = torch.zeros(len(layers), width, dtype=torch.float64)
    for i, l in enumerate(layers):
        if l in values:
            t[i] = torch.tensor(values[l], dtype=torch.float64)
    distributed.all_reduce_sum(t)
    return {l: t[i].tolist() for i, l in enumerate(layers)}


# ---------------------------------------------------------------------------------------------
# reading the cache


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor  # (B, L) long, right-padded k_ids + x_ids
    valid: torch.Tensor  # (B, L) bool
    shifts: torch.Tensor  # (B,) long
    loss_mask: torch.Tensor  # (B, X) bool
    targets: dict[int, torch.Tensor]  # layer -> (B, X, H) float32
    samples: list[int]

    def to(self, device) -> Batch:
        return Batch(self.tokens.to(device), self.valid.to(device), self.shifts.to(device), self.loss_mask.to(device),
                     {l: t.to(device, non_blocking=True) for l, t in self.targets.items()}, self.samples)


class CacheReader:
    """Reads whole chunk-aligned blocks of the cache for every layer at once."""

    def __init__(self, cache: Cache, layers: list[int]):
        self.cache, self.layers = cache, layers
        self.row_off = cache.index["row_offset"].to_numpy()
        self.x_len = cache.index["x_len"].to_numpy().astype(np.int64)
        self.k_len = cache.index["k_len"].to_numpy().astype(np.int64)
        self.chunk = cache.settings["chunk_rows"]
        self.ids = cache.flat("tokens/ids")
        self.loss = cache.flat("masks/loss")
        self.bytes_read = 0

    def read_ahead(self, blocks: list[list[int]]):
        """Fetch the files of ``blocks`` (in reading order) ahead of ``read_block`` when the cache is
        streamed (kcache.cache.stream); call ``advance(i)`` before reading block i, ``close()`` after."""
        from kcache.cache.stream import read_ahead

        return read_ahead(self.cache, self.layers, [self.block_rows(b) for b in blocks])

    def block_rows(self, block: list[int]) -> tuple[int, int]:
        """The delta rows ``[start, stop)`` a block reads."""
        return int(self.row_off[block[0]]), int(self.row_off[block[-1]] + self.x_len[block[-1]])

    def blocks(self, samples: np.ndarray) -> list[list[int]]:
        """Group samples (any order) by the chunk their rows start in, in layout order."""
        groups: dict[int, list[int]] = {}
        for s in sorted(int(x) for x in samples):
            groups.setdefault(int(self.row_off[s]) // self.chunk, []).append(s)
        return [groups[k] for k in sorted(groups)]

    def read_block(self, block: list[int]) -> dict[int, dict]:
        a, b = self.block_rows(block)
        rows = {}
        for l in self.layers:
            try:
                rows[l], stored = self.cache.read_rows(l, a, b, with_bytes=True, widen=False)  # widened by collate
            except ValueError as e:  # zarr's crc32c check: "Stored and computed checksum do not match"
                if (err := self._corrupt(f"deltas/layer_{l:02d}", a, b, e)) is None:
                    raise
                raise err from e
            self.bytes_read += stored
        out = {}
        for s in block:
            r0 = int(self.row_off[s]) - a
            n = int(self.x_len[s])
            toks, shift = self.cache.encoder_tokens(s)
            out[s] = {"tokens": toks, "shift": shift, "loss": self.loss[int(self.row_off[s]): int(self.row_off[s]) + n],
                      "deltas": {l: rows[l][r0 : r0 + n] for l in self.layers}}
        return out

    def _corrupt(self, array: str, a: int, b: int, e: ValueError) -> CacheError | None:
        """A checksum failure as an error naming the cache, part, array and chunks (None for other ValueErrors)."""
        if "checksum" not in str(e).lower():
            return None
        j = int(np.searchsorted(self.cache.row_base, a, side="right") - 1)
        base = int(self.cache.row_base[j])
        first, last = (a - base) // self.chunk, (min(b, int(self.cache.row_base[j + 1])) - 1 - base) // self.chunk
        chunks = f"chunk {first}" if first == last else f"one of chunks {first}-{last}"
        part = "" if self.cache.parts[j].name == "." else self.cache.parts[j].name + "/"
        return CacheError(f"{self.cache.location}: array {part}{array}, "
                          f"{chunks} (rows {a - base}-{b - 1 - base}) is corrupt ({e}); "
                          f"run `kcache validate {self.cache.location}` to list every damaged file, "
                          "then re-extract or pull the cache again")


def collate(items: list[dict], layers: list[int], samples: list[int]) -> Batch:
    """Pad a list of read samples into a ``Batch`` (float32 targets).

    Built in numpy and wrapped with ``torch.from_numpy`` at the end: this runs on the loader thread,
    and a torch op there large enough to go parallel starts a second OpenMP team whose spinning
    threads slowed the training threads by half on a 2-core machine (docs/benchmarks.md).
    """
    lens = [len(it["tokens"]) for it in items]
    xl = [len(it["loss"]) for it in items]
    L, X = max(lens), max(xl)
    hidden = items[0]["deltas"][layers[0]].shape[1]
    tokens = np.zeros((len(items), L), dtype=np.int64)
    valid = np.arange(L)[None, :] < np.asarray(lens)[:, None]
    lmask = np.zeros((len(items), X), dtype=bool)
    targets = {l: np.zeros((len(items), X, hidden), dtype=np.float32) for l in layers}
    for i, it in enumerate(items):
        tokens[i, : lens[i]] = it["tokens"]
        lmask[i, : xl[i]] = np.asarray(it["loss"], dtype=bool)
        for l in layers:
            targets[l][i, : xl[i]] = it["deltas"][l]
    return Batch(torch.from_numpy(tokens), torch.from_numpy(valid),
                 torch.from_numpy(np.array([it["shift"] for it in items], dtype=np.int64)), torch.from_numpy(lmask),
                 {l: torch.from_numpy(t) for l, t in targets.items()}, samples)


class BatchLoader:
    """Yields the batches of one epoch in a deterministic order, read ahead on a worker thread.

    Blocks are read in a random (seeded) order into a bounded shuffling buffer; the order of
    samples is ``shuffle_schedule`` and is independent of timing. ``skip`` batches are dropped
    (resume). ``wait_seconds`` is the time the consumer spent waiting for data.
    """

    def __init__(self, reader: CacheReader, samples: np.ndarray, batch_size: int, buffer: int, seed: int, epoch: int,
                 shuffle: bool = True, skip: int = 0, prefetch: int = 4, length_groups: int = 0):
        rng = np.random.default_rng([seed, epoch])
        blocks = reader.blocks(samples)
        if shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
            order = shuffle_schedule(blocks, buffer, rng)
        else:
            order = [s for b in blocks for s in b]
        # grouped by the encoders' input length, knowledge + input (what every block runs over)
        self.batches = length_grouped_batches(order, reader.k_len + reader.x_len, batch_size,
                                              length_groups if shuffle else 0, rng)
        self.reader, self.blocks, self.skip = reader, blocks, skip
        self.ahead = reader.read_ahead(blocks)  # a no-op unless the cache is streamed
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        self.wait_seconds = 0.0
        self._stop = False
        self.thread = threading.Thread(target=self._work, daemon=True, name="kcache-loader")
        self.thread.start()
        shutdown.track(self)  # closed before the interpreter exits if a caller never closes it

    def __len__(self):
        return len(self.batches)

    def _work(self):
        try:
            loaded: dict[int, dict] = {}
            next_block = 0
            for bi, batch in enumerate(self.batches):
                while any(s not in loaded for s in batch):
                    self.ahead.advance(next_block)
                    loaded.update(self.reader.read_block(self.blocks[next_block]))
                    next_block += 1
                items = [loaded.pop(s) for s in batch]
                if bi < self.skip:
                    continue
                b = collate(items, self.reader.layers, batch)
                while not self._stop:
                    try:
                        self.q.put(b, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop:
                    return
            self.q.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self.q.put(e)
        finally:
            self.ahead.close()

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            item = self.q.get()
            self.wait_seconds += time.perf_counter() - t0
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self, timeout: float = 60.0):
        """Stop reading ahead and wait (up to ``timeout`` s) for the worker thread (it finishes the block it is
        reading)."""
        self._stop = True
        self.ahead.close()
        deadline = time.monotonic() + timeout
        while self.thread is not threading.current_thread() and self.thread.is_alive() and time.monotonic() < deadline:
            try:  # drain: the worker may be blocked putting its last batch, None or an error
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)


# ---------------------------------------------------------------------------------------------
# training


def predict(stack: EncoderStack, emb: torch.Tensor, batch: Batch) -> dict[int, torch.Tensor]:
    """Encoder outputs aligned to input positions: ``shift_left(E_l(K, x), |K|)``."""
    return stack(emb[batch.tokens], batch.valid, shifts=batch.shifts, length=batch.loss_mask.shape[1])


@torch.no_grad()
def evaluate_layers(stack: EncoderStack, emb: torch.Tensor, loader, device, mean: dict[int, torch.Tensor],
                    autocast) -> dict:
    """Per-layer MSE, FVU and the two trivial baselines (zero, train mean) over a loader."""
    stack.eval()
    acc = {l: {"sse": 0.0, "n": 0, "sum": None, "sumsq": None, "sse_mean": 0.0, "sse_zero": 0.0} for l in stack.layers}
    for batch in loader:
        batch = batch.to(device)
        with autocast():
            preds = predict(stack, emb, batch)
        m = batch.loss_mask
        for l in stack.layers:
            t = batch.targets[l][m].double()
            p = preds[l].float()[m].double()
            a = acc[l]
            a["sse"] += float((p - t).pow(2).sum())
            a["sse_mean"] += float((t - mean[l].double()).pow(2).sum())
            a["sse_zero"] += float(t.pow(2).sum())
            a["n"] += t.numel()
            a["sum"] = t.sum(0) if a["sum"] is None else a["sum"] + t.sum(0)
            a["sumsq"] = t.pow(2).sum(0) if a["sumsq"] is None else a["sumsq"] + t.pow(2).sum(0)
    stack.train()
    out = {}
    for l, a in acc.items():
        n = max(a["n"], 1)
        rows = n / a["sum"].numel()
        var = float(((a["sumsq"] / rows) - (a["sum"] / rows).pow(2)).mean())
        mse = a["sse"] / n
        out[l] = {"mse": mse, "fvu": mse / var if var > 0 else float("nan"),
                  "fvu_mean_baseline": a["sse_mean"] / n / var if var > 0 else float("nan"),
                  "fvu_zero_baseline": a["sse_zero"] / n / var if var > 0 else float("nan")}
    return out


def _train_mean(reader: CacheReader, samples: np.ndarray, max_blocks: int, seed: int) -> dict[int, torch.Tensor]:
    """Per-dimension mean delta of the training set (estimated from up to ``max_blocks`` blocks)."""
    blocks = reader.blocks(samples)
    rng = np.random.default_rng([seed, 999])
    pick = sorted(rng.choice(len(blocks), size=min(max_blocks, len(blocks)), replace=False)) if blocks else []
    sums = {l: 0.0 for l in reader.layers}
    count = 0
    for i in pick:
        data = reader.read_block(blocks[i])
        for item in data.values():
            m = np.asarray(item["loss"], dtype=bool)
            for l in reader.layers:
                sums[l] = sums[l] + item["deltas"][l][m].astype(np.float64).sum(0)
            count += int(m.sum())
    return {l: torch.from_numpy(np.asarray(sums[l] / max(count, 1), dtype=np.float32)) for l in reader.layers}


_RANK_DIR = re.compile(r"rank-(\d{5})-of-(\d{5})$")


def rank_checkpoint_dir(out: Path, rank: int, world: int) -> Path:
    """Checkpoint of process ``rank`` of ``world``; one process keeps ``out/checkpoint`` itself."""
    return checkpoint_dir(out) if world == 1 else checkpoint_dir(out) / f"rank-{rank:05d}-of-{world:05d}"


def best_part_dir(out: Path, rank: int, world: int) -> Path:
    """Best weights of process ``rank`` of ``world`` (its layers only), merged into ``out``."""
    d = rank_checkpoint_dir(out, rank, world)
    return d.with_name(d.name + ".best")


def _check_checkpoint_layout(out: Path, world: int) -> None:
    """Refuse to resume (or overwrite) a checkpoint written by a different number of processes:
    each process's checkpoint holds only its own layers."""
    base = checkpoint_dir(out)
    if not base.is_dir():
        return
    found = {int(m.group(2)) for p in base.iterdir() if p.is_dir() and (m := _RANK_DIR.match(p.name))}
    if (base / "state.json").exists():
        found.add(1)
    if found - {world}:
        raise CacheError(f"{base}: holds the checkpoint of a run on {', '.join(map(str, sorted(found - {world})))} "
                         f"process(es), this run has {world}; rerun with that many processes, "
                         "use another --out, or delete it")


def _resume_together(load, where: Path, rank: int, world: int):
    """``load()`` on every process, then make sure all of them resume from the same step (a
    process that starts over while the others resume would train on a different schedule)."""
    err, state = None, None
    try:
        state = load()
    except CacheError as e:
        err = e
    steps = torch.zeros(world, dtype=torch.float64)
    steps[rank] = -2 if err else (-1 if state is None else state["step"])
    steps = distributed.all_reduce_sum(steps).tolist()
    if err:
        raise err
    if -2 in steps:
        raise CacheError(f"{where}: process(es) {[r for r, s in enumerate(steps) if s == -2]} cannot "
                         "resume (see their error)")
    if len(set(steps)) > 1:
        shown = ", ".join(f"rank {r}: {'none' if s < 0 else int(s)}" for r, s in enumerate(steps))
        raise CacheError(f"{where}: the processes' checkpoints are at different steps "
                         f"({shown}); delete it to start over")
    return state


def fit_encoders(cache_path: str | Path | Cache, out: str | Path, cfg: FitConfig | None = None,
                 progress: bool = True, on_step=None) -> dict:
    """Train encoders on a cache (a path or URL, or an opened ``Cache``); writes the best bundle to
    ``out`` and returns the summary.

    Rerunning with the same arguments resumes from ``out/checkpoint``. ``on_step(step)`` is
    called after every optimizer step (tests use it to simulate a crash).

    Under a launcher (torchrun: RANK / WORLD_SIZE set, see ``kcache.distributed``) with ``cfg.parallel
    == "layers"``, process r trains layers ``layers[r::world]``: encoders are independent, so each
    ends exactly as in a single-process run. Validation numbers are shared after every evaluation
    so all processes take the same decisions (best step, early stop); each keeps its own
    checkpoint (``out/checkpoint/rank-RRRRR-of-WWWWW``) and best weights (``...WWWWW.best``); the
    first process merges the latter into ``out`` and alone writes the shared files.

    One writer per output: the call holds the lock on ``out`` (process r > 0 of a launch: the lock
    of its rank), so a second run into the same ``out`` fails at once naming the holder (kcache.lock).
    """
    from kcache.lock import output_lock

    rank, world, _ = distributed.dist_env()
    tag = f"rank-{rank:05d}-of-{world:05d}" if world > 1 and rank > 0 else None
    with output_lock(out, "train encoders into it", tag=tag):
        return _fit_encoders(cache_path, out, cfg, progress, on_step)


@dataclasses.dataclass
class _FitRun:
    """One process's training run: its data, encoders, optimizer and schedule, and ``state`` (the
    resumable part, what a checkpoint holds). ``layers`` are all the run's layers, ``mine`` the ones
    this process trains (all of them in a single process)."""

    cfg: FitConfig
    out: Path
    cache: Cache
    layers: list[int]
    mine: list[int]
    rank: int
    world: int
    device: torch.device
    autocast: object
    train_idx: np.ndarray
    val_idx: np.ndarray
    reader: CacheReader
    emb: torch.Tensor
    stack: EncoderStack
    opt: torch.optim.Optimizer
    total_steps: int
    warmup: int
    run_id: dict
    state: dict | None = None
    mean: dict | None = None
    val_kept: list | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return rank_checkpoint_dir(self.out, self.rank, self.world)

    @property
    def parts(self) -> list[Path]:
        return [best_part_dir(self.out, r, self.world) for r in range(self.world)]  # world > 1 only

    def evaluate_now(self, train_mse: dict[int, float]):
        """Validation figures of every layer (shared between processes when there are several).
        -> (per-layer results, total MSE, per-layer train MSE)."""
        res = evaluate_layers(self.stack, self.emb, self.val_batches(), self.device, self.mean, self.autocast)
        if self.world > 1:  # every process needs every layer's numbers: history, best step, early stop
            table = share_layer_values({l: [r[k] for k in VAL_KEYS] + [train_mse[l]] for l, r in res.items()},
                                       self.layers, len(VAL_KEYS) + 1)
            res = {l: dict(zip(VAL_KEYS, row[:-1])) for l, row in table.items()}
            train_mse = {l: row[-1] for l, row in table.items()}
        total = sum(r["mse"] for r in res.values())
        return res, total, train_mse

    def val_batches(self):
        """The validation batches: read once and kept in memory when they fit in ``VAL_KEEP_BYTES``
        (the validation samples are spread over the whole cache, so each reading touches most of
        its chunks), else read again at each evaluation."""
        if self.val_kept is not None:
            return self.val_kept
        loader = BatchLoader(self.reader, self.val_idx, self.cfg.batch_size, self.cfg.buffer_samples, self.cfg.seed, 0,
                             shuffle=False)
        x_len = self.reader.x_len
        padded = sum(len(b) * int(x_len[b].max()) for b in loader.batches if b)  # collate pads to the longest
        if padded * len(self.mine) * self.cache.hidden_size * 4 > VAL_KEEP_BYTES:
            return loader
        self.val_kept = list(loader)
        loader.close()
        return self.val_kept

    def save_best(self, res) -> None:
        """Publish the current weights as the best bundle in ``out`` (under a launcher: each
        process its part, then the first process merges them)."""
        if self.world == 1:
            _save_bundle(self.out, self.stack, self.cache, self.cfg, self.layers, self.state, res)
            return
        save_bundle(self.parts[self.rank], self.stack, _bundle_meta(self.cache, self.cfg, self.state, res))
        distributed.barrier()  # every part is on disk
        if self.main:
            _combine_parts(self.out, self.parts, self.layers, self.state["best_step"])

    def checkpoint(self) -> None:
        save_checkpoint(self.out, self.stack, self.opt, self.state, where=self.ckpt_dir,
                        before_publish=distributed.barrier if self.world > 1 else None)


def _fit_encoders(cache_path, out, cfg, progress, on_step) -> dict:
    cfg = cfg or FitConfig()
    out = Path(out)
    if cfg.parallel not in ("layers",):
        raise ValueError(f"parallel={cfg.parallel!r}: expected 'layers'")
    device, rank, world = _start_processes(cfg)
    # An opened cache is used as it is: ``kcache bench store --downstream`` passes a ``Cache.stored_as`` view;
    # a path or URL is opened with every file verified when remote.
    cache = cache_path if isinstance(cache_path, Cache) else open_streaming(cache_path, cfg.verify,
                                                                            cfg.stream_buffer_mb)
    layers = _check_layers(cfg, cache, cache_path, world)
    run = _prepare_run(cfg, out, cache, cache_path, layers, rank, world, device)
    _check_checkpoint_layout(out, world)
    run.state = _resume_state(run)
    mean = _train_mean(run.reader, run.train_idx, 64, cfg.seed)
    run.mean = {l: m.to(device) for l, m in mean.items()}

    params = {l: list(run.stack.encoder(l).parameters()) for l in run.mine}
    run.stack.train()
    t_start = time.perf_counter()
    if run.state["step"] >= run.total_steps and (out / "summary.json").exists():
        # Finished by an earlier run: report its figures (wall time included), rewrite nothing.
        done = json.loads((out / "summary.json").read_text())
        distributed.barrier()
        return {**done, "skipped": True}
    wait, tokens_seen = _train(run, params, progress, on_step)
    return _finish_fit(run, t_start, wait, tokens_seen)


def _start_processes(cfg: FitConfig) -> tuple[torch.device, int, int]:
    """The device, and under a launcher the process group (one GPU per process on its node).
    -> (device, rank, world)."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = distributed.dist_env()
    if world > 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)  # one GPU per process on its node
        rank, world, local = distributed.init(backend="nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def _check_layers(cfg: FitConfig, cache: Cache, cache_path, world: int) -> list[int]:
    """Pre-flight check: the layers asked for (default: every cached one) are in the cache, and
    there are no more processes than layers. -> the layers."""
    layers = cfg.layers or cache.layers
    missing = [l for l in layers if l not in cache.layers]
    if missing:
        raise CacheError(f"{cache_path}: layer(s) {missing} not in this cache (it has {cache.layers})")
    if world > len(layers):
        raise CacheError(f"{world} processes for {len(layers)} layer(s): each process trains whole layers, "
                         f"so run at most {len(layers)}")
    return layers


def _prepare_run(cfg: FitConfig, out: Path, cache: Cache, cache_path, layers: list[int], rank: int, world: int,
                 device) -> _FitRun:
    """Seed, split the samples (refused unless both sides are non-empty), and build this process's
    reader, encoders (seeded per layer, so a process building only its layers gets the same
    weights), optimizer and schedule."""
    mine = layers_of_rank(layers, rank, world)  # all of them in one process
    autocast = autocast_for(device, cfg.compute)
    torch.manual_seed(cfg.seed)

    train_idx, val_idx = split_samples(cache, cfg.val_fraction, cfg.seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise CacheError(f"{cache_path}: need training and validation samples (have {len(train_idx)} / {len(val_idx)})")
    val_idx = val_idx[: cfg.val_max_samples]
    reader = CacheReader(cache, mine)
    emb = cache.embeddings().to(device)
    # Each encoder is seeded by (seed, layer): a process building only its layers gets the same weights.
    stack = EncoderStack(cfg.encoder_config(cache.hidden_size), mine, seed=cfg.seed).to(device)
    stack.sink = sink_of(cache.settings)
    opt = adamw(stack.parameters(), cfg)
    total_steps, warmup = schedule_steps(cfg, len(train_idx))
    run_id = {"cache": cache.fingerprint(), "config": cfg.run_config() | {"layers": layers}}
    return _FitRun(cfg, out, cache, layers, mine, rank, world, device, autocast, train_idx, val_idx, reader, emb,
                   stack, opt, total_steps, warmup, run_id)


def _resume_state(run: _FitRun) -> dict:
    """Resume logic: load this process's checkpoint into the encoders and optimizer (refused when
    it belongs to another run; under a launcher every process must be at the same step), or a
    fresh state."""
    out = run.out

    def load():
        st = load_checkpoint(out, run.stack, run.opt, where=run.ckpt_dir)
        if st and st.get("run") != json.loads(json.dumps(run.run_id)):
            raise CacheError(f"{out}/{CHECKPOINT_DIR}: a checkpoint of a different run (other cache or settings) is "
                             "there; use another --out or delete it")
        return st

    state = load() if run.world == 1 else _resume_together(load, checkpoint_dir(out), run.rank, run.world)
    return state or new_state(run.run_id)


def _train(run: _FitRun, params: dict, progress: bool, on_step) -> tuple[float, int]:
    """The training loop, from ``run.state`` (epoch, batch in epoch, step) to the last step, early
    stop or divergence: optimizer steps every ``grad_accum`` batches, evaluation every
    ``eval_every`` steps, a checkpoint every ``checkpoint_every``. -> (seconds waiting for data,
    tokens seen)."""
    cfg, state, mine = run.cfg, run.state, run.mine
    step, wait, tokens_seen = state["step"], 0.0, 0
    stop = step >= run.total_steps
    bar = tqdm(total=run.total_steps, initial=step, desc="fit", unit="step", disable=not (progress and run.main),
               dynamic_ncols=True)
    train_acc = {l: 0.0 for l in mine}
    n_acc = 0
    while not stop:
        epoch = state["epoch"]
        loader = BatchLoader(run.reader, run.train_idx, cfg.batch_size, cfg.buffer_samples, cfg.seed, epoch,
                             skip=state["batch_in_epoch"], length_groups=cfg.length_groups)
        micro = 0
        for bi, batch in enumerate(loader, start=state["batch_in_epoch"]):
            tokens_seen += _backward(run, batch, train_acc)
            n_acc += 1
            micro += 1
            if micro % cfg.grad_accum and bi + 1 < len(loader):
                continue
            lr = lr_at(step, run.total_steps, run.warmup, cfg.lr_min, cfg.lr_max)
            optimizer_step(run.opt, params, cfg.clip_norm, lr)
            step += 1
            state.update(step=step, batch_in_epoch=bi + 1)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == run.total_steps:
                stop = _evaluate_step(run, step, lr, {l: train_acc[l] / max(n_acc, 1) for l in mine}, bar)
                train_acc, n_acc = {l: 0.0 for l in mine}, 0
            if step % cfg.checkpoint_every == 0 or stop or step == run.total_steps:
                run.checkpoint()
            if on_step:
                on_step(step)
            if stop or step >= run.total_steps:
                stop = True
                break
        wait += loader.wait_seconds
        loader.close()
        if not stop:
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    return wait, tokens_seen


def _backward(run: _FitRun, batch: Batch, train_acc: dict[int, float]) -> int:
    """Forward and backward pass of one micro-batch (the summed per-layer losses, scaled by
    ``1 / grad_accum``); adds each layer's loss to ``train_acc``. -> the batch's valid tokens."""
    batch = batch.to(run.device)
    with run.autocast():
        preds = predict(run.stack, run.emb, batch)
        losses = {l: masked_mse(preds[l].float(), batch.targets[l], batch.loss_mask) for l in run.mine}
    (sum(losses.values()) / run.cfg.grad_accum).backward()
    tokens = int(batch.valid.sum())
    for l in run.mine:
        train_acc[l] += float(losses[l].detach())
    return tokens


def _evaluate_step(run: _FitRun, step: int, lr: float, train_mse: dict[int, float], bar) -> bool:
    """Evaluate, record the history entry, keep the best weights, and decide whether to stop
    (divergence or ``patience`` evaluations without improvement; the reason goes in the state)."""
    state = run.state
    res, total, train_mse = run.evaluate_now(train_mse)
    entry = {"step": step, "lr": lr, "train_mse": {str(l): train_mse[l] for l in run.layers},
             "val": {str(l): r for l, r in res.items()}, "val_total_mse": total}
    state["history"].append(entry)
    bar.set_postfix(val_fvu=" ".join(f"{r['fvu']:.3f}" for r in res.values()))
    if state["best"] is None or total < state["best"]:
        state.update(best=total, best_step=step, bad_evals=0)
        run.save_best(res)
    else:
        state["bad_evals"] += 1
    if not math.isfinite(total):
        state["stopped"] = "diverged (non-finite validation loss)"
        return True
    if state["bad_evals"] >= run.cfg.patience:
        state["stopped"] = f"early stop: no improvement in {run.cfg.patience} evaluations"
        return True
    return False


def _finish_fit(run: _FitRun, t_start: float, wait: float, tokens_seen: int) -> dict:
    """Final checkpoint and merge of the best parts, then the summary (the first process writes
    summary.json, curves.png and history.json); returns once ``out`` is complete on every process."""
    out, state, layers = run.out, run.state, run.layers
    state.setdefault("stopped", "finished all steps")
    run.checkpoint()
    if run.world > 1 and run.main and state["best_step"] is not None:
        # Again at the end: a crash between the parts and their merge must not leave out/ stale.
        _combine_parts(out, run.parts, layers, state["best_step"])
    summary = _summary(out, state, layers)
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["data_wait_seconds"] = wait
    summary["tokens_per_second"] = tokens_seen / max(summary["wall_seconds"], 1e-9)
    if run.main:  # the other processes hold the same state: they return the same summary, write nothing shared
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_history(state["history"], out / "curves.png", layers)
        (out / "history.json").write_text(json.dumps(state["history"], indent=1))
    distributed.barrier()  # out/ is complete when fit_encoders returns on any process
    return summary


def _bundle_meta(cache: Cache, cfg: FitConfig, state, res) -> dict:
    s = cache.settings
    return {
        "site": s["site"], "template": s["template"], "max_length": s["max_length"], "model": s["model"],
        "targets": targets_of(s), "sink": sink_of(s),
        "cache": cache.fingerprint(), "created": now(),
        "training": {"step": state["step"], "epoch": state["epoch"],
                     "config": {k: v for k, v in cfg.run_config().items() if k != "device"},
                     "val": {str(l): r for l, r in res.items()}},
    }


def _save_bundle(out: Path, stack, cache: Cache, cfg: FitConfig, layers, state, res):
    publish_bundle(out, stack, _bundle_meta(cache, cfg, state, res))  # in out/, beside the checkpoint


# Keys save_bundle derives from the stack; the rest of a bundle's config.json is its metadata.
_DERIVED_KEYS = ("format", "schema_version", "kcache_version", "encoder", "layers", "parameters_per_encoder")


def _combine_parts(out: Path, parts: list[Path], layers: list[int], best_step) -> None:
    """Merge the per-process best bundles (one per process, each holding its own layers) into
    the single bundle in ``out``, exactly as one process would have written it: same layers in
    the same order, same metadata (that of the first part, which every part shares but for
    ``created``)."""
    from safetensors.torch import load_file

    docs = [json.loads((p / CONFIG_FILE).read_text()) for p in parts]
    steps = {d["training"]["step"] for d in docs}
    if steps != {best_step}:
        raise CacheError(f"{parts[0].parent}: the processes' best bundles are from steps {sorted(steps)}, "
                         f"the run's best is step {best_step}; rerun to finish the run")
    stack = EncoderStack(EncoderConfig(**docs[0]["encoder"]), layers)
    weights = {}
    for p in parts:
        weights.update(load_file(str(p / WEIGHTS_FILE)))  # not load_bundle: a diverged first best may hold NaN
    stack.load_state_dict(weights)  # strict: every layer exactly once
    publish_bundle(out, stack, {k: v for k, v in docs[0].items() if k not in _DERIVED_KEYS})


def _summary(out: Path, state: dict, layers: list[int]) -> dict:
    """Final per-layer table: best validation FVU and whether the layer learned anything."""
    best = next((h for h in state["history"] if h["step"] == state["best_step"]), None)
    rows = {}
    for l in layers:
        r = best["val"][str(l)] if best else None
        first = state["history"][0]["val"][str(l)]["fvu"] if state["history"] else float("nan")
        fvu = r["fvu"] if r else float("nan")
        if not math.isfinite(fvu):
            verdict = "diverged"
        elif fvu >= 0.98 or fvu >= r["fvu_mean_baseline"]:
            verdict = "NOT CONVERGED (no better than predicting the mean delta)"
        else:
            verdict = "converged"
        rows[str(l)] = {"val_fvu": fvu, "val_mse": r["mse"] if r else None,
                        "fvu_mean_baseline": r["fvu_mean_baseline"] if r else None,
                        "fvu_zero_baseline": r["fvu_zero_baseline"] if r else None, "first_eval_fvu": first,
                        "verdict": verdict}
    return {"bundle": str(out), "best_step": state["best_step"], "steps": state["step"],
            "stopped": state.get("stopped"), "layers": rows}


def plot_history(history: list[dict], path: Path, layers: list[int]) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    for l in layers:
        a.plot(steps, [h["train_mse"][str(l)] for h in history], label=f"layer {l}")
        b.plot(steps, [h["val"][str(l)]["fvu"] for h in history], label=f"layer {l}")
    a.set(title="training MSE", xlabel="optimizer step", yscale="log")
    b.axhline(1.0, color="grey", ls="--", lw=1)
    b.set(title="validation FVU (1 = predict the mean delta)", xlabel="optimizer step")
    b.legend(fontsize=8)
    save_png(fig, path)


def summary_table(summary: dict) -> str:
    lines = ["| layer | val FVU | mean-delta baseline | zero baseline | verdict |", "|---|---|---|---|---|"]
    for l, r in summary["layers"].items():
        lines.append(f"| {l} | {r['val_fvu']:.4f} | {r['fvu_mean_baseline']:.4f} | "
                     f"{r['fvu_zero_baseline']:.4f} | {r['verdict']} |")
    return "\n".join(lines)
