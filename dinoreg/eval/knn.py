"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's protocol).

Each query votes with its k most similar memory-bank features, every vote weighted by exp(cos / T).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def extract_features(encode: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Run ``encode`` over ``(images, labels)`` batches; returns L2-normalised fp32 features and labels."""
    features, labels = [], []
    for images, batch_labels in batches:
        features.append(F.normalize(encode(images.to(device)).float(), dim=-1).cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, query_features: Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 1024) -> Tensor:
    """Class scores ``[Q, C]`` for L2-normalised ``query_features`` ``[Q, D]`` against ``train_features`` ``[N, D]``."""
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    scores = []
    for queries in query_features.split(chunk_size):
        similarity = queries @ train_features.T  # [q, N]
        top_sim, top_idx = similarity.topk(k, dim=1)  # [q, k]
        votes = F.one_hot(train_labels[top_idx], num_classes).float()  # [q, k, C]
        scores.append((votes * (top_sim / temperature).exp().unsqueeze(-1)).sum(1))
    return torch.cat(scores)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, query_features: Tensor, query_labels: Tensor, *,
                 k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy of the weighted kNN classifier."""
    num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, query_features, k=k, temperature=temperature,
                         num_classes=num_classes)
    ranked = scores.argsort(dim=1, descending=True)
    result = {"knn_top1": (ranked[:, 0] == query_labels).float().mean().item()}
    if num_classes > 5:
        result["knn_top5"] = (ranked[:, :5] == query_labels[:, None]).any(1).float().mean().item()
    return result
