"""One writer per output (kcache.lock), process-unique temporaries, interrupted finalize, pull's destination.

Issue 12, items 4-7. Contention is made deterministic: the first writer is either a helper process
that holds the lock until told to let go, or a real ``kcache extract`` paused (through a gate file)
after it took the lock; only ``test_two_extracts_really_racing`` leaves the order to chance, and it
accepts either legal outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, tiny_dec, unlock
from typer.testing import CliRunner

from kcache.cache import Cache, CacheError, finalize, merge, validate_cache
from kcache.data.samples import write_samples
from kcache.data.synth import synth_samples
from kcache.extract import ExtractConfig, extract
from kcache.lock import OutputLocked, lock_path, output_lock, remove_stale_tmp
from kcache.lock import tmp_path as tmp_name

SMALL = dict(layers="1-2", chunk_rows=32, shard_rows=64, token_budget=96)
CLI_SMALL = ["--layers", "1-2", "--token-budget", "96", "--chunk-rows", "32", "--shard-rows", "64", "--model-dtype",
             "float32"]

# A process that holds the lock on argv[1] until its stdin closes (or it is killed).
HOLDER = """
import sys
from kcache.lock import output_lock
with output_lock(sys.argv[1], "hold it for a test"):
    print("locked", flush=True)
    sys.stdin.read()
"""

# A real `kcache ...` command whose extraction waits, lock held, before its first batch until the
# file $KCACHE_TEST_GATE exists (it creates $KCACHE_TEST_GATE.waiting when it gets there).
GATED = """
import os, runpy, sys, time
import kcache.extract as ex
gate, orig = os.environ["KCACHE_TEST_GATE"], ex.batch_deltas
def gated(*a, **k):
    open(gate + ".waiting", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.05)
    return orig(*a, **k)
ex.batch_deltas = gated
sys.argv = ["kcache", *sys.argv[1:]]
runpy.run_module("kcache", run_name="__main__")
"""


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    return cli_env(home)


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples")
    write_samples(synth_samples(24, seed=5), d / "a.parquet")
    write_samples(synth_samples(16, seed=6), d / "b.parquet")
    return d / "a.parquet", d / "b.parquet"


def _kcache(env, *args, gate: Path | None = None, wait: bool = True):
    cmd = [sys.executable, "-c", GATED, *args] if gate else [sys.executable, "-m", "kcache", *args]
    e = {**env, "KCACHE_TEST_GATE": str(gate)} if gate else env
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _extract_args(model_dir, samples, out):
    return ["extract", "--model", str(model_dir), "--samples", str(samples), "--out", str(out), *CLI_SMALL]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, model_dir, sample_files):
    """A single, uncontended CLI extraction of samples a."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = _kcache(env, *_extract_args(model_dir, sample_files[0], out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@contextlib.contextmanager
def held(out: Path):
    """Another process holding the output lock on ``out``; yields it (``.pid``)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        if p.poll() is None:
            p.stdin.close()
            p.wait(timeout=60)


def _wait_for(path: Path, proc, timeout: float = 240):
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before reaching the gate:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < end, f"timed out waiting for {path}"
        time.sleep(0.05)


def _same_cache(a: Path, b: Path):
    """Same samples with identical deltas, tokens and masks."""
    ca, cb = Cache.open(a), Cache.open(b)
    assert ca.index["sample_id"].to_pylist() == cb.index["sample_id"].to_pylist()
    assert ca.settings == cb.settings
    for sid in ca.index["sample_id"].to_pylist():
        assert np.array_equal(ca.encoder_tokens(sid)[0], cb.encoder_tokens(sid)[0]), sid
        assert np.array_equal(ca.loss_mask(sid), cb.loss_mask(sid)), sid
        for l in ca.layers:
            assert np.array_equal(ca.deltas(sid, l), cb.deltas(sid, l)), (sid, l)


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _no_leftovers(out: Path):
    """No lock file and no temporary of ``out`` remains beside it."""
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name) and p.name != out.name) == []


# ---------------------------------------------------------------------------------------------
# the lock itself (item 4/5)


def test_lock_names_the_holder_and_is_reentrant_in_one_process(tmp_path):
    out = tmp_path / "c.zarr"
    with output_lock(out, "write it") as lock:
        assert lock == lock_path(out) and lock.parent == tmp_path  # beside the output, never inside it
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"]
        with output_lock(out, "write it again"):  # re-entrant: extract holds it and calls finalize
            pass
        assert lock.exists()
    assert not lock.exists() and not out.exists()


@pytest.mark.integration
def test_lock_is_refused_while_held_and_released_by_kill_9(tmp_path):
    out = tmp_path / "c.zarr"
    with held(out) as holder:
        with pytest.raises(OutputLocked,
                           match=rf"another kcache process \(pid {holder.pid} on .+\) is writing .*c\.zarr"):
            with output_lock(out, "write it"):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert lock_path(out).exists()  # the file stays behind, the lock does not
        with output_lock(out, "write it"):  # never stale: the kernel dropped it with the process
            pass
    assert not lock_path(out).exists()


@pytest.mark.integration
def test_temporary_names_are_process_unique_and_only_dead_ones_are_cleaned(tmp_path):
    final = tmp_path / "c.zarr"
    a, b = tmp_name(final, "creating"), tmp_name(final, "creating")
    assert a != b and str(os.getpid()) in a.name and a.name.endswith(".tmp")
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        mine_live = final.with_name(f"c.zarr.creating.{live.pid}-0000.tmp")
        gone = final.with_name(f"c.zarr.creating.{dead.pid}-0000.tmp")
        other = final.with_name(f"c.zarr.merging.{dead.pid}-0000.tmp")
        for d in (mine_live, gone, other):
            (d / "deltas").mkdir(parents=True)
        assert remove_stale_tmp(final, "creating") == [gone]
        assert mine_live.exists() and other.exists() and not gone.exists()
    finally:
        live.stdin.close()
        live.wait()


# ---------------------------------------------------------------------------------------------
# two extractions into one --out (items 4, 5)


@pytest.mark.integration
def test_extract_refuses_an_output_another_process_holds(tmp_path, env, model_dir, sample_files, reference):
    out = tmp_path / "c.zarr"
    with held(out) as holder:
        r = _kcache(env, *_extract_args(model_dir, sample_files[0], out))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"another kcache process (pid {holder.pid} on " in r.stderr and str(out) in r.stderr, r.stderr
        assert not out.exists()  # untouched
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies without cleaning up
        holder.wait(timeout=30)
    r = _kcache(env, *_extract_args(model_dir, sample_files[0], out))
    assert r.returncode == 0, r.stderr[-3000:]
    v = _kcache(env, "validate", str(out))
    assert v.returncode == 0, v.stderr[-3000:]
    _same_cache(out, reference)
    _no_leftovers(out)


@pytest.mark.integration
@pytest.mark.parametrize("second", ["same samples", "other samples"])
def test_second_extract_fails_naming_the_first_which_completes(tmp_path, env, model_dir, sample_files, reference,
                                                               second):
    out = tmp_path / "c.zarr"
    gate = tmp_path / "go"
    first = _kcache(env, *_extract_args(model_dir, sample_files[0], out), gate=gate, wait=False)
    try:
        _wait_for(Path(f"{gate}.waiting"), first)  # lock held, store created, about to run the first batch
        samples = sample_files[0] if second == "same samples" else sample_files[1]
        r = _kcache(env, *_extract_args(model_dir, samples, out))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"another kcache process (pid {first.pid} on " in r.stderr and str(out) in r.stderr, r.stderr
    finally:
        gate.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    v = _kcache(env, "validate", str(out))
    assert v.returncode == 0, v.stderr[-3000:]
    _same_cache(out, reference)
    _no_leftovers(out)


@pytest.mark.integration
def test_two_extracts_really_racing(tmp_path, env, model_dir, sample_files, reference):
    out = tmp_path / "c.zarr"
    procs = [_kcache(env, *_extract_args(model_dir, sample_files[0], out), wait=False) for _ in range(2)]
    res = [(p, *p.communicate(timeout=300)) for p in procs]
    ok = [p for p, _, _ in res if p.returncode == 0]
    failed = [(p, err) for p, _, err in res if p.returncode != 0]
    # Either one ran while the other held the lock (it fails naming the holder), or they ran
    # one after the other (the second finds the cache complete). Never anything else.
    if failed:
        assert len(ok) == 1 and len(failed) == 1
        (_, err), winner = failed[0], ok[0]
        assert f"another kcache process (pid {winner.pid} on " in err and "Traceback" not in err, err[-3000:]
    else:
        assert sum("already complete" in out_ for _, out_, _ in res) == 1
    v = _kcache(env, "validate", str(out))
    assert v.returncode == 0, v.stderr[-3000:]
    _same_cache(out, reference)
    _no_leftovers(out)


# ---------------------------------------------------------------------------------------------
# merge --out, finalize, pull DIR while another process writes there


@pytest.fixture
def llama(tokenizer_nobos):

    return tiny_dec("llama", tokenizer_nobos, name="tiny-llama")


@pytest.fixture
def two_caches(llama, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    extract(llama, synth_samples(12, seed=1), a, ExtractConfig(**SMALL), progress=False)
    extract(llama, synth_samples(10, seed=2), b, ExtractConfig(**SMALL), progress=False)
    return a, b


@pytest.mark.integration
def test_merge_out_refuses_while_locked(two_caches, tmp_path, env):
    a, b = two_caches
    out = tmp_path / "m.zarr"
    with held(out) as holder:
        r = _kcache(env, "merge", str(a), str(b), "--out", str(out))
        assert r.returncode != 0 and f"pid {holder.pid} on " in r.stderr and str(out) in r.stderr, r.stderr[-3000:]
        with pytest.raises(OutputLocked, match=f"pid {holder.pid} on "):
            merge([str(a), str(b)], out, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("m.zarr")] == []  # no temporary left either
    merge([str(a), str(b)], out, progress=False)
    assert validate_cache(out) == []
    _no_leftovers(out)


@pytest.mark.integration
def test_finalize_refuses_while_locked(llama, tmp_path):
    out = tmp_path / "c.zarr"
    extract(llama, synth_samples(8, seed=3), out, ExtractConfig(**SMALL), progress=False)
    unlock(out)
    (out / "manifest.json").unlink()
    with held(out) as holder, pytest.raises(OutputLocked, match=f"pid {holder.pid} on "):
        finalize(out)
    assert not (out / "manifest.json").exists()
    finalize(out)
    assert validate_cache(out) == []


@pytest.mark.integration
def test_pull_refuses_while_locked(two_caches, tmp_path):
    from httpserver import serve

    from kcache.cache import pull

    dest = tmp_path / "pulled"
    with serve(tmp_path) as (url, _), held(dest) as holder:
        with pytest.raises(OutputLocked, match=f"pid {holder.pid} on .*pulled"):
            pull(f"{url}/a.zarr", dest, progress=False)
    assert not dest.exists()


# ---------------------------------------------------------------------------------------------
# interrupted finalize (item 6)


@pytest.mark.integration
@pytest.mark.parametrize("rerun", ["extract", "finalize"])
def test_rerun_completes_a_finalize_killed_half_way(llama, tmp_path, rerun):
    samples = synth_samples(12, seed=4)
    out = tmp_path / "c.zarr"
    extract(llama, samples, out, ExtractConfig(**SMALL), progress=False)
    want = json.loads((out / "manifest.json").read_text())["parts"][0]["files"]
    # What kill -9 during finalize leaves: a complete cache without its manifest, the temporary
    # manifest (the name older versions used and today's), and part of the files already read-only.
    unlock(out)
    (out / "manifest.json").unlink()
    (out / "manifest.json.tmp").write_text('{"format": "kcache-cache-manifest", "parts": [')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f"manifest.json.tmp.{dead.pid}-0000.tmp").write_text("{")
    for i, p in enumerate(sorted(q for q in out.rglob("*") if q.is_file())):
        if i % 2:
            p.chmod(0o444)
    if rerun == "extract":
        report = extract(llama, samples, out, ExtractConfig(**SMALL), progress=False)
        assert report.status == "already complete"
    else:
        finalize(out)
    assert validate_cache(out) == []
    files = json.loads((out / "manifest.json").read_text())["parts"][0]["files"]
    assert files == want  # the same files, no temporary among them
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert all(not (p.stat().st_mode & 0o222) for p in out.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# pull onto an existing destination (item 7)


def test_pull_onto_another_cache_is_refused_and_leaves_it_untouched(two_caches, tmp_path):
    from httpserver import serve

    from kcache.cache import pull
    from kcache.cli import app

    a, b = two_caches
    before = _snapshot(b)
    with serve(tmp_path) as (url, server):
        with pytest.raises(CacheError, match=f"{b}.*(already holds a cache|not empty)"):
            pull(f"{url}/a.zarr", b, progress=False)
        res = CliRunner().invoke(app, ["pull", f"{url}/a.zarr", str(b), "--quiet"])
        assert res.exit_code != 0 and str(b) in res.output, res.output
        # a directory of someone's files that is no pull at all
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "notes.txt").write_text("keep me")
        with pytest.raises(CacheError, match=f"{mine}.*not empty"):
            pull(f"{url}/a.zarr", mine, progress=False)
        # a finished pull of the very same manifest is only verified (rerun), never refused
        same = tmp_path / "same"
        pull(f"{url}/a.zarr", same, progress=False)
        again = pull(f"{url}/a.zarr", same, progress=False)
    assert _snapshot(b) == before
    assert (mine / "notes.txt").read_text() == "keep me" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert again["bytes_downloaded"] == 0 and validate_cache(same) == []
    assert not lock_path(b).exists() and not lock_path(mine).exists()


# ---------------------------------------------------------------------------------------------
# review fixes: the lock file, threads, leaked fds, a killed merge's lock files, fresh_tmp


def test_a_symlink_planted_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.zarr"
    lock_path(out).symlink_to(victim)
    with pytest.raises(CacheError, match=r"lock file .*out\.zarr\.lock is a symbolic link"):
        with output_lock(out, "write it"):
            pass
    assert victim.read_text() == "precious" and lock_path(out).is_symlink()
    # a directory (any non-regular file) at the lock path is refused the same way
    lock_path(out).unlink()
    lock_path(out).mkdir()
    with pytest.raises(CacheError, match="is not a regular file"):
        with output_lock(out, "write it"):
            pass


def test_the_lock_is_per_thread_not_per_process(tmp_path):
    import threading

    out = tmp_path / "c.zarr"
    taken, release, done = threading.Event(), threading.Event(), threading.Event()
    errors_seen = []

    def holder():
        try:
            with output_lock(out, "hold it"):
                taken.set()
                release.wait(30)
        except BaseException as e:  # noqa: BLE001
            errors_seen.append(e)
        finally:
            done.set()

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert taken.wait(30)
        with pytest.raises(OutputLocked, match=rf"pid {os.getpid()} on .*another thread"):
            with output_lock(out, "write it"):
                pass
        assert lock_path(out).exists()  # the holder's lock file is intact: the refused thread did not release it
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    finally:
        release.set()
        t.join(30)
    assert not errors_seen and not lock_path(out).exists()
    with output_lock(out, "write it"):  # free again once the other thread let go
        pass


def test_a_live_thread_s_temporary_is_not_stale_but_an_unregistered_one_of_this_pid_is(tmp_path):
    import threading

    final = tmp_path / "c.zarr"
    made, release = threading.Event(), threading.Event()
    box = []

    def worker():
        p = tmp_name(final, "creating")
        p.mkdir()
        box.append(p)
        made.set()
        release.wait(30)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert made.wait(30)
        leftover = final.with_name(f"c.zarr.creating.{os.getpid()}-dead.tmp")  # never named by tmp_path here
        leftover.mkdir()
        assert remove_stale_tmp(final, "creating") == [leftover]
        assert box[0].exists()
    finally:
        release.set()
        t.join(30)
    assert remove_stale_tmp(final, "creating") == [box[0]]  # its thread is gone: stale now


@pytest.mark.integration
def test_the_lock_is_released_when_writing_the_holder_info_fails(tmp_path, monkeypatch):
    import kcache.lock as lk

    out = tmp_path / "c.zarr"
    fds = len(os.listdir("/proc/self/fd"))

    def boom(fd, n):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lk.os, "ftruncate", boom)
    with pytest.raises(OSError, match="No space"):
        with output_lock(out, "write it"):
            pass
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == fds and not lk.holds_lock(out)
    r = subprocess.run([sys.executable, "-c", HOLDER, str(out)], input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "locked" in r.stdout, r.stderr[-2000:]  # another process can take it: not leaked


@pytest.mark.integration
def test_lock_files_of_a_killed_merge_are_removed_with_its_temporaries(tmp_path):
    from kcache.lock import fresh_tmp

    final = tmp_path / "m.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        gone = final.with_name(f"m.zarr.merging.{dead.pid}-0000.tmp")
        gone_lock = final.with_name(f"m.zarr.merging.{dead.pid}-0000.tmp.lock")
        live_lock = final.with_name(f"m.zarr.merging.{live.pid}-0000.tmp.lock")
        gone.mkdir()
        gone_lock.write_text("{}")
        live_lock.write_text("{}")
        new = fresh_tmp(final, "merging")  # = remove_stale_tmp + tmp_path
        assert not gone.exists() and not gone_lock.exists() and live_lock.exists()
        assert new.name.startswith(f"m.zarr.merging.{os.getpid()}-") and not new.exists()
    finally:
        live.stdin.close()
        live.wait()
