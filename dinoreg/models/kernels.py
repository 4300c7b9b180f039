"""The optional xformers kernels: whether xformers is importable here, and the functions of it the layers call
(fused attention, its block-diagonal mask, fused SwiGLU). Decided once per layer, when it is built."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

from torch import Tensor


@functools.lru_cache(maxsize=1)
def xformers_ops():
    """Return ``xformers.ops`` or an ImportError explaining why it cannot be used."""
    try:
        import xformers.ops as ops  # noqa: PLC0415 (optional dependency)
    except Exception as error:  # a broken xformers build raises more than ImportError
        return ImportError(f"xformers is not importable ({type(error).__name__}: {error})")
    return ops


class XformersKernels(NamedTuple):
    """The xformers functions the layers call. A layer that may use xformers looks them up once, when it is built
    (``xformers_kernels``), and keeps them as a plain attribute: its forward pass then branches on that attribute
    and on the input's device only, which ``torch.compile`` traces without a graph break (the import attempt
    inside a compiled branch broke the graph, issue 25). Functions, not the module: a layer stays deep-copyable."""

    memory_efficient_attention: Callable[..., Tensor]
    block_diagonal_mask: Callable[..., object]  # fmha.BlockDiagonalMask.from_seqlens
    swiglu: Callable[..., Tensor]


def xformers_kernels() -> XformersKernels | str:
    """The kernels of an importable xformers, else the reason it cannot be used (for the fallback's warning)."""
    ops = xformers_ops()
    if isinstance(ops, ImportError):
        return str(ops)
    try:
        return XformersKernels(ops.memory_efficient_attention, ops.fmha.BlockDiagonalMask.from_seqlens, ops.swiglu)
    except AttributeError as error:  # an xformers too old for these layers
        return f"xformers is not usable ({error})"


__all__ = ["XformersKernels", "xformers_kernels", "xformers_ops"]
