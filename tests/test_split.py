"""Group-wise re-splitting, DREAM's reference preprocessing, pipeline configs, thread choice."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from kcache.data.convert import ConvertError, convert, reference_dream_line
from kcache.data.samples import SampleError, read_samples, samples_from_records
from kcache.data.split import group_keys, split_by_group

FIX = Path(__file__).resolve().parent / "fixtures" / "datasets"
ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data"


def _records(groups: dict[str, int]) -> pa.Table:
    recs = []
    for g, n in groups.items():
        for q in range(n):
            recs.append({"id": f"d-{g}-{q}", "dataset": "d", "split": "validation", "knowledge": [f"dialogue {g}"],
                         "source": f"question {q}?", "target": " answer.", "meta": json.dumps({"dialogue_id": g})})
    return samples_from_records(recs, "test")


def test_split_keeps_groups_whole_and_meets_the_sizes():
    table = _records({f"g{i}": 1 + i % 3 for i in range(40)})
    out = split_by_group(table, {"train": 20, "validation": 5, "test": 10}, "dialogue_id", seed=3)
    split_of: dict[str, set] = {}
    for g, s in zip(group_keys(out, "dialogue_id"), out["split"].to_pylist()):
        split_of.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in split_of.values())  # no group in two splits
    counts = {s: out["split"].to_pylist().count(s) for s in ("train", "validation", "test")}
    assert counts["train"] >= 20 and counts["validation"] >= 5 and counts["test"] >= 10
    # whole groups, then stop
    assert counts["train"] < 20 + 3 and counts["validation"] < 5 + 3 and counts["test"] < 10 + 3
    again = split_by_group(table, {"train": 20, "validation": 5, "test": 10}, "dialogue_id", seed=3)
    assert again.equals(out)
    other = split_by_group(table, {"train": 20, "validation": 5, "test": 10}, "dialogue_id", seed=4)
    assert other["id"].to_pylist() != out["id"].to_pylist() or other["split"].to_pylist() != out["split"].to_pylist()


def test_split_refuses_too_few_samples_and_falls_back_to_ids():
    table = _records({"a": 2, "b": 2})
    with pytest.raises(SampleError, match="ask for 10"):
        split_by_group(table, {"train": 5, "validation": 3, "test": 2}, "dialogue_id")
    with pytest.raises(SampleError, match="not enough groups"):
        split_by_group(table, {"train": 3, "validation": 0, "test": 1}, "dialogue_id")
    assert group_keys(table, "no_such_field") == table["id"].to_pylist()


def test_split_command(tmp_path):
    from kcache.cli import app
    from kcache.data.samples import write_samples

    write_samples(_records({f"g{i}": 2 for i in range(10)}), tmp_path / "in.parquet")
    r = CliRunner().invoke(app, ["data", "split", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out.parquet"),
                                 "--sizes", "8,4,4"])
    assert r.exit_code == 0, r.output
    assert "train 8, validation 4, test 4" in r.output
    assert read_samples(tmp_path / "out.parquet").num_rows == 16
    bad = CliRunner().invoke(app, ["data", "split", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "o2.parquet"),
                                   "--sizes", "8,4"])
    assert bad.exit_code == 2 and "three integers" in bad.output


def test_dream_reference_preprocessing(tmp_path):
    rep = convert("dream", FIX / "dream" / "dev.json", tmp_path / "ref.parquet", reference=True)
    rows = {r["id"]: r for r in read_samples(tmp_path / "ref.parquet").to_pylist()}
    assert rep.dropped == {"answer not among choices": 1,
                           "not the dialogue's first question (reference preprocessing)": 1}
    r = rows["dream-validation-1-101-0"]
    assert r["knowledge"][0] == "Man: Excuse me, is this the way to the harbour museum?"
    assert r["knowledge"][1].startswith("Woman: Yes")
    assert reference_dream_line("W: hi") == "Woman: hi" and reference_dream_line("Mary: hi") == "Mary: hi"
    with pytest.raises(ConvertError, match="defined for dream only"):
        convert("folio", FIX / "folio" / "folio-validation.jsonl", tmp_path / "f.parquet", reference=True)


@pytest.mark.skipif(not (REAL / "dream" / "dev.json").exists(),
                    reason="../shared/data/dream/dev.json is not here (raw data lives outside the repo)")
def test_dream_reference_preprocessing_on_the_real_file(tmp_path):
    rep = convert("dream", REAL / "dream" / "dev.json", tmp_path / "ref.parquet", reference=True)
    assert rep.rows_out < rep.rows_in
    rows = read_samples(tmp_path / "ref.parquet").to_pylist()
    assert all(json.loads(r["meta"])["question_index"] == 0 and "_" not in r["source"] for r in rows)
    assert not any(k.startswith(("W:", "M:")) for r in rows for k in r["knowledge"])


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").rglob("*.toml")), ids=lambda p: p.name)
def test_every_pipeline_config_loads_and_builds_its_configs(path):
    # every section built the way `kcache run` builds it (tests/test_config.py checks the errors)
    from kcache.pipeline import load_config, load_pipeline

    cfg = load_config(path)
    assert cfg["run"]["dir"]
    built = load_pipeline(path)
    assert set(built) - {"path", "raw", "run", "data"} == set(cfg) - {"run", "data"}
    assert tomllib.loads(path.read_text()) == cfg == built["raw"]


def test_set_threads_warns_when_oversubscribed(monkeypatch):
    import torch

    from kcache import runtime

    n = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "free_cores", lambda: 1)
        seen = []
        assert runtime.set_threads(2, warn=seen.append) == 2
        assert seen and "--threads 1" in seen[0]
        seen.clear()
        assert runtime.set_threads(1, warn=seen.append) == 1 and not seen
        with pytest.raises(ValueError, match=">= 1"):
            runtime.set_threads(0)
    finally:
        torch.set_num_threads(n)
    assert runtime.available_cores() >= 1


def test_busy_cores_come_from_two_proc_stat_readings():
    """The free-core count is measured now (two /proc/stat readings), not from the lagging load average."""
    from kcache import runtime

    before = runtime.cpu_times("cpu  9 0 9 9 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 50 0 50 100 0 0 0 0\n"
                               "cpu2 0 0 0 0 0 0 0 0\nintr 5 6\n")
    after = runtime.cpu_times("cpu  9 0 9 9 0 0 0 0\ncpu0 190 0 10 100 0 0 0 0\ncpu1 50 0 50 200 0 0 0 0\n"
                              "cpu2 0 0 0 0 0 0 0 50\nintr 7 8\n")
    assert set(before) == {0, 1, 2} and before[1] == (100, 200)
    assert runtime.busy_between(before, after, {0, 1, 2}) == pytest.approx(1.0)  # cpu0 all busy, cpu1 idle
    assert runtime.busy_between(before, after, {1}) == 0.0  # only this process's CPUs count
    assert runtime.busy_between(before, after, {2}) == 0.0  # steal is not this machine's work
    busy = runtime.busy_cores(0.01)
    assert busy is None or 0.0 <= busy <= runtime.affinity_cores() + 1e-6


def test_a_cpu_quota_bounds_the_free_cores_after_the_hosts_busy_cpus(monkeypatch):
    """/proc/stat counts the whole host: busy host CPUs come off the affinity set, the quota applies after."""
    from kcache import runtime

    monkeypatch.setattr(runtime, "affinity_cores", lambda: 64)
    monkeypatch.setattr(runtime, "quota_cores", lambda: 8)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 40.0)
    assert runtime.available_cores() == 8 and runtime.free_cores() == 8
    monkeypatch.setattr(runtime, "busy_cores", lambda: 60.2)
    assert runtime.free_cores() == 4
    monkeypatch.setattr(runtime, "busy_cores", lambda: 64.0)
    assert runtime.free_cores() == 1
    monkeypatch.setattr(runtime, "quota_cores", lambda: None)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 40.0)
    assert runtime.available_cores() == 64 and runtime.free_cores() == 24


def test_default_threads_are_the_free_cores_unless_the_user_chose(monkeypatch):
    import torch

    from kcache import runtime

    n = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "_default_threads", 4)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(runtime, "free_cores", lambda: 3)
        assert runtime.set_threads(None) == 3  # fewer free cores than torch's default: the free ones
        monkeypatch.setattr(runtime, "free_cores", lambda: 8)
        assert runtime.set_threads(None) == 4  # never above torch's default (physical cores)
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert runtime.set_threads(None) == 2  # the user's OMP_NUM_THREADS stands
    finally:
        torch.set_num_threads(n)


_REFILL = """
import json, os, resource, sys
import numpy as np
from kcache.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
(getattr(np, "_core", None) or np.core).multiarray._set_madvise_hugepage(False)  # 4 KiB pages: faults counted
faults = []
for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(64 << 20, dtype=np.uint8)  # 16,384 pages, each written; above glibc's mmap thresholds
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"applied": applied, "faults": faults[1:]}))
"""


def _refill(mode: str, **env) -> dict:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"} | env
    out = subprocess.run([sys.executable, "-c", _REFILL, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.integration
@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults_once_kept():
    """The CLI's ``keep_freed_memory``: a 64 MiB block freed and allocated again comes back from the
    heap, not from fresh zeroed pages (in a child process: the setting is process-wide)."""
    plain = _refill("plain")
    # glibc's default: the block is unmapped and faults back in (16,384 pages; ~32 where the kernel
    # backs every large mapping with 2 MiB pages)
    assert min(plain["faults"]) >= 32
    kept = _refill("keep")
    assert kept["applied"] is True and 10 * max(kept["faults"]) < min(plain["faults"])
    # a user's own malloc tuning is left alone
    assert _refill("keep", MALLOC_ARENA_MAX="2")["applied"] is False
    assert _refill("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")["applied"] is False
