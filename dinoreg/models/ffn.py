"""The feed-forward layers of a block: DINOv2's MLP and SwiGLU (packed ``w12``, optionally xformers' fused
kernel), DINOv3's split SwiGLU, and their hidden widths (the official checkpoints' shapes)."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from dinoreg.models.kernels import XformersKernels, xformers_kernels

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, *, bias: bool = True,
                 act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(hidden_features: int) -> int:
    """The official fused SwiGLU keeps 2/3 of the MLP width, rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU with the official packed layout: ``w12`` holds [w1; w2], ``w3`` projects back.

    With ``fused=True`` xformers' fused kernel is used on CUDA when importable; the math is the same.
    """

    def __init__(self, in_features: int, hidden_features: int, *, bias: bool = True, fused: bool = False) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)
        self.fused = fused  # see the setter: xformers' availability is decided there

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        """Decides once whether xformers is importable (``xformers``: its kernels, or None), so that no forward
        pass, compiled or not, tries the import."""
        self._fused = value
        kernels = xformers_kernels() if value else None
        self.xformers = kernels if isinstance(kernels, XformersKernels) else None

    def forward(self, x: Tensor) -> Tensor:
        if self.xformers is not None and x.is_cuda:
            w1, w2 = self.w12.weight.chunk(2, dim=0)
            b1, b2 = self.w12.bias.chunk(2) if self.w12.bias is not None else (None, None)
            return self.xformers.swiglu(x, w1, b1, w2, b2, self.w3.weight, self.w3.bias)
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def aligned_swiglu_hidden(hidden_features: int, align_to: int) -> int:
    """DINOv3's SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of ``align_to`` (8 for ``swiglu``,
    32/64/128 for ``swiglu32/64/128``)."""
    hidden = int(hidden_features * 2 / 3)
    return hidden + (-hidden % align_to)


class SplitSwiGLUFFN(nn.Module):
    """DINOv3's SwiGLU layout: separate ``w1`` (gate) and ``w2`` (value) projections, ``w3`` back."""

    def __init__(self, in_features: int, hidden_features: int, *, bias: bool = True, align_to: int = 8) -> None:
        super().__init__()
        hidden = aligned_swiglu_hidden(hidden_features, align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias)
        self.w2 = nn.Linear(in_features, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


__all__ = ["FFN_LAYERS", "Mlp", "SplitSwiGLUFFN", "SwiGLUFFN", "aligned_swiglu_hidden", "swiglu_hidden_features"]
