"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's protocol).

Each query votes with its k most similar memory-bank features, every vote weighted by exp(cos / T).
``knn_classify`` computes it for several k at once; ``evaluate_knn`` is the full protocol of ``dinoreg eval
knn`` (k = 10, 20, 100, 200; top-1 and top-5) and ``knn_accuracy`` the training loop's periodic check.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinoreg.eval.context import EvalContext, ResultsWriter, write_atomically
from dinoreg.eval.features import extract_dataset_features, knn_encoder


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


def evaluate_knn(context: EvalContext, *, ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                 avgpool: bool = False, writer: ResultsWriter | None = None,
                 save_features: Path | None = None) -> dict[str, Any] | None:
    """The kNN protocol on ``context``'s frozen backbone: bank = train split, queries = val split.

    Every rank extracts its share of the features; the main rank classifies, logs the scalars to
    ``writer`` and returns the results (other ranks return None). ``save_features`` writes the features,
    labels and dataset indices of both splits (``torch.load(path)``) on the main rank.
    """
    encode = knn_encoder(context.backbone, avgpool=avgpool)
    started = time.perf_counter()
    splits = {}
    for split, dataset, indices in (("train", context.train_set, context.train_indices),
                                    ("val", context.val_set, context.val_indices)):
        splits[split] = extract_dataset_features(
            encode, dataset, indices=indices, image_size=context.image_size, resize_size=context.resize_size,
            batch_size=context.batch_size, num_workers=context.num_workers, device=context.device,
            desc=f"{split} features")
    extract_seconds = time.perf_counter() - started
    if not context.is_main:
        return None
    if save_features is not None:
        payload = {split: s._asdict() for split, s in splits.items()}
        write_atomically(Path(save_features), lambda tmp: torch.save(payload, tmp))
    train, val = splits["train"], splits["val"]
    rows = knn_classify(train.features.to(context.device), train.labels.to(context.device),
                        val.features.to(context.device), val.labels.to(context.device), ks=ks,
                        temperature=temperature, num_classes=len(context.classes))
    for row in rows if writer is not None else ():
        for metric in ("top1", "top5"):
            writer.scalar(f"knn/{metric}_k{row['k']}", row[metric])
    return {"protocol": "knn", **context.description, "avgpool": avgpool, "temperature": temperature,
            "feature_dim": int(train.features.shape[1]), "train_features": int(train.features.shape[0]),
            "val_features": int(val.features.shape[0]), "extract_seconds": round(extract_seconds, 3), "knn": rows}


def format_knn_table(results: dict[str, Any]) -> str:
    """The per-k accuracies as a small text table (percent)."""
    lines = [f"weighted kNN (T={results['temperature']}, {'cls + avgpool' if results['avgpool'] else 'cls'} "
             f"features of dim {results['feature_dim']}): bank {results['train_features']} train images, "
             f"{results['val_features']} val queries, {len(results['classes'])} classes",
             f"{'k':>6} {'top-1 %':>8} {'top-5 %':>8}"]
    for row in results["knn"]:
        k = f"{row['k']}" if row["k"] == row["k_used"] else f"{row['k']}->{row['k_used']}"
        lines.append(f"{k:>6} {100 * row['top1']:8.2f} {100 * row['top5']:8.2f}")
    return "\n".join(lines)
