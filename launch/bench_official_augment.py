"""The official DINOv2 data pipeline's cost per image on one core: decode, ``DataAugmentationDINO``, collate.

Run by ``dinoreg bench data --compare official`` in a Python where the official code imports (torchvision), on the
same files as dinoreg's leg. Imports the official code from ``--official`` at run time (the folder holding
``dinov2/``); nothing of it is copied here. What is timed, per image, in one process with one torch thread:

- decode: ``Image.open(path).convert("RGB")``, as the official ImageNet dataset decodes (no draft mode);
- augment: ``DataAugmentationDINO(global_scale, local_scale, n_local, global_size, local_size)(image)``: the
  geometric crops *and* the photometric distortions (colour jitter, grayscale, blur, solarisation), ToTensor and
  normalisation, all on the CPU in the workers;
- of which geometric (extra information, not in the total): the same image's 2 global and n local
  ``RandomResizedCrop`` + flip (the pipeline's ``geometric_augmentation_global`` / ``_local``) timed again in a
  separate pass, so that the augment's remainder is its photometric distortions and tensor conversion;
- collate: ``collate_data_and_cast`` with the recipe's mask ratio and probability, its ``MaskingGenerator`` and
  fp16 inputs, as ``dinov2/train/train.py`` builds them.

Prints one JSON object on stdout (seconds per image for each part and in total).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from functools import partial


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="time the official DINOv2 augmentation and collate per image")
    parser.add_argument("--official", required=True, help="the folder holding the official dinov2/ package")
    parser.add_argument("--files", required=True, help="a text file with one image path per line")
    parser.add_argument("--warmup", type=int, default=10, help="images processed first, not timed")
    parser.add_argument("--batch", type=int, required=True, help="images per collate call (per-GPU batch)")
    parser.add_argument("--global-size", type=int, required=True)
    parser.add_argument("--local-size", type=int, required=True)
    parser.add_argument("--local-number", type=int, required=True)
    parser.add_argument("--global-scale", type=float, nargs=2, required=True)
    parser.add_argument("--local-scale", type=float, nargs=2, required=True)
    parser.add_argument("--patch-size", type=int, required=True)
    parser.add_argument("--mask-ratio", type=float, nargs=2, required=True)
    parser.add_argument("--mask-probability", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.official, "dinov2", "data", "augmentations.py")):
        print(f"--official {args.official}: no dinov2/data/augmentations.py there", file=sys.stderr)
        return 2
    sys.path.insert(0, args.official)
    import logging  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    logging.disable(logging.INFO)  # DataAugmentationDINO logs its parameters
    from dinov2.data import DataAugmentationDINO, MaskingGenerator, collate_data_and_cast  # noqa: PLC0415

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    paths = [line.strip() for line in open(args.files) if line.strip()]
    augment = DataAugmentationDINO(tuple(args.global_scale), tuple(args.local_scale), args.local_number,
                                   global_crops_size=args.global_size, local_crops_size=args.local_size)
    side = args.global_size // args.patch_size
    collate = partial(collate_data_and_cast, mask_ratio_tuple=tuple(args.mask_ratio),
                      mask_probability=args.mask_probability, n_tokens=side * side, dtype=torch.half,
                      mask_generator=MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side))
    times = {"decode": 0.0, "augment": 0.0, "collate": 0.0}
    geometric = 0.0
    timed, pending = 0, []
    for i, path in enumerate(paths):
        start = time.perf_counter()
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        decoded = time.perf_counter()
        pending.append((augment(rgb), -1))
        augmented = time.perf_counter()
        for _ in range(2):
            augment.geometric_augmentation_global(rgb)
        for _ in range(args.local_number):
            augment.geometric_augmentation_local(rgb)
        geometric_end = time.perf_counter()
        if i >= args.warmup:
            geometric += geometric_end - augmented
            times["decode"] += decoded - start
            times["augment"] += augmented - decoded
            timed += 1
        if len(pending) == args.batch or i == len(paths) - 1:
            start = time.perf_counter()
            collate(pending)
            if i >= args.warmup:  # a batch that straddles the warm-up: counted in proportion
                times["collate"] += (time.perf_counter() - start) * min(1.0, timed / len(pending))
            pending = []
    if timed == 0:
        print(f"no image timed: {len(paths)} files, --warmup {args.warmup}", file=sys.stderr)
        return 2
    import torchvision  # noqa: PLC0415
    import PIL  # noqa: PLC0415

    per_image = {f"{k}_s_per_image": v / timed for k, v in times.items()}
    total = sum(per_image.values())
    print(json.dumps({**per_image, "total_s_per_image": total, "augment_geometric_s_per_image": geometric / timed, "images_per_s": 1.0 / total, "images": timed,
                      "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
