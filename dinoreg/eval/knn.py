"""``dinoreg eval knn``: the weighted kNN protocol of DINO on a frozen backbone (scoring in :mod:`dinoreg.metrics.knn`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dinoreg.eval.context import EvalContext, ResultsWriter
from dinoreg.eval.features import extract_dataset_features, knn_encoder
from dinoreg.metrics.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify
from dinoreg.run_dir import write_atomically


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
