"""``dinoreg eval segmentation``: DINOv2's linear semantic-segmentation probe on a frozen backbone.

Data: the synthetic shapes with their label maps (``--images synthetic``), or folders of images and PNG label
maps (``--images DIR --masks DIR``, ADE20k conventions by default; :mod:`dinoreg.data.segmentation`), with a
val pair of folders or else a fixed-seed tenth of train held out. Features: the normed patch tokens of the
last block (or the last 4, concatenated), extracted once (split across ranks, gathered in dataset order).
The head and its scores: :mod:`dinoreg.metrics.segmentation`. Outputs: results.json (mIoU, pixel accuracy,
per-class IoU and accuracy, the confusion matrix), TensorBoard scalars and a PNG of val images with their
ground truth and prediction.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: nothing opens a display
from matplotlib.patches import Patch
from tqdm import tqdm

from dinoreg.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    SegmentationFolder,
    SyntheticSegmentation,
    build_dataset,
    build_segmentation_loader,
)
from dinoreg.eval.context import EvalContext, ResultsWriter
from dinoreg.eval.features import PROGRESS_INTERVAL_S, EvalInputError, gather_by_index
from dinoreg.metrics.segmentation import (
    fit_segmentation_head,
    patch_feature_maps,
    predict_labels,
    score_segmentation_head,
)
from dinoreg.run_dir import write_atomically

OVERLAYS_FILE = "segmentation_overlays.png"
HELD_OUT_FRACTION = 0.1  # of train, when no val folders are given

__all__ = ["evaluate_segmentation", "format_segmentation_table", "segmentation_splits"]


class _Subset:
    """The items ``indices`` of a segmentation dataset (a held-out part of train), with its classes."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices, self.classes = dataset, list(indices), dataset.classes

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int, draft_size: Optional[int] = None):
        return self.dataset.get(self.indices[index])


def _read_classes(path: Optional[Path]) -> Optional[list[str]]:
    if path is None:
        return None
    if not path.is_file():
        raise EvalInputError(f"--classes {path} does not exist; pass a text file with one class name per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise EvalInputError(f"--classes {path} names no class; write one class name per line, in index order")
    return names


def _folders(images: str, masks: Optional[Path], val_images: Optional[Path], val_masks: Optional[Path], *,
             ignore_value: int, classes: Optional[list[str]]) -> tuple[Any, Any]:
    if masks is None:
        raise EvalInputError(f"--images {images} is a folder, so --masks DIR (its PNG label maps) is required")
    if (val_images is None) != (val_masks is None):
        raise EvalInputError("pass both --val-images and --val-masks, or neither (then a tenth of train is held out)")
    try:
        train = SegmentationFolder(images, masks, ignore_value=ignore_value, classes=classes)
        if val_images is None:
            held_out = set(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
                           [:max(1, round(HELD_OUT_FRACTION * len(train)))].tolist())
            fit = _Subset(train, [i for i in range(len(train)) if i not in held_out])
            return fit, _Subset(train, sorted(held_out))
        val = SegmentationFolder(val_images, val_masks, ignore_value=ignore_value, classes=classes)
    except DatasetError as error:
        raise EvalInputError(str(error)) from None
    if len(val.classes) != len(train.classes):  # inferred from each split's maps: both get the larger count
        count = max(len(train.classes), len(val.classes))
        train.classes = val.classes = [f"class_{i}" for i in range(count)]
    return train, val


def segmentation_splits(images: str, masks: Optional[Path] = None, val_images: Optional[Path] = None,
                        val_masks: Optional[Path] = None, *, ignore_value: int = 0,
                        classes_file: Optional[Path] = None) -> tuple[Any, Any, list[str]]:
    """``(train, val, class names)`` from the command line's data options; :class:`EvalInputError` when they
    do not fit together or the folders do not pair up."""
    spec = str(images).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        if masks is not None or val_images is not None or val_masks is not None:
            raise EvalInputError("--images synthetic brings its own label maps and val split; drop --masks, "
                                 "--val-images and --val-masks (or write them to disk with `dinoreg data "
                                 "export-synthetic DIR`)")
        try:
            train, val = (SyntheticSegmentation(build_dataset(spec, split=split)) for split in ("train", "val"))
        except ValueError as error:
            raise EvalInputError(str(error)) from None
    else:
        train, val = _folders(spec, masks, val_images, val_masks, ignore_value=ignore_value,
                              classes=_read_classes(classes_file))
    return train, val, list(train.classes)


@torch.no_grad()
def extract_feature_maps(context: EvalContext, dataset, indices: Sequence[int], *, n_last_blocks: int,
                         desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [M, n * D, h, w], labels int64 [M, S, S])`` of the decodable images ``indices``, in dataset order
    on the main rank (each rank encodes every world-size-th image; the others get empty tensors)."""
    rank, world = context.env.rank, context.env.world_size
    loader = build_segmentation_loader(dataset, image_size=context.image_size, resize_size=context.resize_size,
                                       batch_size=context.batch_size, num_workers=context.num_workers,
                                       indices=list(indices)[rank::world])
    features, labels, seen = [], [], []
    for images, batch_labels, batch_indices in tqdm(loader, desc=desc, unit="batch", disable=rank != 0, leave=False,
                                                    dynamic_ncols=True, mininterval=PROGRESS_INTERVAL_S):
        if batch_indices.numel():
            features.append(patch_feature_maps(context.backbone, images.to(context.device),
                                               n_last_blocks=n_last_blocks).cpu())
            labels.append(batch_labels)
            seen.append(batch_indices)
    if not features:  # an empty shard still tells the gather the feature shape
        size = context.image_size
        probe = patch_feature_maps(context.backbone, torch.zeros(1, 3, size, size, device=context.device),
                                   n_last_blocks=n_last_blocks).cpu()
        features, labels = [probe[:0]], [torch.zeros(0, size, size, dtype=torch.long)]
        seen = [torch.zeros(0, dtype=torch.long)]
    local_indices = torch.cat(seen)
    all_features, _ = gather_by_index(torch.cat(features), local_indices)
    all_labels, _ = gather_by_index(torch.cat(labels), local_indices)
    return all_features, all_labels


def _palette(count: int) -> np.ndarray:
    """``[count + 1, 3]`` uint8 colours: black for ignored pixels (row 0), then one per class (tab20, cycled)."""
    colours = colormaps["tab20"](np.arange(count) % 20)[:, :3]
    return (np.concatenate([np.zeros((1, 3)), colours]) * 255).round().astype(np.uint8)


def write_overlays(path: Path, images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                   classes: Sequence[str]) -> Path:
    """A PNG with one row per image: the image, its ground truth, the prediction (ignored pixels black)."""
    palette = _palette(len(classes))
    rows = images.shape[0]
    height = 2.5 * rows + 0.8
    figure = Figure(figsize=(7.5, height))
    axes = figure.subplots(rows, 3, squeeze=False)
    figure.subplots_adjust(bottom=0.8 / height, top=1 - 0.3 / height)  # room for the legend below, titles above
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for row in range(rows):
        picture = (images[row].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        for column, (shown, title) in enumerate(((picture, "image"), (palette[labels[row].cpu().numpy() + 1], "ground truth"),
                                                 (palette[predictions[row].cpu().numpy() + 1], "prediction"))):
            axes[row, column].imshow(shown, interpolation="nearest")
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(title)
    handles = [_legend_patch(palette[i + 1], name) for i, name in enumerate(classes[:20])]
    figure.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80, bbox_inches="tight"))


def _legend_patch(colour: np.ndarray, name: str) -> Any:
    return Patch(facecolor=colour / 255.0, label=name)


def _overlay_inputs(context: EvalContext, count: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The first ``count`` decodable val images and their labels (None without any val image)."""
    if not context.val_indices:
        return None, None
    loader = build_segmentation_loader(context.val_set, image_size=context.image_size, resize_size=context.resize_size,
                                       batch_size=count, num_workers=0, indices=context.val_indices[:count])
    images, labels, _ = next(iter(loader))
    return images, labels


def evaluate_segmentation(context: EvalContext, *, n_last_blocks: int = 1, batch_norm: bool = True,
                          iterations: int = 2000, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4,
                          seed: int = 0, overlays: int = 8, output_dir: Optional[Path] = None,
                          writer: ResultsWriter | None = None) -> Optional[dict[str, Any]]:
    """The linear protocol on ``context``'s frozen backbone; results on the main rank, None elsewhere."""
    if n_last_blocks > context.backbone.n_blocks:
        raise EvalInputError(f"--blocks {n_last_blocks} but the backbone has {context.backbone.n_blocks} blocks")
    started = time.perf_counter()
    train = extract_feature_maps(context, context.train_set, context.train_indices, n_last_blocks=n_last_blocks,
                                 desc="train features")
    val = extract_feature_maps(context, context.val_set, context.val_indices, n_last_blocks=n_last_blocks,
                               desc="val features")
    extract_seconds = time.perf_counter() - started
    if not context.is_main:
        return None
    device, num_classes = context.device, len(context.classes)
    largest = max(int(labels.max()) if labels.numel() else -1 for labels in (train[1], val[1]))
    if largest >= num_classes:
        raise EvalInputError(f"the label maps hold class {largest} but {num_classes} classes are named (--classes); "
                             f"name at least {largest + 1}, or check --ignore-value")
    bar = tqdm(total=iterations, desc="segmentation head", unit="it", dynamic_ncols=True, mininterval=PROGRESS_INTERVAL_S)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if writer is not None:
            writer.scalar("segmentation/loss", loss, step)

    started = time.perf_counter()
    head = fit_segmentation_head(train[0].to(device), train[1].to(device), num_classes=num_classes,
                                 iterations=iterations, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                 batch_norm=batch_norm, seed=seed, on_step=on_step)
    bar.close()
    scores = score_segmentation_head(head, val[0].to(device), val[1].to(device), num_classes=num_classes)
    results = {"protocol": "segmentation", **context.description, "n_last_blocks": n_last_blocks,
               "batch_norm": batch_norm, "iterations": iterations, "head_batch_size": batch_size, "lr": lr,
               "weight_decay": weight_decay, "seed": seed, "train_maps": int(train[0].shape[0]),
               "val_maps": int(val[0].shape[0]), "feature_grid": list(train[0].shape[-2:]),
               "extract_seconds": round(extract_seconds, 3), "train_seconds": round(time.perf_counter() - started, 3),
               **{key: _nan_to_none(value) for key, value in scores.items()}}
    if writer is not None:
        for key in ("miou", "pixel_accuracy", "mean_accuracy"):
            writer.scalar(f"segmentation/{key}", scores[key])
    images, labels = _overlay_inputs(context, overlays) if overlays and output_dir is not None else (None, None)
    if images is not None and images.shape[0]:
        features = patch_feature_maps(context.backbone, images.to(device), n_last_blocks=n_last_blocks)
        predictions = predict_labels(head, features, labels.shape[-2:])
        results["overlays"] = str(write_overlays(output_dir / OVERLAYS_FILE, images, labels, predictions,
                                                 context.classes))
    return results


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: a class without pixels has ``null`` IoU in results.json."""
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def format_segmentation_table(results: dict[str, Any]) -> str:
    """Per-class IoU and accuracy (percent), then mIoU and pixel accuracy."""
    lines = [f"linear segmentation probe: {results['train_maps']} train and {results['val_maps']} val label maps at "
             f"{results['img_size']} px (feature grid {results['feature_grid'][0]}x{results['feature_grid'][1]}), "
             f"last {results['n_last_blocks']} block(s), {results['iterations']} iterations",
             f"  {'class':<24} {'IoU %':>7} {'acc %':>7} {'pixels':>10}"]
    percent = lambda value: "    n/a" if value is None or math.isnan(value) else f"{100 * value:7.2f}"  # noqa: E731
    for name, iou, accuracy, pixels in zip(results["classes"], results["iou"], results["accuracy"], results["pixels"]):
        lines.append(f"  {name:<24} {percent(iou)} {percent(accuracy)} {pixels:>10}")
    lines.append(f"mIoU {percent(results['miou']).strip()} %, pixel accuracy {percent(results['pixel_accuracy']).strip()} %, "
                 f"mean class accuracy {percent(results['mean_accuracy']).strip()} %")
    return "\n".join(lines)
