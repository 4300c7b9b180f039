"""``dinoreg analyze <tool>``: the registers paper's diagnostics on any backbone (``analyze flops`` lives in
:mod:`dinoreg.cli.model`).

Each tool module in :mod:`dinoreg.analysis` declares ``TOOLS = {name: Tool(...)}``; this module gives every
tool the shared options (weights, images, output folder, size, batch, device) and runs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from dinoreg.analysis import antialias, attention, disconnect, lost, neighbors, norms, pca, probe
from dinoreg.analysis.common import AnalysisError, open_inputs
from dinoreg.argtypes import positive_int

_TOOL_MODULES = [norms, neighbors, attention, pca, lost, antialias, disconnect, probe]  # in --help's order


def add_artifact_tools(analyses: Any) -> None:
    for module in _TOOL_MODULES:
        for name, tool in module.TOOLS.items():
            parser = analyses.add_parser(name, help=tool.help, description=tool.description)
            _add_shared_arguments(parser, name)
            tool.add_arguments(parser)
            parser.set_defaults(handler=_run_tool, parser=parser, tool_name=name, tool=tool)


def _add_shared_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--weights", required=True, type=Path, metavar="PATH|RUN",
                        help="a backbone dinoreg.load_backbone reads (our exports, official DINOv2 checkpoints, a "
                             "Hugging Face export directory) or a training run directory (its teacher)")
    parser.add_argument("--images", default="synthetic", metavar="DIR|synthetic",
                        help="a folder of images (its val/ sub-folder if it has one), or the synthetic dataset's "
                             "val split: synthetic[:size=N,image_size=S,objects=A-B,...] (default: %(default)s)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help=f"where the JSON and PNG figures go (default: analysis/{name})")
    parser.add_argument("--img-size", type=positive_int, metavar="PIXELS",
                        help="images are resized to this square size, a multiple of the patch size (default: the "
                             "backbone's training size)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: %(default)s)")
    parser.add_argument("--max-images", type=positive_int, default=64,
                        help="analyse the first N images (default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")


def _run_tool(args: argparse.Namespace) -> int:
    out = args.out or Path("analysis") / args.tool_name
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        inputs = open_inputs(weights=args.weights, images=args.images, image_size=args.img_size,
                             batch_size=args.batch_size, max_images=args.max_images, device=device)
        result = args.tool.run(inputs, out, args)
    except AnalysisError as error:
        print(f"dinoreg analyze {args.tool_name}: {error}", file=sys.stderr)
        return 2
    print(f"{args.tool_name}: {args.tool.summary(result)}; wrote {out}/")
    return 0
