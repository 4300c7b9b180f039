"""Linear probing as DINOv2 evaluates it (``dinov2/eval/linear.py``), on features computed once and cached.

A grid of linear classifiers is trained jointly, one per (n_last_blocks in {1, 4}, avgpool in {no, yes},
learning rate in the official list times ``batch_size / 256``), with SGD (momentum 0.9, no weight
decay) and a cosine schedule to 0; the input of a classifier is the concatenated normed cls tokens of
the last n blocks, plus the mean of the last block's patch tokens with avgpool. As in the official code
every classifier starts from N(0, 0.01) weights and zero bias, and the summed losses train them
together (each classifier's gradient is its own loss's).

Two departures, both deliberate: the best configuration is picked on a split held out from train (the
official code picks the best on val and reports that same val accuracy, which flatters it), and the
features are those of the evaluation preprocessing computed once (the official code recomputes them
every step on randomly resized and flipped crops), which makes the probe minutes instead of hours.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dinoreg.distributed import broadcast_flag
from dinoreg.eval.context import EvalContext, ResultsWriter
from dinoreg.eval.features import PROGRESS_INTERVAL_S, FeatureSet, block_tokens_encoder, extract_dataset_features
from dinoreg.metrics.knn import topk_hits
from dinoreg.run_dir import write_atomically

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # official grid
N_LAST_BLOCKS = (1, 4)
_CACHE_VERSION = 1


@dataclass(frozen=True)
class LinearConfig:
    n_last_blocks: int
    avgpool: bool
    base_lr: float
    lr: float  # base_lr scaled by batch size / 256

    @property
    def name(self) -> str:
        """The official classifier name, e.g. ``classifier_4_blocks_avgpool_True_lr_0_005``; the lr is written
        with 6 significant digits, not the official 5 decimals, which give small lrs the same name."""
        return f"classifier_{self.n_last_blocks}_blocks_avgpool_{self.avgpool}_lr_{self.lr:.6g}".replace(".", "_")


def scale_lr(base_lr: float, *, batch_size: int) -> float:
    """The official linear scaling: ``base_lr * global batch / 256`` (the classifiers train in one process)."""
    return base_lr * batch_size / 256.0


def linear_configs(*, n_last_blocks: Sequence[int], learning_rates: Sequence[float], batch_size: int) -> list[LinearConfig]:
    """The grid, in the official order: blocks, then avgpool (no, yes), then learning rate."""
    return [LinearConfig(n, avgpool, lr, scale_lr(lr, batch_size=batch_size))
            for n in n_last_blocks for avgpool in (False, True) for lr in learning_rates]


def linear_input(block_features: Tensor, *, n_last_blocks: int, avgpool: bool) -> Tensor:
    """``[N, B + 1, D]`` cached features (cls of the last B blocks, oldest first, then the mean patch token)
    -> classifier input ``[N, (n_last_blocks + avgpool) * D]``, in the official concatenation order."""
    cached_blocks = block_features.shape[1] - 1
    if not 1 <= n_last_blocks <= cached_blocks:
        raise ValueError(f"n_last_blocks={n_last_blocks} but the features hold the last {cached_blocks} blocks")
    parts = block_features[:, cached_blocks - n_last_blocks:cached_blocks].flatten(1)  # [N, n * D]
    if avgpool:
        parts = torch.cat([parts, block_features[:, -1]], dim=1)  # [N, (n + 1) * D]
    return parts


def heldout_split(labels: Tensor, *, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(fit indices, held-out indices)``: ``fraction`` of every class held out, drawn by a seeded permutation.

    Per class, so that small classes are represented on both sides: a class of n >= 2 images keeps at
    least one image on each side; a class of one image stays for fitting.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.shape[0], generator=generator)
    fit, heldout = [], []
    for label in labels.unique().tolist():
        members = order[labels[order] == label]  # this class, in the permuted order
        n = members.shape[0]
        count = min(max(int(fraction * n + 0.5), 1), n - 1) if n >= 2 else 0
        heldout.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(heldout).sort().values


def train_linear_classifiers(features: Tensor, labels: Tensor, *, configs: Sequence[LinearConfig], num_classes: int,
                             epochs: int, batch_size: int, seed: int = 0, writer: ResultsWriter | None = None,
                             show_progress: bool = True) -> nn.ModuleList:
    """Train one linear classifier per configuration on ``features`` ``[N, B + 1, D]`` (all on one device).

    An epoch is ``max(1, N // batch_size)`` iterations over a seeded permutation (full batches only, as the
    official loader drops the last one); the cosine schedule spans all ``epochs`` of them.
    """
    generator = torch.Generator().manual_seed(seed)
    classifiers = nn.ModuleList()
    for config in configs:
        in_dim = linear_input(features[:1], n_last_blocks=config.n_last_blocks, avgpool=config.avgpool).shape[1]
        classifier = nn.Linear(in_dim, num_classes)
        nn.init.normal_(classifier.weight, mean=0.0, std=0.01, generator=generator)
        nn.init.zeros_(classifier.bias)
        classifiers.append(classifier)
    classifiers.to(features.device)
    optimizer = torch.optim.SGD([{"params": c.parameters(), "lr": config.lr} for c, config in zip(classifiers, configs)],
                                momentum=0.9, weight_decay=0.0)
    n = features.shape[0]
    per_epoch = max(1, n // batch_size)
    total = epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=0.0)
    # The classifiers that read the same input share one slice of the batch.
    inputs_of = sorted({(c.n_last_blocks, c.avgpool) for c in configs})
    bar = tqdm(total=total, desc="linear classifiers", unit="it", disable=not show_progress, dynamic_ncols=True,
               mininterval=PROGRESS_INTERVAL_S)
    iteration = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(features.device)
        for step in range(per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            block_features, batch_labels = features[batch], labels[batch]  # [b, B + 1, D], [b]
            inputs = {key: linear_input(block_features, n_last_blocks=key[0], avgpool=key[1]) for key in inputs_of}
            losses = [F.cross_entropy(c(inputs[(config.n_last_blocks, config.avgpool)]), batch_labels)
                      for c, config in zip(classifiers, configs)]
            loss = torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            mean_loss = loss.item() / len(losses)
            if writer is not None:
                writer.scalar("linear/mean_loss", mean_loss, iteration)
                writer.scalar("linear/lr_factor", scheduler.get_last_lr()[0] / configs[0].lr, iteration)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4g}", refresh=False)
            iteration += 1
    bar.close()
    return classifiers


@torch.no_grad()
def evaluate_linear_classifiers(classifiers: Sequence[nn.Module], configs: Sequence[LinearConfig], features: Tensor,
                                labels: Tensor, *, chunk_size: int = 4096) -> list[dict[str, float]]:
    """``[{top1, top5}]`` per classifier on ``features`` ``[N, B + 1, D]`` (accuracies in [0, 1])."""
    hits = torch.zeros(len(configs), 2, dtype=torch.long)
    for block_features, chunk_labels in zip(features.split(chunk_size), labels.split(chunk_size)):
        for row, (classifier, config) in enumerate(zip(classifiers, configs)):
            logits = classifier(linear_input(block_features, n_last_blocks=config.n_last_blocks, avgpool=config.avgpool))
            # Softmax probabilities are all positive, so topk_hits' "voted" condition always holds here.
            found = topk_hits(logits.softmax(dim=1), chunk_labels)
            hits[row] += torch.stack([found[1].sum(), found[5].sum()]).cpu()
    total = max(features.shape[0], 1)
    return [{"top1": hits[row, 0].item() / total, "top5": hits[row, 1].item() / total} for row in range(len(configs))]


def select_best(accuracies: Sequence[float]) -> int:
    """Index of the highest accuracy; the first one on ties (the official rule: strictly better replaces)."""
    if not accuracies:
        raise ValueError("no classifier to choose from")
    return max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))


def linear_probe(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor, *,
                 num_classes: int, n_last_blocks: Sequence[int] = N_LAST_BLOCKS,
                 learning_rates: Sequence[float] = LEARNING_RATES, epochs: int = 10, batch_size: int = 128,
                 val_fraction: float = 0.1, seed: int = 0, writer: ResultsWriter | None = None,
                 show_progress: bool = True) -> dict[str, Any]:
    """Fit the grid on train minus a held-out split, choose on the held-out split, report the choice on val.

    Features are ``[N, B + 1, D]`` as :func:`linear_input` reads them. Returns ``configs`` (every
    configuration with its held-out top-1/top-5), ``best`` (the chosen one with its val top-1/top-5),
    ``val_top1`` and the split sizes.
    """
    configs = linear_configs(n_last_blocks=n_last_blocks, learning_rates=learning_rates, batch_size=batch_size)
    fit, heldout = heldout_split(train_labels.cpu(), fraction=val_fraction, seed=seed)
    fit, heldout = fit.to(train_features.device), heldout.to(train_features.device)
    classifiers = train_linear_classifiers(train_features[fit], train_labels[fit], configs=configs,
                                           num_classes=num_classes, epochs=epochs, batch_size=batch_size, seed=seed,
                                           writer=writer, show_progress=show_progress)
    heldout_scores = evaluate_linear_classifiers(classifiers, configs, train_features[heldout], train_labels[heldout])
    rows = [{"name": config.name, **asdict(config), "heldout_top1": score["top1"], "heldout_top5": score["top5"]}
            for config, score in zip(configs, heldout_scores)]
    best = select_best([row["heldout_top1"] for row in rows])
    val_score = evaluate_linear_classifiers([classifiers[best]], [configs[best]], val_features, val_labels)[0]
    if writer is not None:
        for row in rows:
            writer.scalar(f"linear_heldout_top1/{row['name']}", row["heldout_top1"])
        writer.scalar("linear/best_heldout_top1", rows[best]["heldout_top1"])
        writer.scalar("linear/val_top1", val_score["top1"])
        writer.scalar("linear/val_top5", val_score["top5"])
    return {"fit_images": int(fit.numel()), "heldout_images": int(heldout.numel()),
            "iterations": epochs * max(1, int(fit.numel()) // batch_size), "configs": rows,
            "best": {**rows[best], "val_top1": val_score["top1"], "val_top5": val_score["top5"]},
            "val_top1": val_score["top1"]}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(context: EvalContext, n_blocks: int) -> dict[str, Any]:
    """Everything the cached features depend on; a cache is reused only when all of it matches."""
    return {"version": _CACHE_VERSION, "weights_sha256": file_sha256(context.weights),
            "random_init": context.description["random_init"], "classes": context.classes,
            # a folder by absolute path: the same relative name elsewhere is other data
            "data": context.data if context.data.startswith("synthetic") else os.path.abspath(context.data),
            "img_size": context.image_size, "resize_size": context.resize_size, "n_last_blocks": n_blocks,
            "train_indices": context.train_indices, "val_indices": context.val_indices}


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, FeatureSet] | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        stored = cached["key"]
        splits = {split: FeatureSet(**cached[split]) for split in ("train", "val")}
    except Exception as error:  # noqa: BLE001 -- an unreadable cache is recomputed, never fatal
        print(f"feature cache {path} is unreadable ({type(error).__name__}: {error}); recomputing")
        return None
    differing = sorted(name for name in key if stored.get(name) != key[name])
    if differing:
        print(f"feature cache {path} was made for other inputs (differs in {', '.join(differing)}); recomputing")
        return None
    return splits


def cached_block_features(context: EvalContext, *, n_last_blocks: int, cache_path: Path | None
                          ) -> tuple[dict[str, FeatureSet], bool]:
    """``({"train", "val"}: FeatureSet of [M, n + 1, D] features, reused)``: from ``cache_path`` when it was
    made from the same weights, data, preprocessing and images; else extracted (split across ranks) and saved.
    The other ranks get empty feature sets."""
    key = _cache_key(context, n_last_blocks) if cache_path is not None else None
    # Only the main rank (where the classifiers train) reads the cache; all ranks extract together or none
    # does, as one rank alone in a collective would wait forever.
    splits = _read_cache(cache_path, key) if cache_path is not None and context.is_main else None
    if cache_path is not None and broadcast_flag(splits is not None):
        return splits or {}, True
    encode = block_tokens_encoder(context.backbone, n_last_blocks=n_last_blocks)
    splits = {split: extract_dataset_features(
        encode, dataset, indices=indices, image_size=context.image_size, resize_size=context.resize_size,
        batch_size=context.batch_size, num_workers=context.num_workers, device=context.device,
        desc=f"{split} features") for split, dataset, indices in (
            ("train", context.train_set, context.train_indices), ("val", context.val_set, context.val_indices))}
    if cache_path is not None and context.is_main:
        payload = {"key": key, **{split: s._asdict() for split, s in splits.items()}}
        write_atomically(cache_path, lambda tmp: torch.save(payload, tmp))
    return splits, False


def evaluate_linear(context: EvalContext, *, epochs: int = 10, batch_size: int = 128,
                    learning_rates: Sequence[float] = LEARNING_RATES, val_fraction: float = 0.1, seed: int = 0,
                    cache_path: Path | None = None, writer: ResultsWriter | None = None) -> dict[str, Any] | None:
    """The linear protocol on ``context``'s frozen backbone; results on the main rank, None elsewhere.

    Feature extraction is shared by all ranks; the classifiers (cheap on cached features) train on the
    main rank only, so ``batch_size`` is the global batch of the lr scaling.
    """
    n_blocks_list = sorted({min(n, context.backbone.n_blocks) for n in N_LAST_BLOCKS})
    started = time.perf_counter()
    splits, reused = cached_block_features(context, n_last_blocks=max(n_blocks_list), cache_path=cache_path)
    extract_seconds = time.perf_counter() - started
    if not context.is_main:
        return None
    train, val = splits["train"], splits["val"]
    device = context.device
    started = time.perf_counter()
    probe = linear_probe(train.features.to(device), train.labels.to(device), val.features.to(device),
                         val.labels.to(device), num_classes=len(context.classes), n_last_blocks=n_blocks_list,
                         learning_rates=learning_rates, epochs=epochs, batch_size=batch_size,
                         val_fraction=val_fraction, seed=seed, writer=writer)
    return {"protocol": "linear", **context.description, "n_last_blocks": n_blocks_list, "epochs": epochs,
            "classifier_batch_size": batch_size, "val_fraction": val_fraction,
            "train_features": int(train.features.shape[0]), "val_features": int(val.features.shape[0]),
            "features_cached": reused, "extract_seconds": round(extract_seconds, 3),
            "train_seconds": round(time.perf_counter() - started, 3), **probe}


def format_linear_table(results: dict[str, Any]) -> str:
    """Every configuration's held-out accuracy (percent), the chosen one marked, then its val accuracy."""
    best = results["best"]["name"]
    lines = [f"linear probe: {results['fit_images']} images to fit, {results['heldout_images']} held out to choose, "
             f"{results['val_features']} val; {results['epochs']} epochs ({results['iterations']} iterations of "
             f"{results['classifier_batch_size']})",
             f"  {'blocks':>6} {'avgpool':>7} {'base lr':>8} {'lr':>10} {'held-out top-1 %':>17}"]
    for row in results["configs"]:
        mark = "*" if row["name"] == best else " "
        lines.append(f"{mark} {row['n_last_blocks']:>6} {str(row['avgpool']):>7} {row['base_lr']:>8.3g} "
                     f"{row['lr']:>10.3g} {100 * row['heldout_top1']:>17.2f}")
    lines.append(f"chosen {best}: val top-1 {100 * results['best']['val_top1']:.2f} %, "
                 f"top-5 {100 * results['best']['val_top5']:.2f} %")
    return "\n".join(lines)
