"""Elastic extraction: any number of workers, started and stopped at will, fill one cache.

``kcache extract --elastic`` (``extract(..., elastic=ElasticConfig())``) cuts the length-ordered
batch plan into fixed **work units** whose boundaries depend on the samples and settings alone
(:func:`unit_ranges`), and each worker repeatedly claims a unit, extracts it into a private
directory, and commits it by renaming that directory into place. The same command works as one
process, as N torchrun ranks, as a SLURM array, or as independent processes on machines that
share a filesystem, and resumes with any number of workers. The parts and the manifest are
byte-identical whatever the number of workers and the history of interruptions (at equal torch
thread counts: docs/cache-format.md, "What is bit-identical to what").

On disk, inside ``OUT`` (docs/cache-format.md):

    elastic/settings.json            the job (schemas/cache-elastic-v1.json): the part attributes every
                                     unit shares and the unit plan; the first worker writes it, every
                                     later one must match it (else refused, naming each difference)
    elastic/leases/unit-KKKKK.lease  who is extracting unit K (kcache.lease); finalize.lease: who finalizes
    parts/unit-KKKKK.<owner>.tmp/    a worker's unit in progress: private, never written by anyone else
    parts/unit-KKKKK/                a committed unit (renamed into place complete: the commit)
    parts/unit-KKKKK.record.json     its digests, for the manifest (removed by finalize)
    manifest.json                    written once, by the worker that finds every unit committed

Correctness does not rest on the leases: a unit is committed by ``rename(2)`` of a complete
directory, which fails when the unit is already there, so of two workers that ever extract the
same unit (a lease wrongly judged stale) the first to finish wins and the other discards its
copy, which holds the same bytes anyway. Leases only keep workers from duplicating work. An
interrupted unit is redone from scratch (its private directory is dropped): at most one unit of
work per killed worker is lost, and no unit's files depend on its history. Finalizing removes
``elastic/`` (leases included) and every temporary, so the finalized cache is the manifest and
the parts only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from kcache import __version__
from kcache._io import read_json
from kcache.cache.format import MANIFEST, CacheError, encode_rows
from kcache.cache.integrity import finalize, write_part_record
from kcache.cache.reader import settings_differences
from kcache.cache.writer import create_cache
from kcache.data.samples import require_usable
from kcache.extract import (
    ExtractConfig,
    ExtractReport,
    Plan,
    _check_request,
    _counts,
    _extract_batches,
    _finalized_report,
    _initial_attrs,
    _mark_complete,
    _open_writer,
    _part_tables,
    _settings,
    batch_costs,
    make_plan,
    sub_plan,
)
from kcache.lease import Lease, Owner, acquire, host_hash, keep_alive, parse_tag, pid_alive, read_lease
from kcache.lock import OutputLocked, lock_path, output_lock, tmp_path
from kcache.models import Decoder
from kcache.schemas import SchemaError, validate_document

# Padded tokens (pass A + pass B) per unit. A 200k-sample LLaMA2-7B cache (~60-200 M padded tokens
# with knowledge of a few hundred tokens) makes a few hundred units of ~30 default batches each:
# enough to spread over many workers and to lose little to a kill, few enough that per-unit costs
# (a store's metadata, a digest record, a lease) stay negligible.
UNIT_TOKENS = 1 << 18
# parts/ holds one entry per unit once finalized (while running, up to two per unit plus one per
# worker): under the 10k entries per folder object stores and the Hub take (writer.OBJECT_STORE_FOLDER_LIMIT).
MAX_UNITS = 4096
STALE_SECONDS = 600.0
ELASTIC_DIR = "elastic"
RECORD = "settings.json"
LEASES = "leases"
FINALIZE = "finalize"
ELASTIC_FORMAT = "kcache-elastic"
ELASTIC_VERSION = 1
START = "start an elastic extraction in it"
FINALIZING = "finalize it"  # the words kcache.cache.integrity.finalize takes the output lock with
UNIT_DIR = re.compile(r"^unit-(\d{5})$")
UNIT_TMP = re.compile(r"^unit-(\d{5})\.(w_[0-9a-f]{8}_\d+_[0-9a-f]+)\.tmp$")


@dataclasses.dataclass
class ElasticConfig:
    """How elastic workers share an output. Only ``unit_tokens`` shapes the cache (the part layout);
    it is recorded, and every worker must ask for the same."""

    unit_tokens: int = UNIT_TOKENS  # padded tokens (both passes) per work unit
    stale_s: float = STALE_SECONDS  # a lease without a heartbeat for this long is taken over
    heartbeat_s: float | None = None  # default: stale_s / 10, at most 60 s
    poll_s: float | None = None  # every open unit leased: look again after this long (default stale_s / 300, 0.2-2 s)
    start_wait_s: float = 120.0  # how long to wait while another worker's brief start/finalize step holds the lock

    def heartbeat(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else min(60.0, max(0.05, self.stale_s / 10))

    def poll(self) -> float:
        # Short: waiting workers see the last unit committed (and a dead host's unit go stale) soon
        # after it happens; a look costs a stat per open unit and a read per lease, nothing more.
        return self.poll_s if self.poll_s is not None else min(2.0, max(0.2, self.stale_s / 300))


# ---------------------------------------------------------------------------------------------
# the unit plan (pure)


def unit_target(total_cost: int, unit_tokens: int, max_units: int = MAX_UNITS) -> int:
    """The cost per unit :func:`unit_ranges` cuts at: ``unit_tokens``, raised to
    ``ceil(total_cost / (max_units - 1))`` when it would make more than ``max_units`` units."""
    if unit_tokens < 1:
        raise CacheError(f"--unit-tokens must be >= 1, not {unit_tokens}")
    return max(int(unit_tokens), math.ceil(total_cost / max(1, max_units - 1)))


def unit_ranges(costs: list[int], target: int) -> list[tuple[int, int]]:
    """Cut the batches (in plan order) into contiguous work units ``[lo, hi)`` of batch indices.

    Convention: greedy in plan order; a unit takes batches until its cost (padded tokens of both
    passes, ``extract.batch_costs``) reaches ``target``, the batch that reaches it included. So every
    unit but the last costs at least ``target`` and less than ``target`` plus its last batch, there
    are at most ``total / target + 1`` units, and every unit has at least one batch. The cut depends
    on the costs and the target only: never on the number of workers.
    """
    out, lo, acc = [], 0, 0
    for i, c in enumerate(costs):
        acc += c
        if acc >= target:
            out.append((lo, i + 1))
            lo, acc = i + 1, 0
    if lo < len(costs):
        out.append((lo, len(costs)))
    return out


def plan_digest(order: list[int], units: list[tuple[int, int]], batches: list[list[int]]) -> str:
    """sha256 of the layout order (rows of the samples table) and of every unit's samples: two
    workers with equal digests cut the same samples into the same units."""
    h = hashlib.sha256(json.dumps(order).encode())
    for lo, hi in units:
        h.update(f"|{lo}:{hi}:{batches[lo][0]}:{batches[hi - 1][-1]}".encode())
    return "sha256:" + h.hexdigest()


def record_differences(have: dict, want: dict) -> list[str]:
    """'field: recorded vs this worker' for every difference between two elastic records (nested
    keys joined with '.'), leaving out the model's name and path: workers may load the same
    weights from different places (the fingerprint hashes are compared)."""
    return settings_differences(have, want, ignore=("name", "_name_or_path"))


def unit_name(k: int) -> str:
    return f"parts/unit-{k:05d}"


# ---------------------------------------------------------------------------------------------
# the job every worker builds alike


@dataclasses.dataclass
class _Job:
    root: Path
    decoder: Decoder
    cfg: ExtractConfig
    ecfg: ElasticConfig
    table: pa.Table
    ids_col: list
    layers: list[int]
    shard: int
    settings: dict
    plan: Plan
    units: list[tuple[int, int]]
    record: dict  # once the output is joined: as read back from elastic/settings.json

    @property
    def storage(self) -> dict | None:
        return self.settings.get("storage")

    def committed(self, k: int) -> bool:
        return (self.root / unit_name(k)).is_dir()

    def lease_path(self, unit: int | str) -> Path:
        name = f"unit-{unit:05d}" if isinstance(unit, int) else unit
        return self.root / ELASTIC_DIR / LEASES / f"{name}.lease"


def _plan_job(decoder: Decoder, samples, root: Path, cfg: ExtractConfig, ecfg: ElasticConfig) -> _Job:
    """Checks, the batch plan, the units and this worker's record (nothing written)."""
    table, layers, chunk, shard = _check_request(decoder, samples, root, cfg, 1)
    settings = _settings(decoder, cfg, layers, table, chunk, shard)
    plan = make_plan(decoder.tokenizer, table, cfg)
    require_usable(len(plan.encoded), table.num_rows, plan.skipped,
                   "samples" if isinstance(samples, pa.Table) else str(samples))
    costs = batch_costs(plan)
    target = unit_target(sum(costs), ecfg.unit_tokens)
    units = unit_ranges(costs, target)
    attrs = _initial_attrs(decoder, settings, {}, cfg, plan)
    for key in ("status", "created", "finished", "counts", "stats"):  # per unit, or (times) nowhere
        attrs.pop(key)
    attrs["extraction"].pop("batches")
    # The device's kind, not its index: cuda:0 and cuda:3 compute alike, and parts must not differ by rank.
    attrs["extraction"]["device"] = decoder.device.type
    record = {"format": ELASTIC_FORMAT, "schema_version": ELASTIC_VERSION, "kcache_version": __version__,
              "attrs": attrs,
              "units": {"unit_tokens": int(ecfg.unit_tokens), "unit_cost": target, "count": len(units),
                        "batches": len(plan.batches), "samples": len(plan.encoded),
                        "plan": plan_digest(plan.order, units, plan.batches)}}
    record = json.loads(json.dumps(record))  # as it reads back from disk
    return _Job(root, decoder, cfg, ecfg, table, table["id"].to_pylist(), layers, shard, settings, plan, units, record)


# ---------------------------------------------------------------------------------------------
# joining an output


@contextlib.contextmanager
def _locked(root: Path, what: str, wait_s: float):
    """The output lock (kcache.lock) for a brief step. Another elastic worker's start or finalize
    step holds it only briefly: wait for it (up to ``wait_s``); anyone else (a plain ``kcache
    extract`` writing ``root``) is refused at once, naming that process."""
    stack = contextlib.ExitStack()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stack.enter_context(output_lock(root, what))
            break
        except OutputLocked:
            try:
                holder = json.loads(lock_path(root).read_text() or "{}")
            except (OSError, ValueError):
                holder = {}  # being written: its holder just took it
            if holder.get("what") not in (START, FINALIZING, None) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with stack:
        yield


def _check_out(root: Path) -> None:
    """Refuse an output that holds anything but an elastic extraction (or nothing yet)."""
    if (root / ELASTIC_DIR / RECORD).exists():
        return
    if (root / "zarr.json").exists():
        raise CacheError(f"{root} holds a single-process cache (zarr.json); an elastic extraction needs another --out")
    parts = root / "parts"
    names = [p.name for p in parts.iterdir()] if parts.is_dir() else []
    if any(UNIT_DIR.match(n) for n in names):
        raise CacheError(f"{root}: committed units but no {ELASTIC_DIR}/{RECORD} (deleted?); their settings are "
                         "unknown, so it cannot be resumed: use another --out")
    if any(not UNIT_TMP.match(n) for n in names):  # an elastic worker's private unit directory is no obstacle
        raise CacheError(f"{root} holds a distributed extraction by ranks ({parts}); resume it with the same number of "
                         "ranks and without --elastic, or use another --out")
    others = sorted(p.name for p in root.iterdir() if p.name not in (ELASTIC_DIR, "parts")) if root.is_dir() else []
    if others:
        raise CacheError(f"{root} exists and is not an elastic extraction (holds {', '.join(others[:3])}); "
                         "choose another --out")


def _open_record(root: Path, record: dict) -> dict:
    """Create ``elastic/settings.json`` (first worker) or check this worker's record against it.

    Created under a temporary name and linked into place: ``link(2)`` fails when the record exists,
    so of workers on several machines exactly one creates it, and nobody ever reads half of it.
    Returns the record as read back (every worker builds parts from the very same document).
    """
    path = root / ELASTIC_DIR / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = tmp_path(path)
        try:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    have = read_json(path, CacheError)
    try:
        validate_document(have, "cache-elastic-v1", str(path))
    except SchemaError as e:
        raise CacheError(str(e)) from None
    diffs = record_differences(have, record)
    if diffs:
        raise CacheError(f"{root} is being extracted elastically with other settings ({path}, recorded vs this "
                         f"worker: {'; '.join(diffs)}); run every worker with the same model, samples, settings, "
                         "--token-budget, --unit-tokens, torch and thread count, or use another --out")
    return have


def refuse_if_elastic(root: Path) -> None:
    """Refuse a plain (non-elastic) extraction into an output that elastic workers fill."""
    parts = root / "parts"
    units = parts.is_dir() and any(UNIT_DIR.match(p.name) or UNIT_TMP.match(p.name) for p in parts.iterdir())
    if (root / ELASTIC_DIR / RECORD).exists() or units:
        raise CacheError(f"{root} holds an elastic extraction ({root / ELASTIC_DIR / RECORD}); join it with "
                         "`kcache extract --elastic` and the same settings (any number of workers), or choose another "
                         "--out")


# ---------------------------------------------------------------------------------------------
# units


def _claim(job: _Job, owner: Owner, done: set[int]) -> tuple[int | None, Lease | None, str | None]:
    """The first unit neither committed nor held by a live lease, claimed: (unit, lease, the stale
    holder's story when it was taken over). (None, None, None) when there is none to claim now;
    ``done`` collects the units seen committed."""
    for k in range(len(job.units)):
        if k in done:
            continue
        if job.committed(k):
            done.add(k)
            continue
        lease, note = acquire(job.lease_path(k), owner, k, job.ecfg.stale_s)
        if lease is None:
            continue
        if not lease.held():  # lost at once to a racing takeover (kcache.lease): the other worker has it
            lease.release()
            continue
        if job.committed(k):  # committed (and its lease released) between our look and our claim
            lease.release()
            done.add(k)
            continue
        return k, lease, note
    return None, None, None


def _unit_attrs(job: _Job, k: int, counts: dict) -> dict:
    """The zarr attributes of unit ``k``: the recorded template plus the unit's own counts. No times,
    hosts or ranks: a unit's bytes depend on the job alone."""
    t, (lo, hi) = job.record["attrs"], job.units[k]
    attrs = {"format": t["format"], "schema_version": t["schema_version"], "kcache_version": t["kcache_version"],
             "status": "extracting", "settings": t["settings"], "model_config": t["model_config"],
             "hidden_size": t["hidden_size"], "vocab_size": t["vocab_size"], "num_model_layers": t["num_model_layers"],
             "extraction": {**t["extraction"], "batches": hi - lo,
                            "unit": {"index": k, "count": len(job.units), "batches": [lo, hi],
                                     "unit_cost": job.record["units"]["unit_cost"]}},
             "counts": counts, "stats": {}}
    if k > 0:
        attrs["has_embeddings"] = False  # stored once, in unit 0 (262 MB for LLaMA2-7B: not per unit)
    return copy.deepcopy(attrs)


def _write_unit(job: _Job, k: int, out: Path) -> float:
    """Extract unit ``k`` into the private directory ``out``, complete; returns the forward seconds."""
    lo, hi = job.units[k]
    sub = sub_plan(job.plan, lo, hi, keep_skipped=k == 0)  # skipped samples are listed once, in unit 0
    total = int(sub.row_offsets[-1])
    counts, _ = _counts(sub, total)
    attrs = _unit_attrs(job, k, counts)
    tables = _part_tables(job.decoder, job.table, job.ids_col, job.cfg, sub)
    attrs["counts"]["loss_tokens"] = int(tables[4].sum())
    emb = None
    if k == 0:
        emb = encode_rows(job.decoder.layers.embed_tokens().weight.detach().float(), job.cfg.dtype, "embedding matrix")
    group = create_cache(out, attrs, *tables, emb)
    writer, stats, errors = _open_writer(out, group, job.layers, job.cfg, job.shard, total, 0, sub.x_lens, job.storage,
                                         job.decoder.device)
    fwd = _extract_batches(job.decoder, sub, job.cfg, job.layers, job.ids_col, writer, job.storage, 0, False)
    _mark_complete(out, group, attrs, stats, errors, sub)
    return fwd


def _commit(job: _Job, k: int, tmp: Path, lease: Lease | None = None) -> bool:
    """Rename the complete unit into place; False when another worker committed it first (its
    bytes equal ours: same batches, same job), or when ``lease`` was lost meanwhile (its taker may
    have judged us dead and removed files of ``tmp`` while we wrote: our copy is not trusted, the
    caller discards it). Then its digest record, for the manifest."""
    if lease is not None and not lease.held():
        return False
    try:
        os.rename(tmp, job.root / unit_name(k))
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    write_part_record(job.root, unit_name(k))
    return True


def _drop_dead_temporaries(parts: Path, k: int | None, owner: Owner) -> None:
    """Delete private unit directories (of unit ``k``, or all) left by dead workers of this host.

    Only this host (same host name and PID namespace: the owner tag's host hash covers both) can tell
    a dead pid; another host's or container's leftovers wait for finalize."""
    mine = host_hash(owner.host, owner.node)
    for p in parts.iterdir() if parts.is_dir() else ():
        m = UNIT_TMP.match(p.name)
        if not m or (k is not None and int(m[1]) != k):
            continue
        who = parse_tag(m[2])
        if who and who[0] == mine and who[1] != owner.pid and not pid_alive({"pid": who[1]}):
            shutil.rmtree(p, ignore_errors=True)


def _run_unit(job: _Job, k: int, owner: Owner, lease: Lease | None = None) -> tuple[bool, float]:
    """Extract and commit unit ``k`` (from scratch) while holding ``lease``; (committed by us, forward seconds)."""
    parts = job.root / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    _drop_dead_temporaries(parts, k, owner)
    tmp = parts / f"unit-{k:05d}.{owner.tag}.tmp"
    try:
        fwd = _write_unit(job, k, tmp)
        return _commit(job, k, tmp, lease), fwd
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the worker


def _work(job: _Job, owner: Owner, progress: bool) -> dict:
    """Claim and extract units until every unit is committed. While every open unit is leased by a
    live worker, look again every ``poll`` seconds: a worker that dies is then taken over from."""
    n, done = len(job.units), set()
    out = {"mine": [], "taken_over": 0, "forward": 0.0}
    bar = tqdm(total=n, unit="unit", desc="extract (units)", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            k, lease, note = _claim(job, owner, done)
            bar.update(len(done) - bar.n)
            if lease is None:
                if len(done) == n:
                    return out
                bar.set_postfix_str(f"waiting: {n - len(done)} unit(s) held by other workers")
                time.sleep(job.ecfg.poll())
                continue
            out["taken_over"] += note is not None
            try:
                with keep_alive(lease, job.ecfg.heartbeat()):
                    committed, fwd = _run_unit(job, k, owner, lease)
            finally:
                lease.release()
            out["forward"] += fwd
            if committed:
                out["mine"].append(k)
            if job.committed(k):  # not when our lease was lost before the commit: its taker commits it
                done.add(k)
    finally:
        bar.close()


def _drop_coordination(root: Path) -> None:
    """Remove what only a running extraction needs: the record, the leases and unit temporaries."""
    shutil.rmtree(root / ELASTIC_DIR, ignore_errors=True)


def _finish_job(job: _Job, owner: Owner) -> str:
    """Write the manifest if no other worker does: under the finalize lease and the output lock,
    exactly once however many workers find every unit committed at the same moment.

    While another worker holds the finalize lease, wait (looking every ``poll`` seconds) until the
    manifest appears or that lease goes stale and is taken over: a finalizer that dies (on another
    host, where its pid cannot be tested) is then completed by a survivor."""
    while True:
        if (job.root / MANIFEST).exists() and not (job.root / ELASTIC_DIR).exists():
            return "complete (finalized by another worker)"
        lease, _ = acquire(job.lease_path(FINALIZE), owner, FINALIZE, job.ecfg.stale_s)
        if lease is not None:
            break
        time.sleep(job.ecfg.poll())
    try:
        with keep_alive(lease, job.ecfg.heartbeat()), _locked(job.root, FINALIZING, job.ecfg.start_wait_s):
            if (job.root / MANIFEST).exists():
                _drop_coordination(job.root)
                return "complete (finalized by another worker)"
            parts = job.root / "parts"
            for p in parts.iterdir():  # losers' and dead workers' copies, stray temporary records
                if not (UNIT_TMP.match(p.name) or p.name.endswith(".tmp")):
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            u = job.record["units"]
            # Nothing time-, host- or worker-dependent: the manifest's bytes are the cache's identity.
            provenance = {"extracted": {"mode": "elastic", "units": u["count"], "unit_tokens": u["unit_tokens"],
                                        "kcache_version": __version__}}
            finalize(job.root, [unit_name(k) for k in range(len(job.units))], provenance=provenance, reproducible=True)
            _drop_coordination(job.root)
            return "complete"
    finally:
        lease.release()


def extract_elastic(decoder: Decoder, samples, out, cfg: ExtractConfig | None = None,
                    ecfg: ElasticConfig | None = None, overwrite: bool = False, progress: bool = True) -> ExtractReport:
    """One worker of an elastic extraction of ``samples`` into ``out`` (see the module docstring).

    Returns when every unit is committed; the worker that then finds the manifest missing writes
    it. Refuses an output extracted with other settings (naming each difference), a plain cache,
    a distributed-by-ranks one, and ``overwrite`` (other workers may be writing).
    """
    cfg, ecfg = cfg or ExtractConfig(), ecfg or ElasticConfig()
    t0 = time.perf_counter()
    root = Path(out)
    if overwrite:
        raise CacheError(f"--overwrite cannot be combined with --elastic: other workers may be writing {root}; "
                         "delete it yourself once no worker runs")
    job = _plan_job(decoder, samples, root, cfg, ecfg)
    report = _finalized_report(root, job.settings, False)
    if report is None:
        with _locked(root, START, ecfg.start_wait_s):
            report = _finalized_report(root, job.settings, False)  # finalized while we planned
            if report is None:
                _check_out(root)
                job.record = _open_record(root, job.record)
    if report is not None:
        if (root / ELASTIC_DIR).exists():  # a finalizer killed after writing the manifest
            with _locked(root, FINALIZING, ecfg.start_wait_s):
                _drop_coordination(root)
        return report
    with Owner.new() as owner:
        done = _work(job, owner, progress)
        status = _finish_job(job, owner)
    p = job.plan
    counts, reasons = _counts(p, int(p.row_offsets[-1]))
    note = (f"elastic: this worker ({owner.id}) extracted {len(done['mine'])} of {len(job.units)} units"
            + (f" ({', '.join(map(str, done['mine'][:20]))}{', ...' if len(done['mine']) > 20 else ''})"
               if done["mine"] else "")
            + (f"; took over {done['taken_over']} from stale leases" if done["taken_over"] else ""))
    return ExtractReport(root, counts["samples"], counts["skipped"], dict(reasons), counts["truncated"],
                         counts["input_tokens"], time.perf_counter() - t0, done["forward"], 0, status, [note])


# ---------------------------------------------------------------------------------------------
# looking at a running extraction


def elastic_progress(root: str | os.PathLike) -> dict | None:
    """Where an unfinished elastic extraction at ``root`` stands (None when it is not one):
    ``{"units", "committed", "leases": [{unit, owner, heartbeat_age_s}], "record"}``."""
    root = Path(root)
    rec_path = root / ELASTIC_DIR / RECORD
    if not rec_path.exists() or (root / MANIFEST).exists():
        return None
    record = read_json(rec_path, CacheError)
    n = int(record["units"]["count"])
    committed = sum((root / unit_name(k)).is_dir() for k in range(n))
    leases = []
    for p in sorted((root / ELASTIC_DIR / LEASES).glob("*.lease")):
        doc = read_lease(p)
        if doc is not None:
            leases.append({"unit": doc.get("unit"), "owner": doc.get("owner", "?"),
                           "heartbeat_age_s": round(time.time() - float(doc.get("heartbeat", 0)), 1)})
    return {"units": n, "committed": committed, "leases": leases, "record": record}
