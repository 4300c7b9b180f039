"""``dinoreg data``: write the synthetic dataset as folders; index a dataset; pack it into tar shards."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dinoreg.argtypes import byte_size, int_at_least, output_folder, positive_int
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
    data = commands.add_parser("data", help="datasets: index or pack one for scale, write the synthetic one to disk",
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
    _add_index_parser(tools)
    _add_pack_parser(tools)


_SOURCE_HELP = ("a folder of images (class sub-folders give the labels; a folder holding train/ is read as "
                "train.dataset_path reads it: its train/), a .txt file list (path[TAB]label per line)")


def _add_index_parser(tools: Any) -> None:
    index = tools.add_parser(
        "index", help="build the compact index of a folder, file list or tar shards (bytes per image, shared memory)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Scan SOURCE once and write INDEX, a folder of memory-mapped numpy arrays (names, labels, and for "
                    "shards where each member lies) that `train.dataset_path=INDEX` reads: no Python object per "
                    "image, the same pages shared by every loader worker and every rank of a node, and no folder scan "
                    "at each start. The entries are in the order training lists SOURCE itself, so a run from the "
                    "index sees the same images as a run from SOURCE. The scan runs in --workers processes, one class "
                    "folder (or list slice, or shard) at a time; a killed build resumes where it stopped when run "
                    "again with the same arguments, and INDEX appears complete or not at all. Images are not opened: "
                    "an unreadable one is a bad file at training time, as without an index.",
        epilog="examples:\n  dinoreg data index /datasets/imagenet22k --output /datasets/in22k.index --workers 32\n"
               "  dinoreg data index lists/train.txt --output lists/train.index\n"
               "  dinoreg data index /datasets/laion-shards --output /datasets/laion.index   # WebDataset .tar files")
    index.add_argument("source", metavar="SOURCE",
                       help=_SOURCE_HELP + ", or a folder of WebDataset .tar shards (each sample's first image "
                                           "member; its label from a .cls member)")
    index.add_argument("--output", "-o", type=output_folder, required=True, metavar="INDEX",
                       help="folder to create (must not exist, or be empty)")
    index.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                       help="processes scanning in parallel (default: %(default)s, this machine's cores up to 8)")
    index.set_defaults(handler=_index, parser=index)


def _add_pack_parser(tools: Any) -> None:
    pack = tools.add_parser(
        "pack", help="copy a dataset into WebDataset-compatible tar shards with an index of their members",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy the images of SOURCE, in training order and byte for byte (no re-encoding), into tar shards "
                    "DIR/shard-NNNNNN.tar of about --shard-size each, with the index of their members beside them: "
                    "`train.dataset_path=DIR` then reads each image with one positioned read of a few large files "
                    "instead of opening millions of small ones, and sees exactly what it would see from SOURCE (same "
                    "order, same pixels, same labels). Each sample is KEY.EXT plus KEY.cls (its label as text) when "
                    "labelled, so the `webdataset` library reads the shards too. A file that cannot be read is packed "
                    "as an empty member (a bad file at training time, as it was). A killed pack resumes after its last "
                    "complete shard when run again with the same arguments; DIR appears complete or not at all.",
        epilog="examples:\n  dinoreg data pack /datasets/imagenet22k --output /datasets/in22k-shards --workers 32\n"
               "  dinoreg data pack /datasets/in22k.index --output /scratch/in22k-shards --shard-size 512MiB")
    pack.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP + ", an index, or packed shards")
    pack.add_argument("--output", "-o", type=output_folder, required=True, metavar="DIR",
                      help="folder to create (must not exist, or be empty)")
    pack.add_argument("--shard-size", type=byte_size, default=2**30, metavar="SIZE",
                      help="about how large each shard grows: 1GiB, 500MB, ... (default: 1GiB)")
    pack.add_argument("--workers", type=positive_int, default=16,
                      help="threads reading the source files ahead of the writer (default: %(default)s)")
    pack.set_defaults(handler=_pack, parser=pack)


def _index(args: argparse.Namespace) -> int:
    from dinoreg.data.indexing import build_index  # noqa: PLC0415 (start-up: numpy, PIL)

    try:
        result = build_index(args.source, args.output, workers=args.workers)
    except (InputError, OSError) as error:
        print(f"dinoreg data index: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {result['entries']} images from a {result['kind']} "
          f"({os.path.getsize(args.output / 'names.bin') + _arrays_bytes(args.output)} bytes)")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from dinoreg.data.shards import pack  # noqa: PLC0415 (start-up: numpy, PIL)

    try:
        result = pack(args.source, args.output, shard_size=args.shard_size, workers=args.workers)
    except (InputError, OSError) as error:
        print(f"dinoreg data pack: error: {error}", file=sys.stderr)
        return 2
    missing = f"; {result['missing']} unreadable files packed as empty members" if result["missing"] else ""
    print(f"wrote {args.output}: {result['entries']} images in {result['shards']} shards{missing}; train with "
          f"train.dataset_path={args.output}")
    return 0


def _arrays_bytes(folder: Any) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.npy"))


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
