"""Where this process stands in a job: single process, torchrun, or SLURM ``srun``; process-group set-up.

``detect_environment()`` reads the launcher's variables and never guesses: a half-set environment (say
``RANK`` without ``WORLD_SIZE``) is an error naming what is missing, because a job that silently trains
as N independent single-process runs wastes a whole allocation.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["DistributedEnvironment", "DistributedSetupError", "detect_environment", "first_host",
           "init_distributed", "shutdown_distributed", "all_reduce_max", "all_reduce_mean", "barrier",
           "broadcast_flag"]

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM_KEYS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


class DistributedSetupError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistributedEnvironment:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "single" | "torchrun" | "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``."""
    match = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise DistributedSetupError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise DistributedSetupError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect_environment(environ: Optional[Mapping[str, str]] = None) -> DistributedEnvironment:
    """torchrun variables win when set; else SLURM task variables (inside ``srun``); else one process."""
    environ = os.environ if environ is None else environ
    present = [key for key in _TORCHRUN_KEYS if key in environ]
    if any(key in environ for key in _TORCHRUN_KEYS[:3]):  # MASTER_* alone may be set for srun jobs
        missing = [key for key in _TORCHRUN_KEYS if key not in environ]
        if missing:
            raise DistributedSetupError(
                f"partial torchrun environment: {', '.join(present)} set but {', '.join(missing)} missing; "
                "launch with torchrun (which sets all of them), or unset them for a single process")
        env = DistributedEnvironment(rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK"),
                                     world_size=_int(environ, "WORLD_SIZE"), master_addr=environ["MASTER_ADDR"],
                                     master_port=_int(environ, "MASTER_PORT"), source="torchrun")
    elif "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:  # a task of srun, not the batch script
        missing = [key for key in _SLURM_KEYS if key not in environ]
        if missing:
            raise DistributedSetupError(f"partial SLURM environment: {', '.join(missing)} missing; run the "
                                        "training under srun (one task per GPU)")
        job_id = _int(environ, "SLURM_JOB_ID")
        # A port per job, so two jobs sharing a node never collide; MASTER_PORT overrides it.
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 20000 + job_id % 20000
        env = DistributedEnvironment(rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID"),
                                     world_size=_int(environ, "SLURM_NTASKS"),
                                     master_addr=environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"]),
                                     master_port=port, source="slurm")
    else:
        return DistributedEnvironment()
    if not (env.world_size >= 1 and 0 <= env.rank < env.world_size and env.local_rank >= 0):
        raise DistributedSetupError(f"inconsistent {env.source} environment: rank {env.rank}, local rank "
                                    f"{env.local_rank}, world size {env.world_size}")
    return env


def init_distributed(env: DistributedEnvironment, device: torch.device, *, timeout_min: float = 30) -> None:
    """Create the default process group (nccl on GPU, gloo on CPU) when the job has several processes."""
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_min),
                            device_id=device if device.type == "cuda" else None)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """The mean over ranks of each scalar, in one collective; plain floats in a single process."""
    names = list(values)
    if not names:
        return {}
    packed = torch.stack([torch.as_tensor(values[n], dtype=torch.float64).detach().cpu().reshape(())
                          for n in names])
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed / dist.get_world_size()
    return dict(zip(names, packed.cpu().tolist()))


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over all ranks (``value`` itself in a single process)."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def broadcast_flag(flag: bool) -> bool:
    """True on every rank when any rank passes True."""
    return all_reduce_max(1.0 if flag else 0.0) > 0
