"""What every evaluation starts from (processes, device, frozen backbone, data) and where its results go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from dinoreg.distributed import DistributedEnvironment, detect_environment, init_distributed, process_device
from dinoreg.eval.features import EvalInputError, eval_splits, subsample_indices
from dinoreg.models import backbone_from_arch_kwargs
from dinoreg.models.vit import VisionTransformer
from dinoreg.models.weights import CheckpointMismatchError, WeightsFileError, load_backbone
from dinoreg.run_dir import BACKBONE_FILE, RESULTS_FILE, RunDir, write_json


@dataclass
class EvalContext:
    """One evaluation's frozen backbone, data and preprocessing, the same on every rank."""

    env: DistributedEnvironment
    device: torch.device
    backbone: VisionTransformer
    weights: Path
    data: str
    train_set: Any
    val_set: Any
    classes: list[str]
    train_indices: list[int]  # the (sub)sampled images of each split, increasing
    val_indices: list[int]
    image_size: int
    resize_size: int
    batch_size: int
    num_workers: int
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def resolve_weights(*, weights: Optional[Path], run: Optional[Path]) -> Path:
    """The backbone file of ``--weights PATH`` or of the training run ``--run DIR``; exactly one is given."""
    if (weights is None) == (run is None):
        raise EvalInputError("pass exactly one of --weights PATH (a backbone file) or --run DIR (a training "
                             "output folder)")
    if run is not None:
        if not run.is_dir():
            raise EvalInputError(f"--run {run} is not a folder; pass the --output-dir of a `dinoreg train` run")
        path = RunDir(run).backbone
        if not path.is_file():
            raise EvalInputError(f"--run {run} holds no {BACKBONE_FILE} (training writes it "
                                 "when it ends); export one from its checkpoints with `dinoreg export RUN --format "
                                 "safetensors --output PATH` and pass --weights PATH")
        return path
    if not weights.exists():
        raise EvalInputError(f"--weights {weights} does not exist; pass a backbone file or Hugging Face export "
                             "directory (e.g. RUN/teacher_backbone.safetensors, or an official DINOv2 .pth), or "
                             "--run DIR")
    return weights


def open_eval(*, weights: Path, data: str, image_size: Optional[int], resize_size: Optional[int], batch_size: int,
              num_workers: int, max_train_images: Optional[int], max_val_images: Optional[int],
              random_init: bool = False, splits: Optional[tuple[Any, Any, list[str]]] = None,
              resize_ratio: float = 256 / 224) -> EvalContext:
    """Join the torchrun/SLURM process group when there is one (gloo on CPU), load the backbone (eval mode)
    and the data: ``splits`` ``(train, val, classes)`` when given, else :func:`eval_splits` of ``data`` (then only
    a description). ``image_size`` defaults to the backbone's, ``resize_size`` to ``image_size * resize_ratio``
    (the official 256 / 224; 1 keeps a square image whole).
    ``random_init``: the same architecture, freshly initialised with seed 0 (the baseline to beat).

    Raises :class:`EvalInputError` for a bad data layout, a weights file that is no loadable backbone, or an
    image size the patches do not tile.
    """
    train_set, val_set, classes = splits or eval_splits(data)  # before anything slow: a bad layout fails at once
    env = detect_environment()
    device = process_device(env)
    init_distributed(env, device)
    try:
        backbone = load_backbone(weights).to(device)
    except (WeightsFileError, CheckpointMismatchError) as error:  # each names the file, what is wrong and the fix
        raise EvalInputError(f"--weights {error}") from None
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            backbone = backbone_from_arch_kwargs(backbone.arch_kwargs).to(device).eval()
    patch = backbone.patch_size
    # DINOv2 evaluates at 224 px (resize 256); models trained on smaller images at their own size
    image_size = int(image_size or min(backbone.arch_kwargs["img_size"], 224))
    if image_size % patch:
        lower = image_size // patch * patch
        raise EvalInputError(f"--img-size {image_size} is not a multiple of the backbone's patch size {patch}; "
                             f"use e.g. --img-size {lower or patch} or {lower + patch}")
    resize_size = int(resize_size or round(image_size * resize_ratio))
    if resize_size < image_size:
        raise EvalInputError(f"--resize-size {resize_size} is smaller than the crop --img-size {image_size}; "
                             f"use --resize-size {image_size} (no crop) or more")
    context = EvalContext(
        env=env, device=device, backbone=backbone, weights=weights, data=data, train_set=train_set,
        val_set=val_set, classes=classes,
        train_indices=subsample_indices(len(train_set), max_train_images, seed=0),
        val_indices=subsample_indices(len(val_set), max_val_images, seed=1),
        image_size=image_size, resize_size=resize_size, batch_size=batch_size, num_workers=num_workers)
    context.description = {
        "weights": os.path.abspath(weights), "random_init": random_init, "data": data, "classes": classes, "img_size": image_size,
        "resize_size": resize_size, "patch_size": patch, "embed_dim": backbone.embed_dim,
        "depth": backbone.n_blocks, "num_register_tokens": backbone.num_register_tokens,
        "pos_embed_type": backbone.pos_embed_type,  # "rope": DINOv3's family (its storage tokens are the registers)
        "train_images": len(context.train_indices), "val_images": len(context.val_indices),
        "world_size": env.world_size,
    }
    return context


class ResultsWriter:
    """``results.json`` and TensorBoard scalars under ``output_dir`` (only where ``enabled``: the main rank)."""

    def __init__(self, output_dir: Path, *, enabled: bool = True) -> None:
        self.output_dir, self.enabled, self._writer = Path(output_dir), enabled, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (start-up: tensorboard)

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(RunDir(self.output_dir).tensorboard_run))

    def scalar(self, tag: str, value: float, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def write_results(self, results: dict[str, Any]) -> Optional[Path]:
        """Write ``results.json`` atomically (a reader never sees half a file); returns its path."""
        if not self.enabled:
            return None
        return write_json(self.output_dir / RESULTS_FILE, results)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
