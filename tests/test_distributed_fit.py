"""Stage two on several processes (layer-parallel, gloo on CPU) ends exactly as in one process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_dec

from kcache.cache import CacheError
from kcache.data.synth import synth_samples
from kcache.extract import ExtractConfig, extract
from kcache.fit import FitConfig, fit_encoders, layers_of_rank

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs gloo")

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
CFG = FitConfig(**TINY, epochs=2, batch_size=4, eval_every=3, checkpoint_every=2, patience=100)
ROOT = Path(__file__).resolve().parents[1]

# One rank: what `torchrun -m kcache fit-encoders` runs, minus the CLI. Single-threaded so that the
# processes compute exactly what the single-process reference computes.
WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from kcache.fit import FitConfig, fit_encoders
cache, out, cfg, crash_at = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
cfg["betas"] = tuple(cfg["betas"])

def on_step(step):
    if step == crash_at:
        raise SystemExit(17)  # every rank stops at the same step, as after a kill of the job

s = fit_encoders(cache, out, FitConfig(**cfg), progress=False, on_step=on_step)
print("SUMMARY", json.dumps({k: s[k] for k in ("best_step", "steps", "stopped")}))
torch.distributed.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cache, out, cfg: FitConfig, world: int = 2, crash_at: int = -1) -> list[subprocess.CompletedProcess]:
    """Start ``world`` ranks the way torchrun would (env vars) and wait for all of them."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
               "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(cache), str(out),
                                       json.dumps(dataclasses.asdict(cfg)), str(crash_at)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return done


@pytest.fixture(scope="module")
def cache3(tmp_path_factory, tokenizer_nobos):
    out = tmp_path_factory.mktemp("dfit") / "c.zarr"
    dec = tiny_dec("llama", tokenizer_nobos)
    extract(dec, synth_samples(24, seed=9), out, ExtractConfig(layers="1-3", dtype="float32", chunk_rows=64,
                                                               shard_rows=128), progress=False)
    return out


@pytest.fixture(scope="module")
def reference(cache3, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "e"
    fit_encoders(cache3, out, CFG, progress=False)
    return out


def assert_same_result(a: Path, b: Path, resumed: bool = False):
    assert (a / "encoders.safetensors").read_bytes() == (b / "encoders.safetensors").read_bytes()
    if resumed:  # the running train-MSE mean is not checkpointed (in one process either): compare the rest
        ha, hb = (json.loads((d / "history.json").read_text()) for d in (a, b))
        assert ([{k: v for k, v in h.items() if k != "train_mse"} for h in ha]
                == [{k: v for k, v in h.items() if k != "train_mse"} for h in hb])
    else:
        assert (a / "history.json").read_text() == (b / "history.json").read_text()
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ca.items() if k != "created"} == {k: v for k, v in cb.items() if k != "created"}
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["best_step"] is not None and sa["steps"] == 10
    timing = ("wall_seconds", "data_wait_seconds", "tokens_per_second", "bundle")
    assert {k: v for k, v in sa.items() if k not in timing} == {k: v for k, v in sb.items() if k not in timing}
    assert {p.name for p in a.iterdir()} == {p.name for p in b.iterdir()}


def test_dist_env(monkeypatch):
    from kcache.distributed import dist_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
              "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert dist_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a batch script itself: still one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert dist_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # inside srun
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist_env() == (3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun wins
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == (1, 2, 1)


def test_layers_are_dealt_round_robin():
    assert [layers_of_rank([1, 2, 3], r, 2) for r in range(2)] == [[1, 3], [2]]
    assert layers_of_rank([4, 5], 0, 1) == [4, 5]


@pytest.mark.integration
def test_two_processes_match_one(cache3, reference, tmp_path):
    runs = launch(cache3, tmp_path / "e", CFG)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads(r.stdout.split("SUMMARY", 1)[1]) for r in runs]
    assert summaries[0] == summaries[1]  # every rank took the same decisions
    ref = json.loads((reference / "summary.json").read_text())
    assert summaries[0]["best_step"] == ref["best_step"] and summaries[0]["steps"] == ref["steps"]
    assert_same_result(reference, tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e" / "checkpoint").iterdir()) == [
        "rank-00000-of-00002", "rank-00000-of-00002.best", "rank-00001-of-00002", "rank-00001-of-00002.best"]
    # a single process must not take over (or wipe) a two-process checkpoint
    with pytest.raises(CacheError, match=r"checkpoint of a run on 2 process\(es\), this run has 1"):
        fit_encoders(cache3, tmp_path / "e", CFG, progress=False)


@pytest.mark.integration
def test_two_processes_resume_after_crash(cache3, reference, tmp_path):
    runs = launch(cache3, tmp_path / "e", CFG, crash_at=7)  # last checkpoint at step 6, mid-epoch
    assert all(r.returncode == 17 for r in runs), [r.stderr[-3000:] for r in runs]
    states = [json.loads((tmp_path / "e" / "checkpoint" / f"rank-0000{r}-of-00002" / "state.json").read_text())
              for r in range(2)]
    assert [(s["step"], s["epoch"]) for s in states] == [(6, 1), (6, 1)]
    runs = launch(cache3, tmp_path / "e", CFG)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same_result(reference, tmp_path / "e", resumed=True)
