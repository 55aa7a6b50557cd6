"""Tiny helpers for running a stage on several processes (torchrun, SLURM ``srun``).

Every helper is a no-op (or the identity) in a single process, so code written with them runs
unchanged without a launcher. Only ``torch.distributed`` collectives are used: nothing is
pickled between processes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; under ``srun`` without torchrun the SLURM
    variables say the same thing. The world size is SLURM_STEP_NUM_TASKS (set by ``srun`` for
    its step), not SLURM_NTASKS: a batch script itself sees SLURM_NTASKS=N and SLURM_PROCID=0,
    and a plain command there must not wait for N - 1 processes that never come.
    """
    env = os.environ
    if "WORLD_SIZE" in env:
        rank, world = int(env.get("RANK", 0)), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local = int(env.get("SLURM_LOCALID", rank))
    else:
        return 0, 1, 0
    if not 0 <= rank < world:
        raise RuntimeError(f"bad distributed environment: rank {rank} of world size {world}")
    return rank, world, local


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group when the environment names more than one process.

    Backend: nccl when CUDA is available, gloo otherwise. Needs MASTER_ADDR / MASTER_PORT (set by
    torchrun; under bare ``srun`` set them yourself). Idempotent; returns ``dist_env()``.
    """
    rank, world, local = dist_env()
    if world > 1 and not active():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place, and return it (wherever it lives: NCCL
    needs CUDA tensors, so a CPU tensor makes a round trip through the current GPU)."""
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        t = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        tensor.copy_(t.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
