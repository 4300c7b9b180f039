"""Frozen-backbone features for the evaluations: the datasets, the encoders, and (distributed) extraction.

Extraction is the same in one process and under torchrun: each rank encodes the images whose index is
``rank (mod world size)``, then the main rank receives all features *with their dataset indices* and puts
them back in dataset order, so the features (and anything computed from them) do not depend on the
number of processes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dinoreg import distributed
from dinoreg.data import ImageFolder, IndexedView, build_dataset, build_eval_loader
from dinoreg.errors import InputError
from dinoreg.models.vit import VisionTransformer

Encoder = Callable[[Tensor], Tensor]
_SYNTHETIC_HELP = "synthetic (default) or synthetic:size=N,image_size=S,seed=K,objects=A-B"


class EvalInputError(InputError, ValueError):
    """A bad evaluation input (data layout, weights, image size): the message names the problem and the fix."""


class FeatureSet(NamedTuple):
    """Features of the decodable images of a dataset, in dataset order."""

    features: Tensor  # [M, ...] fp32 on the CPU
    labels: Tensor  # [M] int64
    indices: Tensor  # [M] int64: positions in the dataset (undecodable images are absent)


def subsample_indices(size: int, max_images: Optional[int], *, seed: int = 0) -> list[int]:
    """All of ``range(size)``, or ``max_images`` of them drawn by a seeded permutation, in increasing order.

    A random draw (not the first ``max_images``) keeps every class of a folder dataset, whose images are
    sorted by class; the same ``(size, max_images, seed)`` always gives the same images.
    """
    if max_images is None or max_images >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:max_images].tolist())


def _check_folder_split(root: Path, split: str) -> ImageFolder:
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (the ImageNet layout)"
    folder = root / split
    if not folder.is_dir():
        raise EvalInputError(f"{root} has no {split}/ sub-folder; {layout}, or use {_SYNTHETIC_HELP}")
    try:
        dataset = ImageFolder(folder)
    except ValueError as error:
        raise EvalInputError(f"{error}; {layout}") from None
    if not dataset.classes:
        raise EvalInputError(f"{folder} has images but no class sub-folders; {layout}")
    unlabelled = sum(1 for _, label in dataset.samples if label < 0)
    if unlabelled:
        raise EvalInputError(f"{folder} holds {unlabelled} image(s) directly, outside any class sub-folder; {layout}")
    return dataset


def eval_splits(data: str) -> tuple[object, object, list[str]]:
    """``(train, val, class names)`` for a synthetic spec or a folder with ``train/`` and ``val/`` class sub-folders.

    Raises :class:`EvalInputError` naming the problem and the expected layout.
    """
    spec = str(data).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        try:
            train, val = build_dataset(spec, split="train"), build_dataset(spec, split="val")
        except ValueError as error:
            raise EvalInputError(str(error)) from None
        return train, val, list(train.classes)
    root = Path(os.path.expanduser(spec))
    if not root.is_dir():
        raise EvalInputError(f"--data {spec!r} is not a folder; pass a folder with train/ and val/ class "
                            f"sub-folders, or {_SYNTHETIC_HELP}")
    train, val = _check_folder_split(root, "train"), _check_folder_split(root, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise EvalInputError(f"train/ and val/ under {root} have different class sub-folders (only in train: "
                            f"{only_train[:10]}, only in val: {only_val[:10]}); both need the same classes, "
                            "because labels are the sorted folder names")
    return train, val, list(train.classes)


def knn_encoder(model: VisionTransformer, *, avgpool: bool = False) -> Encoder:
    """images ``[B, 3, H, W]`` -> L2-normalised cls token ``[B, D]``, or with ``avgpool`` the normalised
    concatenation of the cls token and the mean patch token ``[B, 2D]`` (registers are not patches)."""

    def encode(images: Tensor) -> Tensor:
        out = model.forward_features(images)
        features = out["x_norm_clstoken"]  # [B, D]
        if avgpool:
            features = torch.cat([features, out["x_norm_patchtokens"].mean(dim=1)], dim=-1)  # [B, 2D]
        return F.normalize(features.float(), dim=-1)

    return encode


def block_tokens_encoder(model: VisionTransformer, *, n_last_blocks: int) -> Encoder:
    """images -> ``[B, n + 1, D]``: the normed cls tokens of the last ``n`` blocks (oldest first), then the
    mean of the last block's normed patch tokens: everything any linear-probe configuration reads."""

    def encode(images: Tensor) -> Tensor:
        outputs = model.get_intermediate_layers(images, n_last_blocks, return_class_token=True, norm=True)
        class_tokens = [cls for _, cls in outputs]  # n x [B, D]
        patch_mean = outputs[-1][0].mean(dim=1)  # [B, D]
        return torch.stack([*class_tokens, patch_mean], dim=1).float()

    return encode


# A log file (SLURM, nohup) gets a progress line every 30 s instead of several per second.
PROGRESS_INTERVAL_S = 0.1 if sys.stderr.isatty() else 30.0


def gather_by_index(features: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' ``(features [m_r, ...], indices [m_r])`` concatenated and sorted by index, on the main rank;
    the other ranks get empty tensors (the results are computed there only, and an ImageNet feature bank on
    every rank would multiply its memory by the number of ranks). In a single process this only sorts."""
    features, indices = distributed.gather_rows_to_main(features), distributed.gather_rows_to_main(indices)
    order = indices.argsort()
    return features[order], indices[order]


@torch.no_grad()
def extract_dataset_features(encode: Encoder, dataset, *, image_size: int, batch_size: int, num_workers: int,
                             resize_size: Optional[int] = None, indices: Optional[Sequence[int]] = None,
                             device: torch.device | str = "cpu", desc: str = "features") -> FeatureSet:
    """Encode the images ``indices`` (default: all) of ``dataset`` with the official evaluation preprocessing
    (bicubic resize of the shorter side to ``resize_size``, centre crop ``image_size``, ImageNet normalisation).

    Under an initialised process group every rank encodes its share; the main rank returns the full,
    index-ordered :class:`FeatureSet`, the others an empty one. Needs ``dataset.targets`` (class label per
    index).
    """
    rank, world = distributed.rank(), distributed.world_size()
    wanted = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    loader = build_eval_loader(IndexedView(dataset, wanted[rank::world]), image_size=image_size,
                               batch_size=batch_size, num_workers=num_workers, resize_size=resize_size)
    features, seen = [], []
    bar = tqdm(loader, desc=desc, unit="batch", disable=rank != 0, dynamic_ncols=True, leave=False,
               mininterval=PROGRESS_INTERVAL_S)
    for images, batch_indices in bar:  # [B, 3, S, S], [B]
        if batch_indices.numel():
            features.append(encode(images.to(device)).float().cpu())
            seen.append(batch_indices)
    if features:
        local, local_indices = torch.cat(features), torch.cat(seen)
    else:
        # This rank's shard is empty or all undecodable; the feature shape is still needed for the gather.
        probe = encode(torch.zeros(1, 3, image_size, image_size, device=device)).float().cpu()
        local, local_indices = probe[:0], torch.zeros(0, dtype=torch.long)
    all_features, all_indices = gather_by_index(local, local_indices)
    targets = torch.as_tensor(list(dataset.targets), dtype=torch.long)
    return FeatureSet(all_features, targets[all_indices], all_indices)
