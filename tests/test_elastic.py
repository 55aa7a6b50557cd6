"""Elastic extraction (issue 15): fixed work units, leases, any number of workers, the same bytes.

Every cache here is compared file by file (sha256 of every file, the manifest included) with one
reference: a single in-process worker. Workers in other processes run ``kcache extract --elastic``
through a small wrapper (``WORKER``) that can hold them at a start gate (so they really compete
for units), slow each batch down, or hang one inside a unit so that it can be killed there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env
from typer.testing import CliRunner

from kcache.cache import Cache, CacheError, merge, validate_cache
from kcache.data.samples import write_samples
from kcache.data.synth import synth_samples
from kcache.elastic import (
    ELASTIC_DIR,
    ElasticConfig,
    _commit,
    _drop_dead_temporaries,
    elastic_progress,
    record_differences,
    unit_name,
    unit_ranges,
    unit_target,
)
from kcache.extract import ExtractConfig, extract
from kcache.lease import (
    LOST_BEATS,
    Lease,
    Owner,
    _encode,
    acquire,
    host_hash,
    keep_alive,
    lease_doc,
    local_node,
    read_lease,
    stale_reason,
    take_over,
)

SMALL = dict(layers="1-2", chunk_rows=32, shard_rows=64, token_budget=96)
UNIT = 500  # padded tokens per unit: the 36 samples below make 10 units of 3-4 batches
CLI = ["--layers", "1-2", "--token-budget", "96", "--chunk-rows", "32", "--shard-rows", "64", "--model-dtype",
       "float32", "--elastic", "--unit-tokens", str(UNIT)]

# `kcache …` with test hooks from the environment: KCACHE_TEST_GATE (import the heavy modules, create
# GATE.<pid>.ready, wait for GATE), KCACHE_TEST_BATCH_SLEEP (seconds added to every batch),
# KCACHE_TEST_HANG_AT (hang inside the Nth batch of this process, after creating KCACHE_TEST_HANG_FILE).
WORKER = r"""
import os, runpy, sys, time
gate = os.environ.get("KCACHE_TEST_GATE")
if gate:
    import torch, transformers, kcache.elastic  # noqa: F401 - the slow imports come before the gate
    open(f"{gate}.{os.getpid()}.ready", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.02)
import kcache.extract as ex
orig, calls = ex.batch_deltas, [0]
hang, pause = int(os.environ.get("KCACHE_TEST_HANG_AT", "0")), float(os.environ.get("KCACHE_TEST_BATCH_SLEEP", "0"))
def hooked(*a, **k):
    calls[0] += 1
    if calls[0] == hang:
        open(os.environ["KCACHE_TEST_HANG_FILE"], "w").close()
        while True:
            time.sleep(60)
    time.sleep(pause)
    return orig(*a, **k)
ex.batch_deltas = hooked
sys.argv = ["kcache", *sys.argv[1:]]
runpy.run_module("kcache", run_name="__main__")
"""


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("home")
        mp.setenv("KCACHE_HOME", str(d))
        yield d


@pytest.fixture(scope="module")
def env(home):
    return cli_env(home)


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("samples") / "s.parquet"
    write_samples(synth_samples(36, seed=5), p)
    return p


@pytest.fixture(scope="module")
def decoder(model_dir, home):
    from kcache.models import load_decoder

    return load_decoder(str(model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, decoder, samples_file):
    """One in-process worker: the cache every other way of running must reproduce byte for byte."""
    torch.set_num_threads(1)  # what the CLI workers run with (OMP_NUM_THREADS=1), whatever ran before
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    rep = extract(decoder, samples_file, out, ExtractConfig(**SMALL), elastic=ElasticConfig(unit_tokens=UNIT),
                  progress=False)
    assert rep.status == "complete" and "extracted 10 of 10 units" in rep.notes[0]
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> its sha256."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _same_bytes(a: Path, b: Path) -> None:
    sa, sb = _snapshot(a), _snapshot(b)
    assert sorted(sa) == sorted(sb), sorted(set(sa) ^ set(sb))[:10]
    assert [k for k in sa if sa[k] != sb[k]] == []
    assert [p.name for p in b.parent.iterdir() if p.name.startswith(b.name + ".")] == []  # no lock or temporary


def _worker(env, model_dir, samples, out, logs: Path, gate=None, hang_at=0, batch_sleep=0.0, extra=()):
    e = {**env, "KCACHE_TEST_GATE": str(gate or ""), "KCACHE_TEST_HANG_AT": str(hang_at),
         "KCACHE_TEST_HANG_FILE": f"{logs}.hung", "KCACHE_TEST_BATCH_SLEEP": str(batch_sleep)}
    if not gate:
        e.pop("KCACHE_TEST_GATE")
    args = ["extract", "--model", str(model_dir), "--samples", str(samples), "--out", str(out), *CLI, *extra]
    with open(f"{logs}.out", "w") as so, open(f"{logs}.err", "w") as se:
        return subprocess.Popen([sys.executable, "-c", WORKER, *args], env=e, stdout=so, stderr=se)


def _open_gate(gate: Path, procs, timeout: float = 240) -> None:
    """Wait until every worker imported everything, then let them all go at once."""
    end = time.monotonic() + timeout
    while len(list(gate.parent.glob(f"{gate.name}.*.ready"))) < len(procs):
        assert all(p.poll() is None for p in procs), "a worker ended before the gate"
        assert time.monotonic() < end, "workers did not reach the gate"
        time.sleep(0.05)
    gate.touch()


def _finish(procs, logs, timeout: float = 300) -> list[str]:
    outs = []
    for p, log in zip(procs, logs):
        p.wait(timeout=timeout)
        out, err = Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _units_done(stdout: str) -> int:
    """Units a worker committed (0 for a worker that found the cache already complete)."""
    line = next((l for l in stdout.splitlines() if "elastic: this worker" in l), " extracted 0 of ")
    return int(line.split(" extracted ")[1].split(" of ")[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_pid() -> int:
    """A pid no process can have (above the kernel's pid_max)."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def _write_lease(path: Path, host: str, pid: int, heartbeat: float, unit, owner: str = "someone/1/0",
                 node: str | None = None) -> None:
    """A lease written by hand, as another worker would have left it (of this node when on this host,
    unless ``node`` says otherwise; ``node=""`` writes none, as older kcache did)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": "kcache-lease", "owner": owner, "host": host, "pid": pid, "started": heartbeat - 5,
           "heartbeat": heartbeat, "unit": unit}
    node = (local_node() if host == socket.gethostname() else "") if node is None else node
    if node:
        doc["node"] = node
    path.write_bytes(_encode(doc))


# ---------------------------------------------------------------------------------------------
# pure logic


def test_unit_ranges_are_contiguous_cover_everything_and_reach_the_target():
    costs = [5, 5, 5, 5, 40, 40, 1, 1, 1, 3]
    for target in (1, 9, 10, 41, 80, 1000):
        units = unit_ranges(costs, target)
        assert units[0][0] == 0 and units[-1][1] == len(costs)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(units, units[1:]))
        for lo, hi in units[:-1]:
            cost = sum(costs[lo:hi])
            assert target <= cost < target + costs[hi - 1]  # the batch that reaches the target closes the unit
    assert unit_ranges(costs, 10) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 10)]
    assert unit_ranges(costs, 10 ** 6) == [(0, len(costs))]
    assert unit_ranges(costs, 1) == [(i, i + 1) for i in range(len(costs))]


def test_unit_target_caps_the_number_of_units():
    assert unit_target(10_000, 500) == 500
    assert unit_target(10 ** 9, 1 << 18) == 1 << 18  # ~3800 units: under the cap
    assert unit_target(10 ** 10, 1 << 18, max_units=4096) == -(-10 ** 10 // 4095)
    units = unit_ranges([7] * 100_000, unit_target(700_000, 1, max_units=50))
    assert len(units) <= 50
    with pytest.raises(CacheError, match="unit-tokens"):
        unit_target(100, 0)


def test_stale_reason_convention():
    me = "here"
    now = 10_000.0

    def alive(lease):
        return lease["pid"] == 42

    node = "pidns:4026531836;boot:b"
    fresh = {"host": me, "node": node, "pid": 42, "heartbeat": now - 5}
    assert stale_reason(fresh, now, 600, me, alive, node) is None
    assert "is gone" in stale_reason({**fresh, "pid": 7}, now, 600, me, alive, node)  # dead on this host: at once
    other = {"host": "elsewhere", "pid": 7, "heartbeat": now - 599}
    assert stale_reason(other, now, 600, me, alive) is None  # another host's pid says nothing here
    # Same host name, another PID namespace (docker --net=host, k8s hostNetwork) or boot, or a lease
    # without a node (older kcache): its pid says nothing here either; only its heartbeat counts.
    for there in ({**fresh, "pid": 7, "node": "pidns:4026532999;boot:b"}, {**fresh, "pid": 7, "node": "pidns:1;boot:c"},
                  {k: v for k, v in {**fresh, "pid": 7}.items() if k != "node"}):
        assert stale_reason(there, now, 600, me, alive, node) is None, there
        assert "no heartbeat" in stale_reason({**there, "heartbeat": now - 601}, now, 600, me, alive, node)
    assert "no heartbeat for 601 s" in stale_reason({**other, "heartbeat": now - 601}, now, 600, me, alive)
    assert stale_reason({**other, "heartbeat": now + 3600}, now, 600, me, alive) is None  # clock ahead: fresh
    assert stale_reason({"heartbeat": now - 700, "unreadable": True}, now, 600, me, alive)  # by its mtime


def test_record_differences_name_the_field_and_ignore_where_the_model_lives():
    a = {"attrs": {"settings": {"layers": [1, 2], "model": {"name": "/a/m", "weights_hash": "x"}},
                   "model_config": {"_name_or_path": "/a/m"}, "extraction": {"threads": 1}}, "units": {"count": 10}}
    b = json.loads(json.dumps(a))
    b["attrs"]["settings"]["model"]["name"] = "/b/m"
    b["attrs"]["model_config"]["_name_or_path"] = "/b/m"
    assert record_differences(a, b) == []
    b["attrs"]["settings"]["layers"] = [1, 2, 3]
    b["attrs"]["extraction"]["threads"] = 4
    assert record_differences(a, b) == ["attrs.extraction.threads: 1 vs 4",
                                        "attrs.settings.layers: [1, 2] vs [1, 2, 3]"]


# ---------------------------------------------------------------------------------------------
# leases


def test_a_lease_is_exclusive_refreshed_in_place_and_released(tmp_path):
    path = tmp_path / "leases" / "unit-00000.lease"
    with Owner.new() as a, Owner.new() as b:
        la = Lease.create(path, a, 0)
        assert la is not None and Lease.create(path, b, 0) is None
        doc = read_lease(path)
        assert doc == lease_doc(a, 0, doc["started"], doc["heartbeat"]) and doc["host"] == socket.gethostname()
        assert len(path.read_bytes()) == 1024
        ino = path.stat().st_ino
        assert la.beat(now=doc["heartbeat"] + 30) and read_lease(path)["heartbeat"] == doc["heartbeat"] + 30
        assert path.stat().st_ino == ino  # in place: the same file
        lb, why = acquire(path, b, 0, stale_s=600)
        assert lb is None and a.id in why  # live: not taken
        la.release()
        assert not path.exists() and not la.held()
        lb, why = acquire(path, b, 0, stale_s=600)
        assert lb is not None and why is None and lb.held()
        lb.release()


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(tmp_path):
    host, now = socket.gethostname(), time.time()
    cases = {
        "dead pid here": (host, _dead_pid(), now, "is gone"),
        "old heartbeat elsewhere": ("elsewhere", 1, now - 700, "no heartbeat for 700 s"),
        "earlier call of this process": (host, os.getpid(), now, "is gone"),  # its owner is not working any more
    }
    with Owner.new() as me:
        for name, (h, pid, beat, why) in cases.items():
            path = tmp_path / f"{name}.lease"
            _write_lease(path, h, pid, beat, 0)
            lease, note = acquire(path, me, 0, stale_s=600)
            assert lease is not None and why in note, name
            assert read_lease(path)["owner"] == me.id and lease.held()
            assert not list(tmp_path.glob(f"{name}.lease.taken.*"))  # the tombstone is gone
            lease.release()
        for name, (h, pid, beat) in {"live pid here": (host, os.getppid(), now),
                                     "fresh heartbeat elsewhere": ("elsewhere", 1, now - 30)}.items():
            path = tmp_path / f"{name}.lease"
            _write_lease(path, h, pid, beat, 0)
            before = path.read_bytes()
            lease, who = acquire(path, me, 0, stale_s=600)
            assert lease is None and "someone/1/0" in who, name
            assert path.read_bytes() == before


def test_a_pid_of_another_pid_namespace_with_our_host_name_is_not_judged(tmp_path):
    """Containers sharing a host name but not a PID namespace: the other's pid is not ours to test.
    Its lease is respected while it heartbeats, and its private unit directory is left alone."""
    host, now, there = socket.gethostname(), time.time(), "pidns:1;boot:another"
    path = tmp_path / "leases" / "unit-00000.lease"
    _write_lease(path, host, _dead_pid(), now, 0, node=there)
    with Owner.new() as me:
        assert me.node == local_node() and read_lease(path)["node"] == there
        lease, who = acquire(path, me, 0, stale_s=600)
        assert lease is None and "someone/1/0" in who
        _write_lease(path, host, _dead_pid(), now - 700, 0, node="")  # an older kcache's lease: heartbeat only
        lease, why = acquire(path, me, 0, stale_s=600)
        assert lease is not None and "no heartbeat for 700 s" in why
        assert read_lease(path)["node"] == me.node
        lease.release()
        parts = tmp_path / "parts"
        theirs = parts / f"unit-00000.w_{host_hash(host, there)}_{_dead_pid()}_aa.tmp"
        dead_here = parts / f"unit-00000.w_{host_hash(host, me.node)}_{_dead_pid()}_bb.tmp"
        for d in (theirs, dead_here):
            d.mkdir(parents=True)
        _drop_dead_temporaries(parts, 0, me)
        assert theirs.is_dir() and not dead_here.exists()


def test_a_unit_is_not_committed_by_a_worker_that_lost_its_lease(tmp_path):
    root = tmp_path / "c.zarr"
    tmp = root / "parts" / "unit-00000.w_x.tmp"
    tmp.mkdir(parents=True)
    job = types.SimpleNamespace(root=root)
    path = root / ELASTIC_DIR / "leases" / "unit-00000.lease"
    with Owner.new() as a, Owner.new() as b:
        mine = Lease.create(path, a, 0)
        path.unlink()  # taken over meanwhile: another worker's lease names the path now
        theirs = Lease.create(path, b, 0)
        assert not _commit(job, 0, tmp, mine)
        assert not (root / unit_name(0)).exists() and tmp.is_dir()  # the caller (_run_unit) drops it
        mine.release()
        theirs.release()


def test_the_heartbeat_outlives_a_missed_beat_and_stops_once_the_loss_is_confirmed():
    class Fake:
        closed = False

        def __init__(self, answers):
            self.answers, self.calls = answers, 0

        def beat(self):
            self.calls += 1
            return self.answers(self.calls)

    # The path briefly empty (a takeover's rename-aside, then the live lease put back): beats go on.
    blip = Fake(lambda n: n != 1)
    with keep_alive(blip, 0.005):
        end = time.monotonic() + 30
        while blip.calls < LOST_BEATS + 3 and time.monotonic() < end:
            time.sleep(0.01)
    assert blip.calls >= LOST_BEATS + 3
    # Lost for good: the thread stops after LOST_BEATS consecutive misses.
    gone = Fake(lambda n: False)
    with keep_alive(gone, 0.005):
        time.sleep(0.3)
    assert gone.calls == LOST_BEATS


def test_a_dead_finalizer_elsewhere_is_waited_for_then_taken_over(tmp_path, monkeypatch):
    """Every unit committed, the finalize lease held by a worker on another host that died: a survivor
    waits until that lease goes stale, takes it over and writes the manifest (never 'complete' with
    no manifest). A live finalizer that writes it meanwhile is waited for too."""
    import kcache.elastic as el

    def fake_finalize(root, parts, **kw):
        (Path(root) / "manifest.json").write_text("{}")

    monkeypatch.setattr(el, "finalize", fake_finalize)
    for name, stale_s in (("dead", 1.0), ("live", 600.0)):
        root = tmp_path / f"{name}.zarr"
        (root / "parts").mkdir(parents=True)
        job = el._Job(root, None, None, ElasticConfig(stale_s=stale_s, poll_s=0.05), None, None, [], 0, {}, None,
                      [(0, 1)], {"units": {"count": 1, "unit_tokens": UNIT}})
        _write_lease(job.lease_path("finalize"), "elsewhere", 1, time.time(), "finalize")
        if name == "live":  # the holder finishes: manifest written, coordination dropped
            def finish(root=root):
                time.sleep(0.3)
                (root / "manifest.json").write_text("{}")
                shutil.rmtree(root / ELASTIC_DIR)
            threading.Thread(target=finish).start()
        with Owner.new() as me:
            status = el._finish_job(job, me)
        assert (root / "manifest.json").exists() and not (root / ELASTIC_DIR).exists(), name
        assert status == ("complete" if name == "dead" else "complete (finalized by another worker)"), name


def test_two_stealers_cannot_both_win(tmp_path):
    path = tmp_path / "unit-00003.lease"
    _write_lease(path, socket.gethostname(), _dead_pid(), time.time(), 3)
    # Concurrently: of eight workers judging the same dead lease, exactly one holds it once all are done.
    start, settled, got, held = threading.Barrier(8), threading.Barrier(8), [], []

    def steal():
        with Owner.new() as o:  # alive (working) until every thread has looked
            start.wait()
            lease, _ = acquire(path, o, 3, stale_s=600)
            got.append(lease)
            settled.wait()
            held.append(lease is not None and lease.held())
            settled.wait()
            if lease:
                lease.release()

    threads = [threading.Thread(target=steal) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(held) == 8 and sum(held) == 1
    assert sum(lease is not None for lease in got) >= 1
    # In sequence: a stealer that judged the old lease stale but renames the winner's fresh one
    # gets nothing and puts it back, same inode: the winner never notices.
    _write_lease(path, socket.gethostname(), _dead_pid(), time.time(), 3)
    with Owner.new() as a, Owner.new() as b:
        won = take_over(path, a, 3, stale_s=600)
        assert won is not None
        assert take_over(path, b, 3, stale_s=600) is None
        assert won.held() and read_lease(path)["owner"] == a.id
        assert sorted(p.name for p in tmp_path.iterdir()) == ["unit-00003.lease"]
        won.release()


# ---------------------------------------------------------------------------------------------
# one worker, in this process


def test_one_worker_gives_the_single_process_values_in_a_reproducible_cache(reference, decoder, samples_file, tmp_path):
    single = tmp_path / "single.zarr"
    extract(decoder, samples_file, single, ExtractConfig(**SMALL), progress=False)
    a, b = Cache.open(single), Cache.open(reference)
    assert [p["path"] for p in b.manifest["parts"]] == [unit_name(k) for k in range(10)]
    assert a.index["sample_id"].to_pylist() == b.index["sample_id"].to_pylist()  # units in order = the layout
    assert a.index["row_offset"].to_pylist() == b.index["row_offset"].to_pylist()
    for sid in a.index["sample_id"].to_pylist():
        assert np.array_equal(a.encoder_tokens(sid)[0], b.encoder_tokens(sid)[0]), sid
        assert np.array_equal(a.loss_mask(sid), b.loss_mask(sid)), sid
        for l in a.layers:
            assert np.array_equal(a.deltas(sid, l), b.deltas(sid, l)), (sid, l)
    assert a.settings == b.settings and a.attrs["counts"] == b.attrs["counts"] and a.fingerprint() == b.fingerprint()
    assert np.array_equal(a.embeddings().numpy(), b.embeddings().numpy())
    assert validate_cache(reference) == []
    # Nothing in the manifest or a part depends on time, host or worker; coordination files are gone.
    m = json.loads((reference / "manifest.json").read_text())
    assert m["schema_version"] == 2 and "created" not in m
    assert m["provenance"] == {"extracted": {"mode": "elastic", "units": 10, "unit_tokens": UNIT,
                                             "kcache_version": m["kcache_version"]}}
    assert sorted(p.name for p in reference.iterdir()) == ["manifest.json", "parts"]
    assert sorted(p.name for p in (reference / "parts").iterdir()) == [f"unit-{k:05d}" for k in range(10)]
    for k, p in enumerate(b.parts):
        assert "created" not in p.attrs and "finished" not in p.attrs and "rank" not in p.attrs["extraction"]
        assert p.attrs["extraction"]["device"] == "cpu" and p.attrs["extraction"]["unit"]["index"] == k
        assert (k == 0) == (reference / unit_name(k) / "embeddings").is_dir()  # the embedding matrix once
    assert b.attrs["extraction"]["units"] == 10 and b.attrs["extraction"]["batches"] == 36
    # A rerun finds it complete; it merges like any cache.
    again = extract(decoder, samples_file, reference, ExtractConfig(**SMALL), elastic=ElasticConfig(unit_tokens=UNIT),
                    progress=False)
    assert again.status == "already complete"
    merge([str(reference), str(single)], tmp_path / "m.zarr", keep_first=True, progress=False)
    assert validate_cache(tmp_path / "m.zarr") == []


def test_an_elastic_cache_pulls_partially_and_publishes_like_any_cache(reference, tmp_path):
    from kcache.cache import pull
    from kcache.cache.publish import push

    whole = tmp_path / "whole.zarr"
    pull(str(reference), whole, progress=False)
    _same_bytes(reference, whole)  # a version-2 manifest is pulled as it is
    part = tmp_path / "part.zarr"
    pull(str(reference), part, layers=[2], limit_samples=20, progress=False)
    c, ref = Cache.open(part), Cache.open(reference)
    assert c.layers == [2] and c.num_samples == 20 and validate_cache(part) == []
    assert np.array_equal(c.embeddings().numpy(), ref.embeddings().numpy())  # from unit 0
    sid = c.index["sample_id"][7].as_py()
    assert np.array_equal(c.deltas(sid, 2), ref.deltas(sid, 2))
    report = push(reference, str(tmp_path / "published"), progress=False)
    assert report["manifest_written"] and validate_cache(tmp_path / "published") == []


def test_a_first_part_without_embeddings_is_refused(reference, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(reference, bad)
    man = bad / "manifest.json"
    doc = json.loads(man.read_text())
    doc["parts"] = doc["parts"][1:]
    man.chmod(0o644)
    man.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"first part \(parts/unit-00001\) holds no embedding matrix"):
        Cache.open(bad)


def test_stale_leases_are_taken_over_and_a_live_one_waited_for(reference, decoder, samples_file, tmp_path):
    """A worker takes over units whose leases are stale (a dead pid here, an old heartbeat from
    another host) and drops a dead worker's half-written unit; it waits while a unit's lease is live
    and takes it over once that lease goes stale. The result is the reference, byte for byte."""
    out = tmp_path / "c.zarr"
    host, now = socket.gethostname(), time.time()
    leases = out / ELASTIC_DIR / "leases"
    _write_lease(leases / "unit-00000.lease", host, _dead_pid(), now, 0)
    _write_lease(leases / "unit-00001.lease", "elsewhere", 1, now - 700, 1)
    _write_lease(leases / "unit-00002.lease", host, os.getppid(), now, 2, owner="alive/1/0")
    junk = out / "parts" / f"unit-00000.w_{host_hash(host, local_node())}_{_dead_pid()}_dead.tmp"
    (junk / "deltas").mkdir(parents=True)
    box = {}

    def work():
        try:
            box["report"] = extract(decoder, samples_file, out, ExtractConfig(**SMALL),
                                    elastic=ElasticConfig(unit_tokens=UNIT, poll_s=0.05), progress=False)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            box["error"] = e

    t = threading.Thread(target=work)
    t.start()
    try:
        end = time.monotonic() + 120
        while sum((out / unit_name(k)).is_dir() for k in range(10)) < 9:
            assert t.is_alive(), box.get("error")
            assert time.monotonic() < end
            time.sleep(0.05)
        assert not junk.exists()  # a dead worker of this host: its private directory is dropped
        time.sleep(0.5)  # ten polls: the live lease is respected
        assert t.is_alive() and not (out / unit_name(2)).exists()
        assert read_lease(leases / "unit-00002.lease")["owner"] == "alive/1/0"
        progress = elastic_progress(out)
        assert progress["committed"] == 9 and [x["unit"] for x in progress["leases"]] == [2]
    finally:
        # its holder stops heartbeating: ten minutes later the lease is stale
        _write_lease(leases / "unit-00002.lease", host, os.getppid(), now - 700, 2, owner="alive/1/0")
        t.join(120)
    assert "error" not in box, box.get("error")
    assert box["report"].status == "complete" and "took over 3 from stale leases" in box["report"].notes[0]
    _same_bytes(reference, out)


def test_workers_that_differ_are_refused_naming_the_difference(decoder, samples_file, tmp_path, monkeypatch):
    from kcache.elastic import _open_record, _plan_job

    out = tmp_path / "c.zarr"
    cfg, ecfg = ExtractConfig(**SMALL), ElasticConfig(unit_tokens=UNIT)
    _open_record(out, _plan_job(decoder, samples_file, out, cfg, ecfg).record)  # a first worker joined, then died
    with pytest.raises(CacheError, match=r"other settings .*attrs\.settings\.layers: \[1, 2\] vs \[1, 2, 3\]"):
        extract(decoder, samples_file, out, ExtractConfig(**{**SMALL, "layers": "1-3"}), elastic=ecfg, progress=False)
    with pytest.raises(CacheError, match=r"units\.unit_tokens: 500 vs 700"):
        extract(decoder, samples_file, out, cfg, elastic=ElasticConfig(unit_tokens=700), progress=False)
    with pytest.raises(CacheError, match=r"attrs\.extraction\.token_budget: 96 vs 128"):
        extract(decoder, samples_file, out, ExtractConfig(**{**SMALL, "token_budget": 128}), elastic=ecfg,
                progress=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(CacheError, match=r"attrs\.extraction\.threads: 1 vs 2"):
        extract(decoder, samples_file, out, cfg, elastic=ecfg, progress=False)
    monkeypatch.undo()
    with pytest.raises(CacheError, match=r"holds an elastic extraction .*--elastic"):
        extract(decoder, samples_file, out, cfg, progress=False)  # a plain extraction into it
    with pytest.raises(CacheError, match="--overwrite cannot be combined with --elastic"):
        extract(decoder, samples_file, out, cfg, elastic=ecfg, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [ELASTIC_DIR]  # nothing else written
    from kcache.cli import app

    res = CliRunner().invoke(app, ["finalize", str(out)])
    assert res.exit_code == 2 and "elastic extraction in progress (0 of 10 units committed)" in res.output
    res = CliRunner().invoke(app, ["extract", "--samples", str(samples_file), "--out", str(out), "--unit-tokens", "9"])
    assert res.exit_code == 2 and "only apply with --elastic" in res.output
    plain = tmp_path / "plain.zarr"
    extract(decoder, samples_file, plain, ExtractConfig(**SMALL, max_length=512), progress=False)
    with pytest.raises(CacheError, match="different settings"):  # finalized: immutable, as always
        extract(decoder, samples_file, plain, cfg, elastic=ecfg, progress=False)
    (plain / "manifest.json").chmod(0o644)
    (plain / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"holds a single-process cache"):
        extract(decoder, samples_file, plain, ExtractConfig(**SMALL, max_length=512), elastic=ecfg, progress=False)


# ---------------------------------------------------------------------------------------------
# many processes


@pytest.mark.integration
def test_three_processes_and_two_torchrun_ranks_give_the_reference_bytes(reference, env, model_dir, samples_file,
                                                                         tmp_path):
    out, gate = tmp_path / "three.zarr", tmp_path / "go"
    logs = [tmp_path / f"w{i}" for i in range(3)]
    procs = [_worker(env, model_dir, samples_file, out, log, gate=gate, batch_sleep=0.1) for log in logs]
    _open_gate(gate, procs)
    outs = _finish(procs, logs)
    done = [_units_done(o) for o in outs]
    assert sum(done) == 10 and sum(n > 0 for n in done) >= 2, done  # every unit once, and shared
    assert sum(": complete; " in o for o in outs) == 1, outs  # exactly one worker wrote the manifest
    _same_bytes(reference, out)

    two = tmp_path / "two.zarr"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(_free_port()), "-m", "kcache", "extract", "--model",
                        str(model_dir), "--samples", str(samples_file), "--out", str(two), *CLI],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 1/2]" in r.stdout and r.stdout.count("elastic: this worker") == 2
    _same_bytes(reference, two)


def _wait_hung(procs, logs, which, timeout: float = 240) -> None:
    """Wait until the workers ``which`` hang inside a batch (every worker must still run)."""
    end = time.monotonic() + timeout
    while not all(Path(f"{logs[i]}.hung").exists() for i in which):
        for p, log in zip(procs, logs):
            assert p.poll() is None, Path(f"{log}.err").read_text()[-3000:]
        assert time.monotonic() < end, "workers did not hang"
        time.sleep(0.02)


def _lease_pids(out: Path) -> dict[int, int]:
    """unit -> pid of its lease holder."""
    docs = [read_lease(p) for p in (out / ELASTIC_DIR / "leases").glob("unit-*.lease")]
    return {d["unit"]: d["pid"] for d in docs if d}


@pytest.mark.integration
def test_a_worker_killed_mid_unit_is_taken_over_and_two_new_workers_finish_identically(reference, env, model_dir,
                                                                                        samples_file, tmp_path):
    from kcache.cli import app

    out, gate = tmp_path / "c.zarr", tmp_path / "go"
    logs = [tmp_path / f"w{i}" for i in range(3)]
    # Worker 0 hangs inside its 3rd batch (units have 3-4), holding its lease, and is killed with -9
    # there; the two others, still running, take its unit over (a dead pid on this host: at once).
    # Then they are killed too, wherever they are, and two fresh workers finish the cache.
    procs = [_worker(env, model_dir, samples_file, out, log, gate=gate, hang_at=hang, batch_sleep=0.3)
             for log, hang in zip(logs, (3, 0, 0))]
    try:
        _open_gate(gate, procs)
        _wait_hung(procs, logs, [0])
        (k0,) = [k for k, pid in _lease_pids(out).items() if pid == procs[0].pid]
        assert not (out / unit_name(k0)).exists() and list((out / "parts").glob(f"unit-{k0:05d}.*.tmp"))  # mid-unit
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(30)
        end = time.monotonic() + 120
        # taken over by a survivor: held by it, or already committed
        while not ((out / unit_name(k0)).is_dir() or _lease_pids(out).get(k0) in (procs[1].pid, procs[2].pid)):
            for p, log in zip(procs[1:], logs[1:]):
                assert p.poll() is None, Path(f"{log}.err").read_text()[-3000:]
            assert time.monotonic() < end, "the dead worker's unit was not taken over"
            time.sleep(0.02)
    finally:
        for p in procs:
            p.kill()
            p.wait(30)
    progress = elastic_progress(out)
    assert progress is not None and progress["committed"] < 10
    res = CliRunner().invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{progress['committed']} of 10 units committed, {len(progress['leases'])} lease(s)" in res.output

    logs2 = [tmp_path / f"v{i}" for i in range(2)]
    procs2 = [_worker(env, model_dir, samples_file, out, log) for log in logs2]
    outs = _finish(procs2, logs2)
    taken = [int(o.split("took over ")[1].split()[0]) if "took over" in o else 0 for o in outs]
    # The dead workers' leases are taken over (or, when one was just moved away by the other
    # worker's takeover, claimed afresh, uncounted: kcache.lease) and their units redone from scratch.
    assert sum(taken) <= len(progress["leases"]), outs
    assert sum(_units_done(o) for o in outs) == 10 - progress["committed"]
    _same_bytes(reference, out)
    res = CliRunner().invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "elastic: 10 units" in res.output
