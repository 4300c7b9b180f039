"""The one process module: where this process stands in a job, and the collectives the package uses.

* ``detect_environment()`` reads the launcher's variables (single process, torchrun, or a SLURM ``srun``
  task) and never guesses: a half-set environment (say ``RANK`` without ``WORLD_SIZE``) is an error naming
  what is missing, because a job that silently trains as N independent single-process runs wastes a whole
  allocation. ``process_device`` and ``init_distributed`` set up the device and the process group.
* ``rank()``, ``world_size()`` and every reduction below work without a process group too: one process is
  world size 1 and each reduction is then a no-op, so the losses, the loop and the evaluations run
  unchanged in tests and on a laptop.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from dinoreg.errors import InputError

__all__ = ["DistributedEnvironment", "DistributedSetupError", "all_reduce_max", "all_reduce_sum",
           "backend_device", "barrier", "broadcast_flag", "detect_environment", "first_host", "gather_rows_to_main",
           "init_distributed", "is_distributed", "max_over_ranks", "mean_over_ranks", "process_device", "rank",
           "shutdown_distributed", "world_size"]

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM_KEYS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


class DistributedSetupError(InputError, RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistributedEnvironment:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "single" | "torchrun" | "slurm"
    group_of_one: bool = False  # one process that still runs under a process group (train.fsdp=always)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Runs under a process group: several processes, or one process asked to shard (``group_of_one``)."""
        return self.world_size > 1 or self.group_of_one


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


def process_device(env: DistributedEnvironment) -> torch.device:
    """This process's device: ``cuda:<local rank>`` (made current) when there are GPUs, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(env: DistributedEnvironment, device: torch.device, *, timeout_min: float = 30) -> None:
    """Create the default process group (nccl on GPU, gloo on CPU) when the job has several processes, or a group
    of one process (``env.group_of_one``: an in-memory store, no port) when one process is asked to shard."""
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if env.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        return
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_min),
                            device_id=device if device.type == "cuda" else None)


def shutdown_distributed() -> None:
    global _HOST_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None


_HOST_GROUP = None


def _host_group():
    """The group for values the host already holds (flags, signals): a gloo group beside an nccl default group, so
    that agreeing on them never waits for the GPU's queued work; None (the default group) when that is gloo."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:  # created lazily, at a collective every rank reaches in the same order
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


# --------------------------------------------------------------------------------------------------
# rank, world size and collectives: each works (as a no-op) without a process group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend_device() -> torch.device:
    """Where the process group's tensors must live: the current GPU for nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, *, async_op: bool = False):
    """Sum ``tensor`` in place over all ranks. Returns the work handle when ``async_op`` (None in one process:
    the tensor already holds the answer), else ``tensor``."""
    if not is_distributed():
        return None if async_op else tensor
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)
    return work if async_op else tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``tensor`` over all ranks, in place; returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all ranks, in one collective and without reading it on the host
    (``tensor`` itself in one process); on ``tensor``'s device."""
    if not is_distributed():
        return tensor
    return (all_reduce_sum(tensor.to(backend_device())) / world_size()).to(tensor.device)


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over all ranks (``value`` itself in a single process), agreed on by the hosts: it
    does not synchronise with the device."""
    if not is_distributed():
        return value
    flag = torch.tensor([float(value)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group())
    return flag.item()


def gather_rows_to_main(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows ``local [m_r, ...]`` concatenated in rank order on the main rank (on the CPU); the
    other ranks get an empty tensor. Shards may differ in size, and be empty: each is padded to the largest
    for the collective. In one process: ``local`` itself."""
    if not is_distributed():
        return local
    device, world = backend_device(), world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=device))
    sizes = [int(count.item()) for count in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]), device=device)
    padded[:local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)] if rank() == 0 else None
    dist.gather(padded.contiguous(), parts, dst=0)
    if rank() != 0:
        return local[:0].cpu()
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


def broadcast_flag(flag: bool) -> bool:
    """True on every rank when any rank passes True."""
    return max_over_ranks(1.0 if flag else 0.0) > 0
