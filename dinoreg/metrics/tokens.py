"""Patch-token norms of a backbone's block outputs: the measure behind the high-norm "artifact" tokens of
Darcet et al. (2023), shared by the live monitor (:mod:`dinoreg.train.monitor`) and ``dinoreg analyze``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["patch_norms"]


def patch_norms(block_outputs: list[Tensor], num_register_tokens: int) -> Tensor:
    """``[L, B, HW]``: the norm of every patch token in each block output ``[B, 1 + R + HW, D]``."""
    return torch.stack([out[:, 1 + num_register_tokens:].float().norm(dim=-1) for out in block_outputs])
