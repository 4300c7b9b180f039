"""The loop's periodic checks of the teacher on the synthetic dataset: kNN top-1 of its cls token (memory bank
from the train split, queries from the held-out split, :mod:`dinoreg.metrics.knn`) and, when enabled, the
mIoU of a linear segmentation probe on its patch tokens (fitted on train images, scored on held-out ones,
:mod:`dinoreg.metrics.segmentation`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig

from dinoreg.data import SyntheticSegmentation, SyntheticShapes, build_dataset, build_eval_loader, build_segmentation_loader
from dinoreg.metrics.knn import extract_features, knn_accuracy
from dinoreg.metrics.segmentation import fit_segmentation_head, patch_feature_maps, score_segmentation_head

__all__ = ["KnnEvaluator", "SegmentationEvaluator"]
Progress = Callable[..., Iterable[Any]]


def _synthetic_split(cfg: DictConfig, split: str, size: int) -> SyntheticShapes:
    """``size`` images of the synthetic ``split``, with the training dataset's options when it is synthetic."""
    spec = str(cfg.train.dataset_path)
    options = build_dataset(spec if spec.startswith("synthetic") else "synthetic", split=split)
    return SyntheticShapes(split, size=size, image_size=options.image_size, seed=options.seed,
                           objects=options.objects)


@contextmanager
def _frozen(backbone: torch.nn.Module, autocast: Any) -> Iterator[None]:
    """The backbone in eval mode, without gradients, under ``autocast``; back in its own mode afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        backbone.train(was_training)


class KnnEvaluator:
    """``evaluator(backbone, autocast) -> {"knn_top1", "knn_top5"}``, images at the global crop size."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        ev = cfg.evaluation
        size, workers = cfg.crops.global_crops_size, min(cfg.train.num_workers, 2)
        self.bank = build_eval_loader(_synthetic_split(cfg, "train", ev.knn_train_images),
                                      image_size=size, resize_size=size, batch_size=256, num_workers=workers)
        self.queries = build_eval_loader(_synthetic_split(cfg, "val", ev.knn_eval_images),
                                         image_size=size, resize_size=size, batch_size=256, num_workers=workers)
        self.k, self.temperature, self.device = ev.knn_k, ev.knn_temperature, device

    def __call__(self, backbone: torch.nn.Module, autocast: Any,
                 progress: Progress = lambda items, what, total=None: items) -> dict[str, float]:
        """``progress(batches, what, total)`` wraps each pass over the images (a bar on a terminal)."""
        with _frozen(backbone, autocast):
            bank = extract_features(backbone, progress(self.bank, "kNN bank", len(self.bank)), self.device)
            queries = extract_features(backbone, progress(self.queries, "kNN queries", len(self.queries)),
                                       self.device)
        return knn_accuracy(*bank, *queries, k=self.k, temperature=self.temperature)


class SegmentationEvaluator:
    """``evaluator(backbone, autocast) -> {"segmentation_miou", "segmentation_pixel_accuracy"}``: DINOv2's linear
    probe (last block's patch tokens, BatchNorm + 1x1 convolution) on the synthetic label maps (background and
    one class per shape) at the global crop size, fitted for ``evaluation.segmentation_iterations``."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        ev = cfg.evaluation
        size, workers = cfg.crops.global_crops_size, min(cfg.train.num_workers, 2)
        self.loaders = {split: build_segmentation_loader(
            SyntheticSegmentation(_synthetic_split(cfg, split, images)), image_size=size, batch_size=128,
            num_workers=workers) for split, images in (("train", ev.segmentation_train_images),
                                                       ("val", ev.segmentation_eval_images))}
        self.iterations, self.device = ev.segmentation_iterations, device
        self.num_classes = len(self.loaders["train"].dataset.dataset.classes)

    def _features(self, backbone: torch.nn.Module, split: str, progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
        maps, labels = [], []
        loader = self.loaders[split]
        for images, batch_labels, _ in progress(loader, f"segmentation {split}", len(loader)):
            maps.append(patch_feature_maps(backbone, images.to(self.device)))
            labels.append(batch_labels.to(self.device))
        return torch.cat(maps), torch.cat(labels)

    def __call__(self, backbone: torch.nn.Module, autocast: Any,
                 progress: Progress = lambda items, what, total=None: items) -> dict[str, float]:
        with _frozen(backbone, autocast):
            train, val = self._features(backbone, "train", progress), self._features(backbone, "val", progress)
        head = fit_segmentation_head(*train, num_classes=self.num_classes, iterations=self.iterations)
        scores = score_segmentation_head(head, *val, num_classes=self.num_classes)
        return {"segmentation_miou": scores["miou"], "segmentation_pixel_accuracy": scores["pixel_accuracy"]}
