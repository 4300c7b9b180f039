"""2-D rotary position encoding with DINOv3's parametrisation (written for dinoreg from the DINOv3 paper's
description and checked against the official code's outputs, see docs/BACKBONE.md).

Each head's channels are split in four quarters of ``head_dim / 4`` frequencies: the first two quarters rotate
with the patch's row coordinate and its column coordinate, the last two repeat them (``rotate_half`` pairs channel
``i`` with ``i + head_dim / 2``). Coordinates are patch centres mapped to ``[-1, 1]``:

* ``normalize_coords``: ``separate`` divides rows by the grid's height and columns by its width, ``max`` and
  ``min`` divide both by the larger or smaller side (so a non-square image keeps square patches in ``max``);
* periods: ``base ** (4 i / head_dim)`` for ``i < head_dim / 4``, or log-spaced from ``min_period`` to
  ``max_period``; a persistent buffer ``periods``, as in the official state dicts;
* in training only, three augmentations of the coordinates, each drawn anew at every call (the official backbone
  calls once per block and crop group): ``shift_coords`` adds one uniform offset in ``[-s, s]`` per axis,
  ``jitter_coords`` scales each axis by its own log-uniform factor in ``[1/j, j]``, ``rescale_coords`` scales both
  axes by one log-uniform factor in ``[1/r, r]``. All three are off at evaluation.

The sines and cosines are computed in ``dtype`` (the official ``pos_embed_rope_dtype``), and queries and keys pass
through that dtype to be rotated, then are cast back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ROPE_NORMALIZATIONS = ("separate", "max", "min")
ROPE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Rope = tuple[Tensor, Tensor]  # (sin, cos), each [HW, head_dim]

__all__ = ["ROPE_DTYPES", "ROPE_NORMALIZATIONS", "Rope", "RopePositionEmbedding", "rope_periods", "rope_rotate"]


def _log_uniform(bound: float, count: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``count`` factors, log-uniform in ``[1/bound, bound]``."""
    return torch.empty(count, device=device, dtype=dtype).uniform_(-math.log(bound), math.log(bound)).exp()


def rope_periods(head_dim: int, *, base: float | None = None, min_period: float | None = None,
                 max_period: float | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``head_dim / 4`` periods: ``base ** (4 i / head_dim)``, or log-spaced from ``min_period`` to ``max_period``
    (computed in ``dtype`` as the official code does, so that a file's buffer can be matched exactly)."""
    quarter = head_dim // 4
    dd = {"device": device, "dtype": dtype}
    if base is not None:
        return base ** (2 * torch.arange(quarter, **dd) / (head_dim // 2))
    assert min_period is not None and max_period is not None
    ratio = max_period / min_period
    return ratio ** torch.linspace(0, 1, quarter, **dd) / ratio * max_period


class RopePositionEmbedding(nn.Module):
    """``forward(height=, width=)`` -> ``(sin, cos)`` ``[height * width, head_dim]`` for a grid of patches,
    rows first. No learned weights; ``periods`` is a buffer."""

    def __init__(self, embed_dim: int, *, num_heads: int, base: float | None = 100.0,
                 min_period: float | None = None, max_period: float | None = None,
                 normalize_coords: str = "separate", shift_coords: float | None = None,
                 jitter_coords: float | None = None, rescale_coords: float | None = None,
                 dtype: str = "fp32") -> None:
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RoPE needs embed_dim ({embed_dim}) divisible by 4 x num_heads ({num_heads})")
        periods_given = min_period is not None and max_period is not None
        if (base is None) == (not periods_given) or (min_period is None) != (max_period is None):
            raise ValueError("RoPE takes either base or both min_period and max_period "
                             f"(got base={base}, min_period={min_period}, max_period={max_period})")
        if normalize_coords not in ROPE_NORMALIZATIONS:
            raise ValueError(f"unknown normalize_coords {normalize_coords!r}; choose one of {ROPE_NORMALIZATIONS}")
        if dtype not in ROPE_DTYPES:
            raise ValueError(f"unknown RoPE dtype {dtype!r}; choose one of {tuple(ROPE_DTYPES)}")
        for name, value in (("shift_coords", shift_coords), ("jitter_coords", jitter_coords),
                            ("rescale_coords", rescale_coords)):
            if value is not None and (value <= 0 or (name != "shift_coords" and value < 1)):
                raise ValueError(f"{name} must be > 0 (jitter and rescale >= 1), got {value}")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.dtype = ROPE_DTYPES[dtype]
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=self.dtype), persistent=True)
        self.reset_parameters()

    @property
    def augments(self) -> bool:
        """Whether a forward pass in training draws random numbers (any coordinate augmentation is on)."""
        return any(v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def reset_parameters(self) -> None:
        """The periods the parametrisation gives (no random draw)."""
        periods = rope_periods(self.head_dim, base=self.base, min_period=self.min_period, max_period=self.max_period,
                               device=self.periods.device, dtype=self.dtype)
        with torch.no_grad():
            self.periods.copy_(periods)

    def coordinates(self, height: int, width: int) -> Tensor:
        """Patch centres ``[height * width, 2]`` (row, column) in ``[-1, 1]``, augmented in training."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            rows = torch.arange(0.5, height, **dd) / height
            cols = torch.arange(0.5, width, **dd) / width
        else:
            side = max(height, width) if self.normalize_coords == "max" else min(height, width)
            rows = torch.arange(0.5, height, **dd) / side
            cols = torch.arange(0.5, width, **dd) / side
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        if self.training:
            if self.shift_coords is not None:
                coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
            if self.jitter_coords is not None:
                coords = coords * _log_uniform(self.jitter_coords, 2, **dd)
            if self.rescale_coords is not None:
                coords = coords * _log_uniform(self.rescale_coords, 1, **dd)
        return coords

    def forward(self, *, height: int, width: int) -> Rope:
        angles = 2 * math.pi * self.coordinates(height, width)[:, :, None] / self.periods  # [HW, 2, head_dim/4]
        angles = angles.flatten(1).repeat(1, 2)  # [HW, head_dim]: (rows, cols, rows, cols) quarters
        return torch.sin(angles), torch.cos(angles)


def rope_rotate(x: Tensor, rope: Rope) -> Tensor:
    """Rotate the last ``HW`` tokens of ``x`` ``[B, heads, N, head_dim]`` (the patches; the class and storage
    tokens before them are not rotated). As the official code, all of ``x`` passes through the rope's dtype and
    back: with bf16 sines the class and storage tokens are rounded to bf16 too."""
    sin, cos = rope
    prefix = x.shape[-2] - sin.shape[-2]
    if prefix < 0:
        raise ValueError(f"RoPE for {sin.shape[-2]} patches given {x.shape[-2]} tokens")
    cast = x.to(sin.dtype)
    patches = cast[..., prefix:, :]
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((cast[..., :prefix, :], rotated), dim=-2).to(x.dtype)
