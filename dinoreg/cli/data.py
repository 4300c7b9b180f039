"""``dinoreg data export-synthetic``: the embedded synthetic dataset written as folders, to show the on-disk layouts."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dinoreg.argtypes import int_at_least, output_folder, positive_int
from dinoreg.errors import InputError


def _objects(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A or A-B (objects per image), got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= A <= B, got {text!r}")
    return bounds


def add_data_parser(commands: Any) -> None:
    data = commands.add_parser("data", help="datasets: write the synthetic one to disk",
                               description="Dataset tools.")
    tools = data.add_subparsers(dest="tool", metavar="<tool>", required=True)
    export = tools.add_parser(
        "export-synthetic", help="write the synthetic shapes as image folders with PNG label maps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the embedded synthetic dataset (the training default) to DIR in the layouts the tools read "
                    "from disk: images/<split>/<class>/<index>.png (the ImageNet layout: `dinoreg eval knn --data "
                    "DIR/images`, `dinoreg train train.dataset_path=DIR/images/train`) and masks/<split>/<class>/"
                    "<index>.png, single-channel label maps with ADE20k's conventions (0 ignored, never used here; 1 "
                    "the background; 2 + k an object of shape k), with DIR/classes.txt naming the classes in index "
                    "order: `dinoreg eval segmentation --images DIR/images/train --masks DIR/masks/train ...`. The "
                    "pixels and label maps are the in-memory dataset's; the folders list the images by class, so "
                    "order-dependent protocols (batch order, held-out split) may differ slightly from --images synthetic.",
        epilog="examples:\n  dinoreg data export-synthetic data/shapes\n"
               "  dinoreg data export-synthetic data/shapes64 --size 2000 --image-size 64 --objects 1")
    export.add_argument("output", type=output_folder, metavar="DIR",
                        help="folder to create; an existing one is replaced only once the new one is complete")
    export.add_argument("--size", type=positive_int, default=1000, help="train images (default: %(default)s)")
    export.add_argument("--val-size", type=positive_int, default=200, help="val images (default: %(default)s)")
    export.add_argument("--image-size", type=int_at_least(8, "a side in pixels >= 8"), default=64,
                        help="side in pixels, >= 8 (default: %(default)s)")
    export.add_argument("--seed", type=int, default=0, help="the dataset's seed (default: %(default)s)")
    export.add_argument("--objects", type=_objects, default=(2, 4), metavar="A[-B]",
                        help="objects per image, drawn uniformly (default: 2-4)")
    export.set_defaults(handler=_export_synthetic, parser=export)


def _export_synthetic(args: argparse.Namespace) -> int:
    from dinoreg.data.export import export_synthetic  # noqa: PLC0415 (start-up: kornia)

    try:
        counts = export_synthetic(args.output, sizes={"train": args.size, "val": args.val_size},
                                  image_size=args.image_size, seed=args.seed, objects=args.objects)
    except (InputError, OSError) as error:
        print(f"dinoreg data export-synthetic: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: " + ", ".join(f"{n} {split} images" for split, n in counts.items())
          + f" with label maps; classes in {args.output / 'classes.txt'}")
    return 0
