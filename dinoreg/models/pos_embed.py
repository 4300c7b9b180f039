"""Resampling of the learned positional embedding to other grid sizes.

Two official families exist and both must be reproduced bit for bit:

* registers models (``interpolate_antialias=True, interpolate_offset=0.0``): bicubic resize
  to the target grid size with antialiasing. Darcet et al. (Fig. 11) show that without
  antialiasing the gradient flowing back through a downsampling resize is striped.
* legacy models (``interpolate_antialias=False, interpolate_offset=0.1``): bicubic resize
  given by ``scale_factor = (grid + 0.1) / M``, an offset kept from DINO to avoid floating
  point errors in the output size; the scale factor (not the size) drives the sampling grid.

The computation is done in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_patch_pos_embed(
    patch_pos_embed: torch.Tensor,
    grid_size: tuple[int, int],
    *,
    antialias: bool,
    offset: float,
) -> torch.Tensor:
    """Resize a square grid of positional embeddings ``[1, M*M, D]`` to ``[1, H*W, D]``.

    ``grid_size`` is ``(H, W)`` in patches (rows, columns). Returns fp32.
    """
    num_patches, dim = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"pos_embed covers {num_patches} patches, which is not a square grid")
    rows, cols = grid_size
    grid = patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if offset:
        scale = (float(rows + offset) / side, float(cols + offset) / side)  # floats: also under jit tracing
        resized = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        resized = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"pos_embed resize produced {tuple(resized.shape[-2:])}, expected {(rows, cols)}")
    return resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    grid_size: tuple[int, int],
    *,
    antialias: bool,
    offset: float,
) -> torch.Tensor:
    """Resample ``[1, 1 + M*M, D]`` (cls first) to ``grid_size``; identity when it already fits.

    The result has the dtype of ``pos_embed``; the resize itself runs in fp32.
    """
    side = int(math.sqrt(pos_embed.shape[1] - 1))
    if tuple(grid_size) == (side, side):
        return pos_embed
    patch = resample_patch_pos_embed(pos_embed[:, 1:], grid_size, antialias=antialias, offset=offset)
    return torch.cat((pos_embed[:, :1].float(), patch), dim=1).to(pos_embed.dtype)
