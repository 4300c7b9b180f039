"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's protocol).

Each query votes with its k most similar memory-bank features, every vote weighted by exp(cos / T).
``knn_classify`` computes it for several k at once; ``knn_accuracy`` is the training loop's periodic check and
:func:`dinoreg.eval.knn.evaluate_knn` the full protocol of ``dinoreg eval knn`` (k = 10, 20, 100, 200; top-1
and top-5). Plain tensor functions: no processes, no files.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_KS", "DEFAULT_TEMPERATURE", "extract_features", "knn_accuracy", "knn_classify", "topk_hits",
           "vote_scores"]


@torch.no_grad()
def extract_features(encode: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Run ``encode`` over ``(images, labels)`` batches; returns L2-normalised fp32 features and labels."""
    features, labels = [], []
    for images, batch_labels in batches:
        features.append(F.normalize(encode(images.to(device)).float(), dim=-1).cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(features), torch.cat(labels)


DEFAULT_KS = (10, 20, 100, 200)  # DINO's and DINOv2's kNN evaluation
DEFAULT_TEMPERATURE = 0.07


def vote_scores(similarities: Tensor, neighbour_labels: Tensor, *, num_classes: int, temperature: float) -> Tensor:
    """Class scores ``[Q, C]``: each of a query's neighbours (``[Q, k]`` cosines and labels) adds
    ``exp(cos / temperature)`` to its class."""
    scores = similarities.new_zeros(similarities.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels, (similarities / temperature).exp())


def knn_accuracy(train_features: Tensor, train_labels: Tensor, query_features: Tensor, query_labels: Tensor, *,
                 k: int = 20, temperature: float = DEFAULT_TEMPERATURE) -> dict[str, float]:
    """The training loop's metrics: ``knn_top1`` (and ``knn_top5`` with more than 5 classes) for one ``k``."""
    row = knn_classify(train_features, train_labels, query_features, query_labels, ks=(k,), temperature=temperature)[0]
    num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    return {"knn_top1": row["top1"], **({"knn_top5": row["top5"]} if num_classes > 5 else {})}


def topk_hits(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """``{m: bool [Q]}``: the true class is among the ``m`` best of ``scores`` ``[Q, C]``.

    A class counts as predicted only with a positive score (it got a vote), and ranks by how many classes
    score strictly higher: classes nobody voted for never fill the top 5 by the accident of sort order.
    """
    true_score = scores.gather(1, labels[:, None])  # [Q, 1]
    higher = (scores > true_score).sum(dim=1)  # [Q]
    voted = true_score[:, 0] > 0
    return {m: voted & (higher < m) for m in ks}


@torch.no_grad()
def knn_classify(train_features: Tensor, train_labels: Tensor, query_features: Tensor, query_labels: Tensor, *,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                 num_classes: int | None = None, chunk_size: int = 128) -> list[dict[str, float]]:
    """DINO's weighted kNN for several k at once: one row ``{k, k_used, top1, top5}`` per k (accuracies in [0, 1]).

    ``train_features`` ``[N, D]`` and ``query_features`` ``[Q, D]`` are L2-normalised. Each query's ``k``
    most similar bank entries vote for their class with weight ``exp(cos / temperature)``; ``k`` larger than
    the bank is clipped to ``N`` (``k_used``). ``chunk_size`` queries at a time bound the memory to
    ``chunk_size * N`` similarities.
    """
    if train_features.shape[0] == 0 or query_features.shape[0] == 0:
        raise ValueError(f"kNN needs a non-empty bank and queries, got {train_features.shape[0]} bank and "
                         f"{query_features.shape[0]} query features")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    used = [min(int(k), train_features.shape[0]) for k in ks]
    hits = torch.zeros(len(ks), 2, dtype=torch.long)  # [k, (top1, top5)]
    for queries, labels in zip(query_features.split(chunk_size), query_labels.split(chunk_size)):
        top_sim, top_idx = (queries @ train_features.T).topk(max(used), dim=1)  # [q, K], most similar first
        neighbour_labels = train_labels[top_idx]  # [q, K]
        for row, k in enumerate(used):
            scores = vote_scores(top_sim[:, :k], neighbour_labels[:, :k], num_classes=num_classes,
                                 temperature=temperature)
            found = topk_hits(scores, labels)
            hits[row] += torch.stack([found[1].sum(), found[5].sum()]).cpu()
    total = query_features.shape[0]
    return [{"k": int(k), "k_used": k_used, "top1": hits[row, 0].item() / total, "top5": hits[row, 1].item() / total}
            for row, (k, k_used) in enumerate(zip(ks, used))]
