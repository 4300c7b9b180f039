"""Gram anchoring (DINOv3): keep the student's patch-to-patch similarity structure close to a frozen
"Gram teacher"'s, so that long training does not degrade dense (patch-level) features.

Same inputs -> same value as DINOv3's ``GramLoss`` (``dinov3/loss/gram_loss.py``) for every option,
plus the small pieces of its integration that are pure functions: the down-resize of the Gram
teacher's high-resolution patch features (:func:`resize_patch_features`), the choice of tokens
(:func:`select_gram_tokens`) and the loss-weight schedule (:func:`gram_loss_weight`). Deliberate
differences, none of which changes a value:

* The teacher features are detached: the loss never sends a gradient to the Gram teacher (DINOv3
  relies on its callers computing them under ``no_grad``).
* ``remove_only_teacher_neg`` zeroes the teacher's negative similarities only. DINOv3 also writes
  ``student[(student < 0) & (teacher < 0)] = 0``, but only after the teacher's negatives were zeroed,
  so that mask is always empty; the student Gram is left as it is, as here.
* ``img_level`` is an argument of :meth:`GramLoss.forward` only. DINOv3's constructor also accepts
  one and ignores it.
* :func:`resize_patch_features` accepts non-square grids and modes without ``align_corners``
  (``nearest``, ``area``); DINOv3 handles square grids and passes ``align_corners=False`` always.

Like DINOv3, both inputs are cast to fp32 first (bf16 is upcast; fp64 is cast down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GramLoss", "GramSpec", "gram_loss", "gram_matrix", "resize_patch_features", "select_gram_tokens",
           "gram_loss_weight", "TOKENS_USED"]

TOKENS_USED = ("all", "masked", "unmasked")
_ALIGN_CORNERS_MODES = ("linear", "bilinear", "bicubic", "trilinear")


@dataclass(frozen=True)
class GramSpec:
    """How the Gram anchoring feature (:mod:`dinoreg.train.features.gram`) anchors the student's patch features
    (DINOv3's ``gram.*``): the loss options, which tokens (``tokens_used``, chosen by the student's iBOT masks), how
    a Gram teacher's larger patch grid is resized to the student's, whether the EMA teacher itself is the Gram
    teacher (``ema_teacher``) and whether the loss on masked and unmasked tokens is also logged
    (``compute_stats``)."""

    normalized: bool = True
    img_level: bool = False
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens_used: str = "all"
    resize_method: str = "bicubic"
    resize_antialias: bool = False
    ema_teacher: bool = False
    compute_stats: bool = False

    def __post_init__(self) -> None:
        _check_neg_options(self.remove_neg, self.remove_only_teacher_neg)
        if self.tokens_used not in TOKENS_USED:
            raise ValueError(f"tokens_used must be one of {TOKENS_USED}, got {self.tokens_used!r}")
        if self.tokens_used != "all" and self.img_level:
            raise ValueError("tokens_used masked/unmasked needs a batch-level Gram matrix (img_level false)")


def gram_matrix(features: Tensor, *, normalize: bool, img_level: bool) -> Tensor:
    """Pairwise dot products of the tokens: per image ([B, N, D] -> [B, N, N]) when ``img_level``,
    else across every token of the local batch ([B, N, D] or [M, D] -> [M, M], M = B * N); with
    ``normalize`` these are cosine similarities (L2-normalised along D, as ``F.normalize``)."""
    features = features.float()
    if normalize:
        features = F.normalize(features, dim=-1)
    if not img_level and features.dim() == 3:
        features = features.flatten(0, 1)  # [B * N, D]
    return features @ features.transpose(-1, -2)


def gram_loss(student: Tensor, teacher: Tensor, *, apply_norm: bool = True, img_level: bool = True,
              remove_neg: bool = True, remove_only_teacher_neg: bool = False) -> Tensor:
    """Mean squared difference between the student's and the teacher's Gram matrices (a scalar).

    ``student``, ``teacher``: [B, N, D] patch features (same shape), or [M, D] selected tokens when
    ``img_level`` is False. ``remove_neg`` zeroes the negative similarities of both Grams (only the
    positive structure is anchored); ``remove_only_teacher_neg`` those of the teacher only.
    """
    _check_neg_options(remove_neg, remove_only_teacher_neg)
    if img_level and (student.dim() != 3 or teacher.dim() != 3):
        raise ValueError(f"img_level needs [B, N, D] features, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    target = gram_matrix(teacher.detach(), normalize=apply_norm, img_level=img_level)  # [B, N, N] or [M, M]
    output = gram_matrix(student, normalize=apply_norm, img_level=img_level)  # same shape as target
    if remove_neg or remove_only_teacher_neg:
        target = target.clamp(min=0.0)
    if remove_neg:
        output = output.clamp(min=0.0)
    return F.mse_loss(output, target)


def _check_neg_options(remove_neg: bool, remove_only_teacher_neg: bool) -> None:
    """The two ways of removing negatives exclude each other (DINOv3 asserts the same)."""
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg cannot both be set")


class GramLoss(nn.Module):
    """:func:`gram_loss` with its options fixed at construction (DINOv3's defaults), as DINOv3's
    ``GramLoss``; ``img_level`` is chosen per call, as there."""

    def __init__(self, apply_norm: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False) -> None:
        super().__init__()
        _check_neg_options(remove_neg, remove_only_teacher_neg)
        self.apply_norm = apply_norm
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, student: Tensor, teacher: Tensor, img_level: bool = True) -> Tensor:
        """``student``, ``teacher``: [B, N, D], or [M, D] when not ``img_level``; returns a scalar."""
        return gram_loss(student, teacher, apply_norm=self.apply_norm, img_level=img_level,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg)

    def extra_repr(self) -> str:
        return (f"apply_norm={self.apply_norm}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}")


def _grid(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_patch_features(features: Tensor, from_grid: int | tuple[int, int], to_grid: int | tuple[int, int],
                          mode: str = "bicubic", antialias: bool = False) -> Tensor:
    """Resize row-major patch features [B, H1 * W1, D] on their H1 x W1 grid to [B, H2 * W2, D].

    The Gram teacher sees a higher-resolution crop than the student, so its patch grid is larger;
    DINOv3 interpolates the feature maps down to the student's grid (``F.interpolate``,
    ``align_corners=False``; config defaults ``bicubic``, no antialias). Equal grids: returned as is.
    """
    (h1, w1), (h2, w2) = _grid(from_grid), _grid(to_grid)
    if features.shape[1] != h1 * w1:
        raise ValueError(f"{features.shape[1]} tokens do not fill a {h1}x{w1} grid")
    if (h1, w1) == (h2, w2):
        return features
    maps = features.transpose(-2, -1).unflatten(-1, (h1, w1))  # [B, D, H1, W1]
    align_corners = False if mode in _ALIGN_CORNERS_MODES else None
    maps = F.interpolate(maps, size=(h2, w2), mode=mode, align_corners=align_corners, antialias=antialias)
    return maps.flatten(-2, -1).transpose(-2, -1)  # [B, H2 * W2, D]


def select_gram_tokens(student: Tensor, teacher: Tensor, masks: Tensor, tokens_used: str = "all"
                       ) -> tuple[Tensor, Tensor]:
    """The tokens the Gram loss compares: ``all`` keeps [B, N, D]; ``masked`` / ``unmasked`` keep the
    patches the student's iBOT mask ``masks`` ([B, N] bool) hides / shows, as [M, D] (batch-level
    Gram only, which DINOv3 enforces)."""
    if tokens_used not in TOKENS_USED:
        raise ValueError(f"tokens_used must be one of {TOKENS_USED}, got {tokens_used!r}")
    if tokens_used == "all":
        return student, teacher
    keep = masks if tokens_used == "masked" else ~masks  # [B, N]
    return student[keep], teacher[keep]  # [M, D] each


def gram_loss_weight(iteration: int, *, start: float, peak: float, end: float, warmup_iterations: int,
                     total_iterations: int, cosine_iterations: int | None = None) -> float:
    """The loss weight at ``iteration`` under DINOv3's ``linear_warmup_cosine_decay``: linear from
    ``start`` towards ``peak`` over the warm-up (endpoint excluded), a half cosine from ``peak`` to
    ``end`` (both included) over ``cosine_iterations`` (default: the rest), then ``end``."""
    cosine = total_iterations - warmup_iterations if cosine_iterations is None else cosine_iterations
    if min(warmup_iterations, cosine, total_iterations - warmup_iterations - cosine) < 0:
        raise ValueError(f"need warmup + cosine <= total; got {warmup_iterations=}, {cosine=}, {total_iterations=}")
    if not 0 <= iteration < total_iterations:
        raise IndexError(f"iteration {iteration} outside the schedule's {total_iterations} iterations")
    if iteration < warmup_iterations:
        return start + (peak - start) * iteration / warmup_iterations
    step = iteration - warmup_iterations
    if step >= cosine:
        return float(end)
    angle = math.pi * step / (cosine - 1) if cosine > 1 else 0.0
    return (peak - end) * (math.cos(angle) + 1) / 2 + end
