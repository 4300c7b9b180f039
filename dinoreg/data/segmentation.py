"""Semantic-segmentation data: images paired with PNG label maps, the synthetic shapes' label maps, the loader.

On disk a label map is a single-channel PNG (8- or 16-bit) of the image's size whose pixel values are classes,
with one value meaning "ignore" (ADE20k: 0 is "other", ignored, and 1..150 are the classes). In memory a map
holds class indices ``0..C-1`` and :data:`IGNORE_LABEL` for ignored pixels: values above the ignore value move
down by one, so the classes are contiguous whatever the ignore value (0: ADE20k's 1..150 -> 0..149;
255: values are the class indices). The synthetic dataset's maps need no file: background is class 0, an
object of shape ``label`` class ``1 + label`` (:data:`~dinoreg.data.synthetic.SEGMENTATION_CLASSES`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dinoreg.data.datasets import BadFileLog, DatasetError, is_image_file, load_image
from dinoreg.data.loader import EvalTransform, ignore_job_signals, normalise_uint8
from dinoreg.data.synthetic import SEGMENTATION_CLASSES, SyntheticShapes

IGNORE_LABEL = -1  # the class index of ignored pixels in label tensors (cross-entropy's ignore_index)
MASK_EXTENSION = ".png"

__all__ = ["IGNORE_LABEL", "SegmentationFolder", "SyntheticSegmentation", "build_segmentation_loader",
           "decode_label_map", "encode_label_map"]


def decode_label_map(values: np.ndarray, ignore_value: int) -> np.ndarray:
    """Pixel values on disk -> class indices ``int64`` (``ignore_value`` -> :data:`IGNORE_LABEL`)."""
    values = values.astype(np.int64)
    classes = np.where(values > ignore_value, values - 1, values)
    classes[values == ignore_value] = IGNORE_LABEL
    return classes


def encode_label_map(classes: np.ndarray, ignore_value: int) -> np.ndarray:
    """Class indices -> pixel values, the inverse of :func:`decode_label_map`; uint8 when they fit, else uint16."""
    classes = classes.astype(np.int64)
    values = np.where(classes >= ignore_value, classes + 1, classes)
    values[classes == IGNORE_LABEL] = ignore_value
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ValueError(f"label values must be in 0..65535 for a PNG, got {values.min()}..{values.max()}")
    return values.astype(np.uint8 if values.max(initial=0) <= 255 else np.uint16)


def read_label_map(path: str, ignore_value: int) -> np.ndarray:
    """A PNG label map -> class indices ``int64 [H, W]``; a colour (RGB) PNG is refused, naming the fix."""
    with Image.open(path) as image:
        if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise DatasetError(f"label map {path} is a {image.mode} image; a label map is a single-channel PNG whose "
                               "pixel values are class indices (mode L, P or 16-bit), not a colour rendering")
        values = np.asarray(image)
    return decode_label_map(values, ignore_value)


class SegmentationFolder:
    """The images under ``images`` (recursive, sorted), each with the label map of the same relative path and
    stem under ``masks`` (``images/a/x.jpg`` -> ``masks/a/x.png``). ``get`` returns ``(PIL RGB, int64 [H, W])``,
    or ``None`` for an undecodable image (counted in ``bad_files``, as the other datasets).

    Args:
        images, masks: the two folders.
        ignore_value: the pixel value that means "ignore" (ADE20k: 0).
        classes: class names in index order; default ``class_0, class_1, ...`` for ``num_classes``.
        num_classes: the number of classes; default: read from ``classes``, else the largest class index found in
            the label maps (read once, all of them) plus one.
    """

    def __init__(self, images: str | os.PathLike, masks: str | os.PathLike, *, ignore_value: int = 0,
                 classes: Optional[Sequence[str]] = None, num_classes: Optional[int] = None):
        self.images_root, self.masks_root, self.ignore_value = Path(images), Path(masks), int(ignore_value)
        for role, root in (("images", self.images_root), ("masks", self.masks_root)):
            if not root.is_dir():
                raise DatasetError(f"the {role} folder {str(root)!r} does not exist or is not a folder")
        self.samples = self._pair()
        self.bad_files = BadFileLog()
        if classes is not None:
            self.classes = list(classes)
        else:
            count = num_classes if num_classes is not None else self._largest_class() + 1
            self.classes = [f"class_{i}" for i in range(count)]
        if num_classes is not None and num_classes != len(self.classes):
            raise DatasetError(f"{len(self.classes)} class names given for num_classes={num_classes}")

    def _pair(self) -> List[Tuple[str, str]]:
        images = sorted(p for p in self.images_root.rglob("*") if p.is_file() and is_image_file(p.name))
        if not images:
            raise DatasetError(f"no images found under {str(self.images_root)!r}")
        pairs, missing = [], []
        for image in images:
            mask = (self.masks_root / image.relative_to(self.images_root)).with_suffix(MASK_EXTENSION)
            (pairs if mask.is_file() else missing).append((str(image), str(mask)))
        if missing:
            shown = ", ".join(m for _, m in missing[:3])
            raise DatasetError(f"{len(missing)} of {len(images)} images under {str(self.images_root)!r} have no label "
                               f"map (expected {shown}{', ...' if len(missing) > 3 else ''}); every image needs a PNG of "
                               "the same relative path and name under the masks folder")
        return pairs

    def _largest_class(self) -> int:
        largest = max(int(read_label_map(mask, self.ignore_value).max(initial=IGNORE_LABEL)) for _, mask in self.samples)
        if largest < 0:
            raise DatasetError(f"every pixel of the label maps under {str(self.masks_root)!r} has the ignore value "
                               f"{self.ignore_value}; pass the right ignore value")
        return largest

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"SegmentationFolder({str(self.images_root)!r}, {str(self.masks_root)!r}, {len(self)} images, "
                f"{len(self.classes)} classes)")

    def get(self, index: int, draft_size: Optional[int] = None) -> Optional[Tuple[Image.Image, np.ndarray]]:
        image_path, mask_path = self.samples[index]
        image = load_image(image_path)  # no JPEG draft: it would change the size the label map must match
        if image is None:
            self.bad_files.record(image_path)
            return None
        labels = read_label_map(mask_path, self.ignore_value)
        if labels.shape != (image.height, image.width):
            raise DatasetError(f"label map {mask_path} is {labels.shape[1]}x{labels.shape[0]} but its image "
                               f"{image_path} is {image.width}x{image.height}; they must be the same size")
        return image, labels

    def __getitem__(self, index: int):
        return self.get(index)


class SyntheticSegmentation:
    """The synthetic shapes with their label maps (``SyntheticShapes.segmentation``): ``get`` -> ``(image, labels)``."""

    def __init__(self, shapes: SyntheticShapes):
        self.shapes = shapes
        self.classes = list(SEGMENTATION_CLASSES)
        self.bad_files = BadFileLog()  # never used: synthetic images always decode

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"SyntheticSegmentation({self.shapes!r})"

    def get(self, index: int, draft_size: Optional[int] = None) -> Tuple[Image.Image, np.ndarray]:
        return self.shapes.sample(index)["image"], self.shapes.segmentation(index)

    def __getitem__(self, index: int):
        return self.get(index)


class _SegmentationEvalDataset:
    """``(uint8 [3, S, S], int64 [S, S], index)`` for the items ``indices``: the classification evaluation's
    geometry (shorter side resized to ``resize_size``, centre crop), bicubic for the image, nearest for labels."""

    def __init__(self, dataset, indices: Sequence[int], transform: EvalTransform):
        self.dataset, self.indices, self.transform = dataset, [int(i) for i in indices], transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        item = self.dataset.get(index)
        if item is None:
            return None
        image, labels = item
        # Through PIL as a 32-bit integer image, so that nearest resampling keeps every class index intact.
        label_image = Image.fromarray(labels.astype(np.int32))  # mode "I"
        size, box = self.transform.geometry(*image.size)
        label_image = label_image.resize(size, Image.NEAREST).crop(box)
        return self.transform(image), torch.from_numpy(np.asarray(label_image, dtype=np.int64)), index


def _collate(samples) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    good = [s for s in samples if s is not None]
    if not good:
        return torch.zeros((0, 3, 1, 1)), torch.zeros((0, 1, 1), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return (normalise_uint8(torch.stack([s[0] for s in good])), torch.stack([s[1] for s in good]),
            torch.tensor([s[2] for s in good], dtype=torch.long))


def build_segmentation_loader(dataset, *, image_size: int, batch_size: int, num_workers: int,
                              indices: Optional[Sequence[int]] = None, resize_size: Optional[int] = None) -> DataLoader:
    """A finite, ordered loader of ``(images float [B, 3, S, S] normalised, labels int64 [B, S, S], indices [B])``.

    The shorter side is resized to ``resize_size`` (default ``image_size``: the whole image when it is square)
    and the centre ``image_size`` square kept, for the image and its label map alike. Undecodable images are
    dropped from their batch. Leaves torch's global RNG untouched, as the other evaluation loaders.
    """
    wanted = range(len(dataset)) if indices is None else indices
    transform = EvalTransform(image_size, image_size if resize_size is None else resize_size)
    return DataLoader(_SegmentationEvalDataset(dataset, wanted, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=_collate, drop_last=False, worker_init_fn=ignore_job_signals,
                      generator=torch.Generator().manual_seed(0))
