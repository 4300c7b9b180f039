"""DINOv2's linear semantic-segmentation probe on frozen patch features, and its scores (mIoU, pixel accuracy).

The official "linear" head (``dinov2/eval/segmentation``, mmseg's ``BNHead``): the normed patch tokens of the
last block (or of the last 4 blocks, concatenated along channels) as a ``[D, h, w]`` map, BatchNorm, a 1x1
convolution to the classes; logits are upsampled bilinearly to the label map's size and trained with
cross-entropy that skips ignored pixels (AdamW, lr 1e-3, weight decay 1e-4, linear warm-up then a linear
("poly", power 1) decay to 0, as the official ADE20k schedule, whose 1500 warm-up iterations of 40k are
kept as the same fraction). Scores are mmseg's: per class IoU = TP / (TP + FP + FN) over the pixels that are
not ignored, mIoU the mean over the classes that occur in the labels or the predictions (a class absent
from both has no IoU), pixel accuracy the fraction of right pixels.

Departure, deliberate and shared with the linear classification probe: the features are computed once on
the evaluation geometry (resize, centre crop) and the head trains on them, without the official random
resize, crop and flip of every iteration nor its sliding-window inference: minutes instead of hours.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoreg.data import IGNORE_LABEL as IGNORE_INDEX

WARMUP_FRACTION = 1500 / 40000  # the official ADE20k schedule: 1500 warm-up iterations of 40k

__all__ = ["LinearSegmentationHead", "confusion_matrix", "fit_segmentation_head", "patch_feature_maps",
           "predict_labels", "segmentation_scores", "score_segmentation_head"]


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``int64 [C, C]``: entry ``(t, p)`` counts the pixels of true class ``t`` predicted ``p``; pixels labelled
    :data:`IGNORE_INDEX` (or any label outside ``0..C-1``) are not counted."""
    labels, predictions = labels.reshape(-1), predictions.reshape(-1)
    valid = (labels >= 0) & (labels < num_classes)
    pairs = labels[valid] * num_classes + predictions[valid]
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: Tensor) -> dict:
    """``{"miou", "pixel_accuracy", "mean_accuracy", "iou": [C], "accuracy": [C], "pixels": [C]}`` from a confusion
    matrix; a class with no pixel in the labels nor in the predictions has IoU NaN and is left out of the mean
    (mmseg's nanmean), one with no labelled pixel has accuracy NaN."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    labelled, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    union = labelled + predicted - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, math.nan))
    accuracy = torch.where(labelled > 0, true_positive / labelled.clamp_min(1), torch.full_like(union, math.nan))
    total = confusion.sum()
    return {"miou": iou.nanmean().item(), "pixel_accuracy": (true_positive.sum() / total.clamp_min(1)).item(),
            "mean_accuracy": accuracy.nanmean().item(), "iou": iou.tolist(), "accuracy": accuracy.tolist(),
            "pixels": labelled.long().tolist()}


class LinearSegmentationHead(nn.Module):
    """``[B, D, h, w]`` patch features -> ``[B, C, h, w]`` logits: BatchNorm (optional) and a 1x1 convolution,
    initialised as mmseg's decode heads (weights N(0, 0.01), bias 0)."""

    def __init__(self, in_channels: int, num_classes: int, *, batch_norm: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.norm(features))


@torch.no_grad()
def patch_feature_maps(backbone: nn.Module, images: Tensor, *, n_last_blocks: int = 1) -> Tensor:
    """images ``[B, 3, H, W]`` -> the normed patch tokens of the last ``n_last_blocks`` blocks, registers and cls
    removed, as maps concatenated along channels ``[B, n * D, H / p, W / p]`` (oldest block first)."""
    outputs = backbone.get_intermediate_layers(images, n_last_blocks, reshape=True, norm=True)
    return torch.cat(outputs, dim=1).float()


def _upsampled_logits(head: nn.Module, features: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(head(features), size=tuple(size), mode="bilinear", align_corners=False)  # [B, C, H, W]


def _schedule(iterations: int) -> Callable[[int], float]:
    warmup = max(1, round(WARMUP_FRACTION * iterations))

    def factor(step: int) -> float:  # mmseg: linear warm-up from 1e-6 of the lr, then poly (power 1) to 0
        if step < warmup:
            return 1e-6 + (1 - 1e-6) * step / warmup
        return max(0.0, 1.0 - step / iterations)

    return factor


def fit_segmentation_head(features: Tensor, labels: Tensor, *, num_classes: int, iterations: int = 2000,
                          batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4, batch_norm: bool = True,
                          seed: int = 0, on_step: Optional[Callable[[int, float], None]] = None,
                          progress: Callable[[Iterable[int]], Iterable[int]] = lambda steps: steps
                          ) -> LinearSegmentationHead:
    """Train a :class:`LinearSegmentationHead` on ``features [N, D, h, w]`` and ``labels int64 [N, H, W]`` (on their
    device), batches drawn by a seeded permutation per pass; ``on_step(step, loss)`` sees every step's loss."""
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"{features.shape[0]} feature maps for {labels.shape[0]} label maps; need as many, > 0")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the head's init draws from its own seed, not the caller's stream
        torch.manual_seed(seed)
        head = LinearSegmentationHead(features.shape[1], num_classes, batch_norm=batch_norm).to(features.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(iterations))
    batch_size, order = min(batch_size, features.shape[0]), torch.empty(0, dtype=torch.long)
    head.train()
    for step in progress(range(iterations)):
        if order.numel() < batch_size:  # a new pass over the maps (the short remainder is dropped)
            order = torch.randperm(features.shape[0], generator=generator)
        batch, order = order[:batch_size].to(features.device), order[batch_size:]
        batch_labels = labels[batch]
        logits = _upsampled_logits(head, features[batch], batch_labels.shape[-2:])
        loss = F.cross_entropy(logits, batch_labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(step, loss.item())
    return head.eval()


@torch.no_grad()
def predict_labels(head: nn.Module, features: Tensor, size: Sequence[int]) -> Tensor:
    """The head's classes ``int64 [B, H, W]`` at ``size`` (bilinear logits, then argmax)."""
    return _upsampled_logits(head, features, size).argmax(dim=1)


@torch.no_grad()
def score_segmentation_head(head: nn.Module, features: Tensor, labels: Tensor, *, num_classes: int,
                            chunk_size: int = 64) -> dict:
    """:func:`segmentation_scores` of the head's predictions on ``features [N, D, h, w]`` against ``labels [N, H, W]``."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for chunk, chunk_labels in zip(features.split(chunk_size), labels.split(chunk_size)):
        confusion += confusion_matrix(predict_labels(head, chunk, chunk_labels.shape[-2:]), chunk_labels, num_classes)
    return {**segmentation_scores(confusion), "confusion": confusion.tolist()}
