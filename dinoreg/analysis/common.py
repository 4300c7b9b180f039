"""What every ``dinoreg analyze`` tool shares: the backbone, the images, the outputs (JSON and PNG figures)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from dinoreg.data import IMAGENET_MEAN, IMAGENET_STD, IndexedView, build_eval_loader
from dinoreg.data.datasets import build_dataset
from dinoreg.errors import InputError
from dinoreg.eval.context import resolve_weights
from dinoreg.eval.features import EvalInputError
from dinoreg.models.vit import VisionTransformer
from dinoreg.models.weights import load_backbone

__all__ = ["AnalysisInputs", "AnalysisError", "Tool", "open_inputs", "pyplot", "save_figure"]


class AnalysisError(InputError, ValueError):
    """Bad input to an analysis tool; the message names the option and the fix."""


@dataclass(frozen=True)
class Tool:
    """One ``dinoreg analyze`` tool: ``add_arguments(parser)`` adds its own options to the shared ones;
    ``run(inputs, out, args)`` writes its JSON and PNGs under ``out`` and returns the JSON's content;
    ``summary(result)`` is the line printed at the end."""

    help: str
    description: str
    run: Callable[[Any, Path, Any], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str]
    add_arguments: Callable[[Any], None] = lambda parser: None


@dataclass
class AnalysisInputs:
    backbone: VisionTransformer
    weights: Path
    images: str
    dataset: Any
    image_size: int
    batch_size: int
    max_images: int
    device: torch.device

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.backbone.patch_size
        return side, side

    def batches(self, desc: str = "images") -> Iterator[tuple[Tensor, Tensor]]:
        """``(images [B, 3, S, S] normalised, indices [B])`` for the first ``max_images`` images, with a progress
        bar; the whole image is kept (resized to ``image_size``, no crop)."""
        count = min(self.max_images, len(self.dataset))
        loader = build_eval_loader(IndexedView(self.dataset, list(range(count))), image_size=self.image_size,
                                   batch_size=self.batch_size, num_workers=0, resize_size=self.image_size)
        for images, indices in tqdm(loader, desc=desc, unit="batch", leave=False):
            yield images.to(self.device), indices

    def labels(self, indices: Tensor) -> tuple[Optional[Tensor], Optional[str]]:
        """``(class labels [N] of the dataset items indices, None)``, or ``(None, why there are none)``."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            return None, "the images have no labels (the dataset has no targets)"
        labels = torch.as_tensor([int(targets[i]) for i in indices.tolist()], dtype=torch.long)
        if (labels < 0).any():
            return None, "some images have no label (images outside class sub-folders); use a folder of class folders"
        return labels, None

    def raw_images(self, indices: list[int]) -> Tensor:
        """The images ``indices`` as shown in figures: ``[N, S, S, 3]`` in [0, 1], the same resize as analysed."""
        loader = build_eval_loader(IndexedView(self.dataset, indices), image_size=self.image_size,
                                   batch_size=len(indices), num_workers=0, resize_size=self.image_size)
        images, _ = next(iter(loader))
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def open_inputs(*, weights: Path, images: str, image_size: Optional[int], batch_size: int, max_images: int,
                device: str) -> AnalysisInputs:
    """Load the backbone (a file ``load_backbone`` reads, or a training run directory) and the images (a folder,
    or ``synthetic[:...]``: the synthetic dataset's val split)."""
    weights = Path(weights)
    try:
        path = resolve_weights(weights=None, run=weights) if weights.is_dir() and not (weights / "config.json").exists() \
            else resolve_weights(weights=weights, run=None)
    except EvalInputError as error:
        raise AnalysisError(str(error).replace("--run", "--weights")) from None
    try:
        dataset = build_dataset(images, split="val")
    except ValueError as error:
        raise AnalysisError(f"--images: {error}") from None
    backbone = load_backbone(path).to(device)
    size = image_size or backbone.arch_kwargs["img_size"]
    if size % backbone.patch_size:
        raise AnalysisError(f"--img-size {size} is not a multiple of the patch size {backbone.patch_size}")
    return AnalysisInputs(backbone=backbone, weights=path, images=images, dataset=dataset, image_size=size,
                          batch_size=batch_size, max_images=max_images, device=torch.device(device))


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib  # noqa: PLC0415 (start-up: matplotlib; this module loads with `dinoreg --help`)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (start-up: matplotlib)

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(figure)
    return path
