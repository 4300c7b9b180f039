"""The loop's periodic kNN check: top-1 of the teacher's cls token on the synthetic dataset (memory bank from
its train split, queries from its held-out split), scored by :mod:`dinoreg.metrics.knn`."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig

from dinoreg.data import SyntheticShapes, build_dataset, build_eval_loader
from dinoreg.metrics.knn import extract_features, knn_accuracy

__all__ = ["KnnEvaluator"]


def _synthetic_split(cfg: DictConfig, split: str, size: int) -> SyntheticShapes:
    """``size`` images of the synthetic ``split``, with the training dataset's options when it is synthetic."""
    spec = str(cfg.train.dataset_path)
    options = build_dataset(spec if spec.startswith("synthetic") else "synthetic", split=split)
    return SyntheticShapes(split, size=size, image_size=options.image_size, seed=options.seed,
                           objects=options.objects)


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

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, autocast: Any,
                 progress: Callable[..., Iterable[Any]] = lambda items, what, total=None: items) -> dict[str, float]:
        """``progress(batches, what, total)`` wraps each pass over the images (a bar on a terminal)."""
        was_training = backbone.training
        backbone.eval()
        with autocast:
            bank = extract_features(backbone, progress(self.bank, "kNN bank", len(self.bank)), self.device)
            queries = extract_features(backbone, progress(self.queries, "kNN queries", len(self.queries)),
                                       self.device)
        backbone.train(was_training)
        return knn_accuracy(*bank, *queries, k=self.k, temperature=self.temperature)
