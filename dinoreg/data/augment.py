"""DINOv2 multi-crop augmentation, split where each half runs best.

- :class:`MultiCropGeometric` (per sample, in DataLoader workers, PIL): 2 global + n local
  RandomResizedCrops (torchvision's parameter sampling, bicubic) with horizontal flips, returned as
  uint8 tensors so workers ship 4x fewer bytes than float.
- :class:`Photometric` (batched, on the training device, kornia): colour jitter, grayscale, Gaussian
  blur, solarisation, ImageNet normalisation, with DINOv2's per-view probabilities.

Official bug, reproduced on request: DINOv2's ``GaussianBlur`` wrapper passes ``1 - p`` to
``RandomApply``, so the released weights were trained with blur probabilities 0 / 0.9 / 0.5
(global view 1 / global view 2 / local) instead of the intended 1.0 / 0.1 / 0.5 used here by default.
Set ``crops.blur_prob_global1=0.0 crops.blur_prob_global2=0.9`` to reproduce the released training.
"""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence, Tuple

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_resized_crop_params(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: random.Random,
) -> Tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``, re-implemented on a ``random.Random``.

    Returns ``(top, left, crop_height, crop_width)``: 10 attempts at a box of area ``U(scale) * W * H`` and
    log-uniform aspect ratio in ``ratio`` that fits in the image, else the central crop at the clamped ratio.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class MultiCropGeometric:
    """The geometric half of DINOv2's ``DataAugmentationDINO``: crops and flips, no colour.

    ``__call__(image, rng)`` -> ``{"global_crops": [2 x uint8 [3, G, G]], "local_crops": [n x uint8 [3, L, L]]}``.
    Each crop draws its box then its flip from ``rng``, in the order global 1, global 2, locals, so a
    seeded ``rng`` makes the crops reproducible. Images smaller than a crop are upscaled. With
    ``undistorted_crops_size`` T, also ``"gram_crops": [2 x uint8 [3, T, T]]``: the global crops' boxes and flips
    cut at T pixels (DINOv3's Gram-teacher crops without distortions), with no extra draw.
    """

    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(
        self,
        global_crops_size: int,
        local_crops_size: int,
        local_crops_number: int,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        undistorted_crops_size: Optional[int] = None,
    ):
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.undistorted_crops_size = None if undistorted_crops_size is None else int(undistorted_crops_size)

    @property
    def min_source_side(self) -> int:
        """Smallest source side at which even the smallest, most elongated crop keeps >= 1 source pixel per
        output pixel; a JPEG may be decoded at a reduced scale (``Image.draft``) down to this side."""
        global_size = max(self.global_crops_size, self.undistorted_crops_size or 0)
        needs = [global_size / math.sqrt(self.global_crops_scale[0] * min(self.ratio))]
        if self.local_crops_number > 0:
            needs.append(self.local_crops_size / math.sqrt(self.local_crops_scale[0] * min(self.ratio)))
        return int(math.ceil(max(needs)))

    def random_resized_crop(self, image: Image.Image, size: int, scale: Sequence[float],
                            rng: random.Random) -> torch.Tensor:
        return self.random_resized_crops(image, (size,), scale, rng)[0]

    def random_resized_crops(self, image: Image.Image, sizes: Sequence[int], scale: Sequence[float],
                             rng: random.Random) -> List[torch.Tensor]:
        """One box and flip drawn from ``rng``, cut at each of ``sizes`` (bicubic)."""
        width, height = image.size
        top, left, h, w = sample_resized_crop_params(width, height, scale, self.ratio, rng)
        crops = [image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)) for size in sizes]
        if rng.random() < 0.5:
            crops = [crop.transpose(Image.FLIP_LEFT_RIGHT) for crop in crops]
        return [pil_to_uint8_tensor(crop) for crop in crops]

    def __call__(self, image: Image.Image, rng: random.Random) -> Dict[str, List[torch.Tensor]]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        sizes = (self.global_crops_size,) + ((self.undistorted_crops_size,) if self.undistorted_crops_size else ())
        views = [self.random_resized_crops(image, sizes, self.global_crops_scale, rng) for _ in range(2)]
        local_crops = [self.random_resized_crop(image, self.local_crops_size, self.local_crops_scale, rng)
                       for _ in range(self.local_crops_number)]
        crops = {"global_crops": [view[0] for view in views], "local_crops": local_crops}
        if self.undistorted_crops_size:
            crops["gram_crops"] = [view[1] for view in views]
        return crops

    def __repr__(self) -> str:
        return (f"MultiCropGeometric(global={self.global_crops_size}px x2 scale={self.global_crops_scale}, "
                f"local={self.local_crops_size}px x{self.local_crops_number} scale={self.local_crops_scale})")


def _adjust_hue_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    # torchvision's hue factor is in turns ([-0.5, 0.5]); kornia's adjust_hue takes radians
    return adjust_hue(images, turns * (2 * math.pi))


class RandomColorJitter(nn.Module):
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)`` on a float batch in [0, 1].

    kornia's ``ColorJitter`` (0.9) uses torchvision's formulas and factor ranges but draws *one*
    application order per call, shared by the whole batch; torchvision draws one per image. This module
    keeps per-image orders: factors and orders are drawn per image (CPU, torch's global generator), then
    for each of the 4 steps every image gets its own adjustment, applied with the same kornia.enhance
    functions kornia's ``ColorJitter`` uses (16 sub-batch calls, about one pass of compute in total).
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float):
        super().__init__()
        self.p = p
        self.ranges = (
            (max(0.0, 1 - brightness), 1 + brightness),
            (max(0.0, 1 - contrast), 1 + contrast),
            (max(0.0, 1 - saturation), 1 + saturation),
            (-hue, hue),
        )
        self.steps = (
            adjust_brightness_accumulative,
            adjust_contrast_with_mean_subtraction,
            adjust_saturation_with_gray_subtraction,
            _adjust_hue_turns,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] float in [0, 1]
        n = images.shape[0]
        if self.p <= 0 or n == 0:
            return images
        selected = (torch.rand(n) < self.p).nonzero().squeeze(1)  # [n_applied], CPU
        if selected.numel() == 0:
            return images
        factors = torch.stack([torch.empty(selected.numel()).uniform_(lo, hi) for lo, hi in self.ranges], dim=1)
        orders = torch.rand(selected.numel(), 4).argsort(dim=1)  # [n_applied, 4]: step k applies orders[:, k]
        x = images[selected.to(images.device)].clamp(0, 1)
        factors = factors.to(device=images.device, dtype=images.dtype)
        for k in range(4):
            for op, step in enumerate(self.steps):
                rows = (orders[:, k] == op).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                rows = rows.to(images.device)
                x[rows] = step(x[rows], factors[rows, op])
        out = images.clone()
        out[selected.to(images.device)] = x.clamp(0, 1)
        return out


class Photometric(nn.Module):
    """The photometric half of DINOv2's multi-crop augmentation, batched, on any device.

    ``forward(global_crops [2B, 3, G, G], local_crops [nB, 3, L, L])`` (uint8 in [0, 255] or float in
    [0, 1]) -> ``(global, local)`` float, ImageNet-normalised. Rows ``[0, B)`` of ``global_crops`` are
    view 1, rows ``[B, 2B)`` view 2 (the collate's ordering). Per view, as DINOv2:
    ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 -> RandomGrayscale p 0.2 -> GaussianBlur(9, sigma U(0.1, 2))
    with the view's probability -> solarisation (x >= 0.5 -> 1 - x) with p 0.2 on view 2 only ->
    normalisation. Randomness comes from torch's global generator: seed with ``torch.manual_seed``.
    ``color_jitter_prob``, ``grayscale_prob`` and ``blur_sigma`` are DINOv2's constants, exposed for tests;
    ``color_jitter`` (brightness, contrast, saturation, hue strengths) is the ``crops.color_jitter`` key.

    The official wrapper has a bug (its GaussianBlur passes ``1 - p`` to RandomApply), so the released
    weights were trained with blur 0 / 0.9 / 0.5 rather than these defaults' 1.0 / 0.1 / 0.5; set
    ``crops.blur_prob_global1=0.0 crops.blur_prob_global2=0.9`` to reproduce that.
    """

    def __init__(
        self,
        blur_prob_global1: float = 1.0,
        blur_prob_global2: float = 0.1,
        blur_prob_local: float = 0.5,
        solarization_prob_global2: float = 0.2,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_sigma: Tuple[float, float] = (0.1, 2.0),
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
    ):
        super().__init__()

        def view(blur_prob: float, solarization_prob: float = 0.0) -> nn.ModuleList:
            steps = [
                RandomColorJitter(*color_jitter, p=color_jitter_prob),
                K.RandomGrayscale(p=grayscale_prob),
                K.RandomGaussianBlur((9, 9), tuple(blur_sigma), p=blur_prob),
            ]
            if solarization_prob > 0:
                # thresholds=0.0 / additions=0.0: a fixed threshold of exactly 0.5 and no addition
                # (kornia's scalar forms are half-widths around 0.5 and 0).
                steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarization_prob))
            return nn.ModuleList(steps)

        self.global1 = view(blur_prob_global1)
        self.global2 = view(blur_prob_global2, solarization_prob_global2)
        self.local = view(blur_prob_local)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        return images.float()

    def _augment_view(self, steps: nn.ModuleList, images: torch.Tensor) -> torch.Tensor:
        x = self._to_unit_float(images)
        if x.shape[0] > 0:
            for step in steps:
                x = step(x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: Optional[torch.Tensor] = None,
        n_global_views: int = 2,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if global_crops.shape[0] % n_global_views:
            raise ValueError(f"global_crops has {global_crops.shape[0]} rows, not a multiple of "
                             f"n_global_views={n_global_views}")
        views = global_crops.chunk(n_global_views) if global_crops.shape[0] else [global_crops]
        # View 1 gets the global-1 probabilities, every later view the global-2 ones (DINOv2 has exactly 2).
        out_global = torch.cat([self._augment_view(self.global1 if v == 0 else self.global2, x)
                                for v, x in enumerate(views)])
        if local_crops is None:
            local_crops = global_crops.new_zeros((0, 3, 1, 1))
        out_local = self._augment_view(self.local, local_crops)
        return out_global, out_local
