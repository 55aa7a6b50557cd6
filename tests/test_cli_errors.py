"""Errors a user can act on: one error type per domain (all KCacheError), one CLI handler that turns
them into ``error: …`` and the same exit code in every command (kcache/cli/errors.py), output
directories checked before any work, corrupt chunks and dropped connections named, and no
background thread left running at interpreter exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_dec, unlock
from httpserver import serve
from typer.testing import CliRunner

from kcache.cli import app
from kcache.cli.errors import EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_INVALID
from kcache.data.samples import write_samples
from kcache.data.synth import synth_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tokenizer_nobos):
    """A finalized cache of a tiny llama (layers 1-2) and the samples it was made from."""
    from kcache.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("cli-errors")
    samples = root / "s.jsonl"
    write_samples(synth_samples(16, seed=3), samples)
    dec = tiny_dec("llama", tokenizer_nobos, name="tiny-llama")
    extract(dec, samples, root / "c.zarr", ExtractConfig(layers="1-2", token_budget=256, chunk_rows=32, shard_rows=64),
            progress=False)
    return root / "c.zarr", samples


@pytest.fixture
def bad_inputs(tmp_path, tiny_cache, saved_model):
    """Paths the table below refers to by name (tiny files: each case runs in well under a second)."""
    import fcntl

    from kcache.lock import lock_path

    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "knowledge": ["x"], "source": "q", "target": "t"}\n{not json\n')
    good_row = synth_samples(1, seed=3).to_pylist()[0]
    bad_row = tmp_path / "bad-row.jsonl"  # line 1 a valid sample, line 2 one with a mistyped field
    bad_row.write_text(json.dumps(good_row) + "\n"
                       + json.dumps({**good_row, "id": "b", "knowledge": "not a list"}) + "\n")
    samples_parquet = tmp_path / "samples.parquet"  # a valid table, but not one of kcache's KG tables
    write_samples(synth_samples(2, seed=3), samples_parquet)
    csqa = tmp_path / "dev_rand_split.jsonl"  # CommonsenseQA layout, a row without its question
    csqa.write_text(json.dumps({"id": "q1", "answerKey": "A"}) + "\n")
    openke = tmp_path / "openke"  # OpenKE layout, a triple whose tail is no entity
    openke.mkdir()
    (openke / "entity2id.txt").write_text("2\na\t0\nb\t1\n")
    (openke / "relation2id.txt").write_text("1\nr\t0\n")
    (openke / "train2id.txt").write_text("1\n0 5 0\n")
    not_cache = tmp_path / "not-a-cache"
    not_cache.mkdir()
    (not_cache / "readme.txt").write_text("hello\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    locked = tmp_path / "locked.zarr"  # its lock held by "another process" (another open file description)
    fd = os.open(lock_path(locked), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere",
                             "command": "kcache merge a b --out locked.zarr"}).encode())
    yield {"tmp": tmp_path, "text": text, "bad": bad, "bad_row": bad_row, "samples_parquet": samples_parquet,
           "csqa": csqa,
           "openke": openke, "not_cache": not_cache, "blocker": blocker, "locked": locked, "cache": tiny_cache[0],
           "samples": tiny_cache[1], "model": saved_model}
    os.close(fd)


def _fmt(args, p):
    return [a.format(**{k: str(v) for k, v in p.items()}) for a in args]


# command x bad input -> exit code and a fragment of the one error line
TABLE = [
    ("extract: missing samples file",
     ["extract", "--model", "{model}", "--samples", "{tmp}/missing.jsonl", "--out", "{tmp}/c.zarr", "--layers", "1"],
     EXIT_INPUT, "missing.jsonl: no such samples file"),
    ("extract: --model is a text file",
     ["extract", "--model", "{text}", "--samples", "{samples}", "--out", "{tmp}/c.zarr", "--layers", "1"],
     EXIT_INPUT, "notes.txt: exists but is not a model"),
    ("extract: --model names nothing",
     ["extract", "--model", "{tmp}/nothing", "--samples", "{samples}", "--out", "{tmp}/c.zarr"],
     EXIT_INPUT, "no such model file or directory"),
    ("evaluate: bad samples",
     ["evaluate", "--model", "{model}", "--samples", "{bad}", "--out", "{tmp}/eval", "--device", "cpu"],
     EXIT_INPUT, "bad.jsonl"),
    ("evaluate: --model is a text file",
     ["evaluate", "--model", "{text}", "--samples", "{samples}", "--out", "{tmp}/eval"],
     EXIT_INPUT, "exists but is not a model"),
    ("data convert: missing input",
     ["data", "convert", "cmu_dog", "--input", "{tmp}/nothing", "--out", "{tmp}/o.jsonl"],
     EXIT_INPUT, "nothing"),
    ("data stats: bad samples",
     ["data", "stats", "{bad}"],
     EXIT_INPUT, "bad.jsonl"),
    ("fit-encoders: --out under a regular file",
     ["fit-encoders", "--cache", "{cache}", "--out", "{blocker}/enc", "--max-steps", "1"],
     EXIT_INPUT, "a-file is not a directory"),
    ("fit-encoders: missing cache",
     ["fit-encoders", "--cache", "{tmp}/none.zarr", "--out", "{tmp}/enc"],
     EXIT_INPUT, "none.zarr"),
    ("finetune: --out under a regular file",
     ["finetune", "--model", "{model}", "--samples", "{samples}", "--from-scratch", "--out", "{blocker}/ft"],
     EXIT_INPUT, "a-file is not a directory"),
    ("edit: --out under a regular file",
     ["edit", "--model", "{model}", "--samples", "{samples}", "--from-scratch", "--out", "{blocker}/ed"],
     EXIT_INPUT, "a-file is not a directory"),
    ("inspect: not a cache",
     ["inspect", "{tmp}"],
     EXIT_INPUT, "error:"),
    ("kg import-openke: missing folder",
     ["kg", "import-openke", "{tmp}/nowhere", "--out", "{tmp}/kg"],
     EXIT_INPUT, "error:"),
    ("pull: not a finalized cache",
     ["pull", "{tmp}", "{tmp}/pulled"],
     EXIT_INPUT, "error:"),
    # issue 14: one case per command family, each the code of its kind
    ("fit-encoders: a directory that is not a cache",
     ["fit-encoders", "--cache", "{not_cache}", "--out", "{tmp}/enc"],
     EXIT_INPUT, "not-a-cache: not a kcache cache"),
    ("evaluate: a samples row with a mistyped field",
     ["evaluate", "--model", "{model}", "--samples", "{bad_row}", "--out", "{tmp}/eval", "--device", "cpu"],
     EXIT_INPUT, "bad-row.jsonl: line 2: field 'knowledge': expected a list of strings"),
    ("data convert: a row without a required field (a SampleError, once exit 1)",
     ["data", "convert", "commonsenseqa", "--input", "{csqa}", "--out", "{tmp}/o.jsonl"],
     EXIT_INPUT, "dev_rand_split.jsonl: line 1: missing field 'question'"),
    ("data split: a samples row with a mistyped field",
     ["data", "split", "{bad_row}", "--out", "{tmp}/split.jsonl", "--sizes", "1,0,0"],
     EXIT_INPUT, "bad-row.jsonl: line 2: field 'knowledge'"),
    ("validate: a directory that is not a cache (a verdict on the thing checked)",
     ["validate", "{not_cache}"],
     EXIT_INVALID, "not-a-cache: not a kcache cache"),
    ("inspect: a directory that is not a cache",
     ["inspect", "{not_cache}"],
     EXIT_INPUT, "not-a-cache: not a kcache cache"),
    ("finalize: a directory that is not a cache",
     ["finalize", "{not_cache}"],
     EXIT_INPUT, "not-a-cache: not a kcache cache"),
    ("merge: into an output another process is writing",
     ["merge", "{cache}", "{cache}", "--out", "{locked}"],
     EXIT_ENVIRONMENT, "another kcache process (pid 4242 on elsewhere) is writing"),
    ("kg import-openke: a triple naming no entity",
     ["kg", "import-openke", "{openke}", "--out", "{tmp}/kg"],
     EXIT_INPUT, "train2id.txt: line 2: tail 5 is not an entity id"),
    ("kg stats: a table that is not a KG table",
     ["kg", "stats", "{samples_parquet}"],
     EXIT_INPUT, "samples.parquet: neither a kcache embeddings nor a links file"),
    ("bench store: a directory that is not a cache",
     ["bench", "store", "--cache", "{not_cache}", "--json", "{tmp}/b.json", "--png", "{tmp}/b.png"],
     EXIT_INPUT, "not-a-cache: not a kcache cache"),
    ("bench inject: --model is a text file",
     ["bench", "inject", "--model", "{text}", "--out", "{tmp}/bench"],
     EXIT_INPUT, "notes.txt: exists but is not a model"),
    ("push: a directory that is not a finalized cache",
     ["push", "{not_cache}", "{tmp}/pub"],
     EXIT_INPUT, "not-a-cache: not a finalized cache"),
    ("push: into a local destination another process is writing",
     ["push", "{cache}", "{locked}"],
     EXIT_ENVIRONMENT, "another kcache process (pid 4242 on elsewhere) is writing"),
    ("pull: a partial pull of a layer the cache does not have",
     ["pull", "{cache}", "{tmp}/small", "--layers", "99"],
     EXIT_INPUT, "layer(s) 99 not in this cache"),
    ("fit-encoders: a negative --length-groups",
     ["fit-encoders", "--cache", "{cache}", "--out", "{tmp}/enc-lg", "--length-groups", "-1"],
     EXIT_INPUT, "length_groups must be >= 0 (0: plain shuffled batches), not -1"),
    ("eval-choice: a samples row with a mistyped field",
     ["eval-choice", "--model", "{model}", "--samples", "{bad_row}"],
     EXIT_INPUT, "bad-row.jsonl: line 2: field 'knowledge'"),
]


@pytest.mark.parametrize("name,args,code,fragment", TABLE, ids=[t[0] for t in TABLE])
def test_bad_input_gives_one_error_line_and_the_code_of_its_kind(bad_inputs, name, args, code, fragment):
    r = CliRunner().invoke(app, _fmt(args, bad_inputs), terminal_width=300)
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    prefix = "invalid: " if code == EXIT_INVALID else "error: "  # validate's verdict, else the one handler's line
    lines = [l for l in r.output.splitlines() if l.startswith(("error: ", "invalid: "))]
    assert len(lines) == 1 and lines[0].startswith(prefix) and fragment in lines[0], r.output
    assert "Traceback" not in r.output


def test_usage_errors_keep_clicks_own_code():
    """Click's usage errors (a missing option, a bad value) exit 2 with click's usage text, not an ``error:`` line."""
    r = CliRunner().invoke(app, ["extract", "--out", "x.zarr"], terminal_width=300)
    assert r.exit_code == 2 and "Missing option" in r.output and "--samples" in r.output, r.output
    assert not any(l.startswith("error: ") for l in r.output.splitlines()), r.output


def test_the_one_table_maps_each_kind_to_its_code():
    from kcache.cache import CacheError
    from kcache.cli.errors import exit_code
    from kcache.data.convert import ConvertError
    from kcache.data.samples import SampleError
    from kcache.inject import InjectError
    from kcache.kg.embed import MissingExtraError
    from kcache.kg.tables import KGError
    from kcache.lock import OutputLocked
    from kcache.models import ModelError
    from kcache.schemas import SchemaError

    for e, code in [(CacheError("x"), EXIT_INPUT), (SchemaError("x"), EXIT_INPUT), (SampleError("x"), EXIT_INPUT),
                    (ConvertError("x"), EXIT_INPUT), (KGError("x"), EXIT_INPUT), (MissingExtraError("x"), EXIT_INPUT),
                    (InjectError("x"), EXIT_INPUT), (ModelError("x"), EXIT_INPUT),
                    (OutputLocked("x"), EXIT_ENVIRONMENT), (FileNotFoundError(2, "No such file", "f"), EXIT_INPUT),
                    (NotADirectoryError(20, "Not a dir", "d"), EXIT_INPUT),
                    (PermissionError(13, "Permission denied", "p"), EXIT_ENVIRONMENT),
                    (ConnectionResetError(), EXIT_ENVIRONMENT),
                    (TimeoutError(), EXIT_ENVIRONMENT), (ValueError("x"), EXIT_INPUT),
                    (RuntimeError("a bug"), None), (KeyError("a bug"), None), (TypeError("a bug"), None)]:
        assert exit_code(e) == code, (type(e).__name__, exit_code(e), code)


def test_sample_errors_exit_alike_in_evaluate_and_data(bad_inputs):
    """The same error (a SampleError about the same file) exits with the same code from every command."""
    p = bad_inputs
    codes = {CliRunner().invoke(app, args).exit_code for args in [
        ["evaluate", "--model", str(p["model"]), "--samples", str(p["bad"]), "--out", str(p["tmp"] / "e"),
         "--device", "cpu"],
        ["data", "stats", str(p["bad"])],
        ["finetune", "--model", str(p["model"]), "--samples", str(p["bad"]), "--from-scratch", "--out",
         str(p["tmp"] / "f"), "--max-steps", "1"],
    ]}
    assert codes == {EXIT_INPUT}


def test_every_domain_error_is_a_kcache_error_and_keeps_its_builtin_base():
    from kcache.cache import CacheError
    from kcache.data.convert import ConvertError
    from kcache.data.samples import SampleError
    from kcache.encoders import BundleError
    from kcache.errors import KCacheError
    from kcache.inject import InjectError
    from kcache.kg.tables import KGError
    from kcache.models import ModelError
    from kcache.schemas import SchemaError

    for cls, base in [(CacheError, ValueError), (BundleError, ValueError), (SchemaError, ValueError),
                      (SampleError, ValueError), (ConvertError, SampleError), (KGError, ValueError),
                      (InjectError, ValueError), (ModelError, RuntimeError)]:
        assert issubclass(cls, KCacheError) and issubclass(cls, base), cls


# ---------------------------------------------------------------------------------------------
# output directories are checked before any work


def test_read_only_output_directory_is_refused_before_training(bad_inputs, monkeypatch):
    """fit-encoders / finetune / edit / evaluate refuse an output they cannot write before any work.

    Root ignores permission bits, so the refusal is forced through os.access (the check's first
    step); the probe-file step is tested below with a real read-only directory when not root."""
    import kcache.cli.errors as ce
    import kcache.fit

    p = bad_inputs
    ro = p["tmp"] / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(ce.os, "access", lambda path, mode, **kw: False if Path(path) == ro and mode & os.W_OK
                        else real_access(path, mode, **kw))
    trained = []
    monkeypatch.setattr(kcache.fit, "fit_encoders", lambda *a, **k: trained.append(1))
    for args in (["fit-encoders", "--cache", str(p["cache"]), "--out", str(ro / "enc")],
                 ["finetune", "--model", str(p["model"]), "--samples", str(p["samples"]), "--from-scratch", "--out",
                  str(ro)],
                 ["edit", "--model", str(p["model"]), "--samples", str(p["samples"]), "--from-scratch", "--out",
                  str(ro / "e")],
                 ["evaluate", "--model", str(p["model"]), "--samples", str(p["samples"]), "--out", str(ro / "rep")]):
        r = CliRunner().invoke(app, args, terminal_width=300)
        assert r.exit_code == EXIT_ENVIRONMENT, (args[0], r.output, r.exception)
        assert "error: " in r.output and str(ro) in r.output and "not writable" in r.output, r.output
    assert not trained and list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_for_real(tiny_cache, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = CliRunner().invoke(app, ["fit-encoders", "--cache", str(tiny_cache[0]), "--out", str(ro / "enc"),
                                     "--max-steps", "1"])
    finally:
        ro.chmod(0o755)
    assert r.exit_code == EXIT_ENVIRONMENT and "not writable" in r.output and str(ro) in r.output, r.output


# ---------------------------------------------------------------------------------------------
# corrupt chunks, dropped connections


def test_crc32c_failure_during_fit_names_array_chunk_and_cache(tiny_cache, tmp_path):
    cache = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache[0], cache)
    unlock(cache)
    shard = sorted(f for f in (cache / "deltas" / "layer_02" / "c").rglob("*") if f.is_file())[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the chunk's checksum can tell
    shard.write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["fit-encoders", "--cache", str(cache), "--out", str(tmp_path / "enc"),
                                 "--max-steps", "2", "--eval-every", "2", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == EXIT_INPUT, (r.output, r.exception)
    line = next(l for l in r.output.splitlines() if l.startswith("error: "))
    assert "deltas/layer_02" in line and "chunk" in line and str(cache) in line and "kcache validate" in line, line
    assert "checksum" in line


def test_validate_over_a_dropped_connection_says_rerun(tiny_cache):
    cache = tiny_cache[0]
    manifest = json.loads((cache / "manifest.json").read_text())
    rel, meta = max(manifest["parts"][0]["files"].items(), key=lambda kv: kv[1]["size"])
    with serve(cache.parent) as (url, server):
        server.fail_once[f"{cache.name}/{rel}"] = meta["size"] // 2
        r = CliRunner().invoke(app, ["validate", f"{url}/{cache.name}"])
        assert r.exit_code == EXIT_ENVIRONMENT, (r.output, r.exception)
        line = next(l for l in r.output.splitlines() if l.startswith("error: "))
        assert f"validating {url}/{cache.name} stopped" in line and "connection" in line and "rerun" in line, line
        assert "invalid:" not in r.output  # no verdict on the cache from a broken read
        # the fault fires once: the rerun the message asks for succeeds
        r = CliRunner().invoke(app, ["validate", f"{url}/{cache.name}"])
    assert r.exit_code == 0 and "valid" in r.output, r.output


def test_validate_of_a_damaged_cache_exits_invalid(tiny_cache, tmp_path):
    cache = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache[0], cache)
    unlock(cache)
    (cache / "README.md").write_text("tampered\n")
    r = CliRunner().invoke(app, ["validate", str(cache)])
    assert r.exit_code == EXIT_INVALID and "invalid: " in r.output, r.output


def test_traceback_on_request(bad_inputs, monkeypatch):
    monkeypatch.setenv("KCACHE_TRACEBACK", "1")
    r = CliRunner().invoke(app, ["data", "stats", str(bad_inputs["bad"])])
    assert r.exit_code == 1 and r.exception is not None and not isinstance(r.exception, SystemExit)


# ---------------------------------------------------------------------------------------------
# thread count recorded; background threads stopped at exit


def test_extraction_records_its_thread_count_and_inspect_shows_it(tiny_cache):
    import torch

    from kcache.cache import Cache

    assert Cache.open(tiny_cache[0]).attrs["extraction"]["threads"] == torch.get_num_threads() == 1
    r = CliRunner().invoke(app, ["inspect", str(tiny_cache[0])])
    assert r.exit_code == 0 and "1 thread(s)" in r.output and "bit-identical" in r.output, r.output


EXIT_SCRIPT = """
import sys, threading
import numpy as np
from kcache.cache import Cache
from kcache.fit import BatchLoader, CacheReader
c = Cache.open(sys.argv[1])
layer = c.layers[0]
c.deltas(0, layer)
loader = BatchLoader(CacheReader(c, c.layers), np.arange(c.num_samples), 2, 64, 0, 0, prefetch=1)
next(iter(loader))  # the worker keeps reading ahead: never closed
names = sorted(t.name for t in threading.enumerate())
assert "zarr_io" in names and "kcache-loader" in names, names
import atexit
def report():  # runs after kcache's hook (threading atexit hooks run first): what is still alive?
    alive = sorted(t.name for t in threading.enumerate() if t.is_alive() and t is not threading.main_thread())
    print("ALIVE", ",".join(n for n in alive if n in ("zarr_io", "kcache-loader")), flush=True)
atexit.register(report)
"""


@pytest.mark.integration
def test_background_threads_are_stopped_before_exit(tiny_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tiny_cache[0])], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ALIVE \n" in r.stdout or r.stdout.rstrip().endswith("ALIVE"), r.stdout
    assert "terminate called" not in r.stderr


# ---------------------------------------------------------------------------------------------
# the output lock: held elsewhere or not creatable is the environment (3), never bad input (2)


def test_a_locked_or_unwritable_output_exits_environment(tiny_cache, tmp_path, monkeypatch):
    import threading

    import kcache.lock as lk
    from kcache.cli.errors import exit_code

    assert exit_code(lk.OutputLocked("x")) == EXIT_ENVIRONMENT
    cache = str(tiny_cache[0])
    out = tmp_path / "m.zarr"
    taken, release = threading.Event(), threading.Event()

    def holder():  # another writer (a thread here: the lock is per thread)
        with lk.output_lock(out, "hold it"):
            taken.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert taken.wait(30)
        r = CliRunner().invoke(app, ["merge", cache, cache, "--out", str(out)], terminal_width=300)
    finally:
        release.set()
        t.join(30)
    assert r.exit_code == EXIT_ENVIRONMENT and f"pid {os.getpid()}" in r.output, (r.output, r.exception)

    real_open = os.open

    def no_lock_files(path, flags, *a, **k):  # a read-only --out directory (root ignores mode bits)
        if str(path).endswith(lk.LOCK_SUFFIX):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(lk.os, "open", no_lock_files)
    r = CliRunner().invoke(app, ["merge", cache, cache, "--out", str(tmp_path / "ro" / "m.zarr")], terminal_width=300)
    monkeypatch.undo()
    assert r.exit_code == EXIT_ENVIRONMENT, (r.output, r.exception)
    assert "m.zarr.lock" in r.output and "Permission denied" in r.output, r.output


DEADLINE_SCRIPT = """
import threading, time
import zarr.core.sync as zs
from kcache import shutdown

given = []
class SlowReader:
    def close(self, timeout=60.0):
        given.append(timeout)
        time.sleep(min(timeout, 5.0))
readers = [SlowReader(), SlowReader()]
for r in readers:
    shutdown.track(r)
stuck = threading.Event()
timer = threading.Timer(15, stuck.set)  # unblocks the task in any case (so the test fails, never hangs)
timer.daemon = True
timer.start()
fut = zs._get_executor().submit(stuck.wait)
t0 = time.monotonic()
shutdown.stop_background_threads(timeout=1.0)
print("TOOK", time.monotonic() - t0, "GIVEN", max(given), len(given), "POOL", zs._executor is None, flush=True)
stuck.set()
fut.result(30)
for r in readers:
    shutdown._tracked.discard(r)
# zarr is usable again afterwards (a fresh loop), and is left alone while another non-daemon thread runs
zs._get_loop()
busy = threading.Event()
worker = threading.Thread(target=busy.wait, args=(30,))
worker.start()
shutdown.stop_background_threads(timeout=1.0)
print("LOOP", zs.iothread[0] is not None and zs.iothread[0].is_alive(), flush=True)
busy.set()
worker.join(30)
"""


@pytest.mark.integration
def test_exit_cleanup_has_one_deadline_even_with_stuck_threads():
    """A tracked reader that takes long to close and a stuck zarr pool task cannot hold the exit:
    everything shares one deadline; zarr is left alone while another non-daemon thread runs.
    (In a subprocess: stopping zarr's loop would break this process's cached fsspec sessions.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", DEADLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    took, _, given, n, _, pool = r.stdout.split("\n")[0].split()[1:]
    assert float(took) < 3.0 and float(given) <= 1.0 and n == "2" and pool == "True", r.stdout
    assert "LOOP True" in r.stdout, r.stdout
