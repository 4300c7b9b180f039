"""The only collectives :mod:`dinoreg.ssl` uses; each is a no-op when ``torch.distributed`` is not
initialised, so the losses run unchanged in a single process (tests, CPU debugging)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "all_reduce_sum", "all_reduce_max"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor, *, async_op: bool = False):
    """Sum ``tensor`` in place over all ranks. Returns the work handle when ``async_op`` (None when
    not distributed: the tensor already holds the answer), else ``tensor``."""
    if not is_distributed():
        return None if async_op else tensor
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)
    return work if async_op else tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``tensor`` over all ranks, in place; returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
