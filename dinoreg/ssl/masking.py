"""iBOT block masking (BEiT style) and the per-batch mask sampling of DINOv2's collate.

Same semantics and, for the same ``random.Random`` state, the same masks as the official
``dinov2/data/masking.py`` and the mask part of ``dinov2/data/collate.py``. Differences:

* All randomness comes from an explicit ``rng`` (a ``random.Random``; the global ``random`` module
  when None, as the official code), so a resumed run can reproduce its masks.
* ``MaskingGenerator`` with neither ``num_masking_patches`` nor ``max_num_patches`` caps a block at
  the whole grid (the official code fails with a TypeError).
* The default generator of :func:`sample_masks` uses ``max_num_patches = 0.5 * H * W``. Official
  ``train.py`` writes ``0.5 * img_size // patch_size * img_size // patch_size``, which by operator
  precedence equals that only when ``img_size / 2`` is a multiple of ``patch_size`` (224/14: 128;
  518/14: 666 instead of 684.5). Pass ``generator=`` to reproduce the other value.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

__all__ = ["MaskingGenerator", "sample_masks"]


class MaskingGenerator:
    """Masks ~``num_masking_patches`` patches of an H x W grid as a union of random rectangles, each
    of >= ``min_num_patches`` and <= ``max_num_patches`` patches with aspect ratio in
    [min_aspect, max_aspect]; gives up on a block after 10 failed placements."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, block patches "
            f"[{self.min_num_patches}, {self.max_num_patches}], "
            f"aspect [{math.exp(self.log_aspect_ratio[0]):.3f}, {math.exp(self.log_aspect_ratio[1]):.3f}])"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng) -> int:
        """Try up to 10 random rectangles; mask the first that adds between 1 and
        ``max_mask_patches`` new patches. Returns how many patches it added (0: gave up)."""
        added = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]  # a view
                new_patches = h * w - int(block.sum())
                if 0 < new_patches <= max_mask_patches:
                    block[...] = True
                    added += new_patches
            if added > 0:
                break
        return added

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        """Bool [H, W]; at most ``num_masking_patches`` True (fewer when placement gives up)."""
        rng = random if rng is None else rng
        mask = np.zeros(self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            added = self._add_block(mask, max_mask_patches, rng)
            if added == 0:
                break
            mask_count += added
        return mask


def sample_masks(
    n_images: int,
    grid: tuple[int, int],
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    rng: random.Random | None = None,
    generator: MaskingGenerator | None = None,
) -> dict:
    """Masks for a batch of ``n_images`` global crops (the official collate's mask part).

    ``int(n_images * mask_sample_probability)`` images are masked; their target ratios are spread
    over the equal bins of [lo, hi] (one uniform draw per bin) so every batch sees easy and hard
    masks; the others are unmasked; the list is shuffled. Returns:

    * ``masks``: Bool [n_images, H * W]
    * ``mask_indices``: Long [M], flat indices into ``n_images * H * W``
    * ``masks_weight``: Float [M], 1 / (masked patches of that patch's image)
    * ``n_masked_patches``: Long [1], M
    * ``upperbound``: int >= M, sum over bins of int(H * W * bin_hi): a static buffer size
    """
    rng = random if rng is None else rng
    height, width = grid
    num_tokens = height * width
    if generator is None:
        generator = MaskingGenerator((height, width), max_num_patches=0.5 * num_tokens)
    n_masked_images = int(n_images * mask_sample_probability)
    # float32 like the official torch.linspace, so the targets match it bit for bit
    bin_edges = torch.linspace(*mask_ratio_min_max, n_masked_images + 1)  # [n_masked_images + 1]
    upperbound = 0
    masks_list = []
    for i in range(n_masked_images):
        ratio_lo, ratio_hi = bin_edges[i], bin_edges[i + 1]
        ratio = ratio_lo + (ratio_hi - ratio_lo) * rng.random()  # == random.uniform(lo, hi)
        masks_list.append(torch.from_numpy(generator(int(num_tokens * ratio), rng=rng)))
        upperbound += int(num_tokens * ratio_hi)
    for _ in range(n_masked_images, n_images):
        masks_list.append(torch.from_numpy(generator(0, rng=rng)))
    rng.shuffle(masks_list)

    masks = torch.stack(masks_list).flatten(1)  # [n_images, H * W]
    mask_indices = masks.flatten().nonzero().flatten()  # [M]
    per_image_weight = 1.0 / masks.sum(dim=-1).clamp(min=1.0)  # [n_images]
    masks_weight = per_image_weight.unsqueeze(-1).expand_as(masks)[masks]  # [M]
    return {
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), mask_indices.shape[0], dtype=torch.long),
        "upperbound": upperbound,
    }
