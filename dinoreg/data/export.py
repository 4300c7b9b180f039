"""The synthetic dataset on disk: class folders of PNG images and their PNG label maps, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Tuple

from PIL import Image
from tqdm import tqdm

from dinoreg.data.segmentation import encode_label_map
from dinoreg.data.synthetic import CLASSES, SEGMENTATION_CLASSES, SyntheticShapes
from dinoreg.run_dir import publish

IGNORE_VALUE = 0  # ADE20k's convention: 0 is ignored, the classes start at 1


def export_synthetic(output: str | os.PathLike, *, sizes: Mapping[str, int], image_size: int = 64, seed: int = 0,
                     objects: Tuple[int, int] = (2, 4)) -> dict[str, int]:
    """Write ``images/<split>/<class>/<index>.png``, ``masks/<split>/<class>/<index>.png`` (label values: 0 ignored,
    1 + class of :data:`SEGMENTATION_CLASSES`) and ``classes.txt`` under ``output``; returns the images per split.
    The folder appears only complete: it is built beside ``output`` and renamed over it."""
    datasets = {split: SyntheticShapes(split, size=size, image_size=image_size, seed=seed, objects=objects)
                for split, size in sizes.items()}
    with publish(output, directory=True) as tmp:
        for split, dataset in datasets.items():
            for name in CLASSES:
                (tmp / "images" / split / name).mkdir(parents=True)
                (tmp / "masks" / split / name).mkdir(parents=True)
            targets = dataset.targets
            for index in tqdm(range(len(dataset)), desc=f"{split} images", unit="image", leave=False):
                relative = Path(split) / CLASSES[targets[index]] / f"{index:06d}.png"
                dataset.sample(index)["image"].save(tmp / "images" / relative)
                values = encode_label_map(dataset.segmentation(index), IGNORE_VALUE)
                Image.fromarray(values).save(tmp / "masks" / relative)
        (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in SEGMENTATION_CLASSES), encoding="utf-8")
    return {split: len(dataset) for split, dataset in datasets.items()}
