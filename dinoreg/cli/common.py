"""Options shared by the subcommands (the value types they parse with are in :mod:`dinoreg.argtypes`)."""

from __future__ import annotations

import argparse
from typing import Any

from dinoreg.argtypes import output_file, positive_int
from dinoreg.models import ALL_ARCHS, ARCHS, FFN_LAYERS, ROPE_FFN_LAYERS, ROPE_PRESETS, arch_family
from dinoreg.models.rope_vit import ROPE_RELEASED

FLOP_UNIT = "1 FLOP = 1 multiply-add (fvcore's convention)"
# Positional-embedding resampling for other input sizes: (interpolate_antialias, interpolate_offset)
INTERPOLATIONS = {"antialias": (True, 0.0), "legacy": (False, 0.1)}


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="vit_small", choices=ALL_ARCHS, metavar="ARCH",
                        help=f"backbone architecture: DINOv2's learned-position ViTs ({', '.join(ARCHS)}) or DINOv3's "
                             f"RoPE presets ({', '.join(ROPE_PRESETS)}) (default: %(default)s)")
    parser.add_argument("--patch-size", type=positive_int,
                        help="patch size in pixels (default: 14 for vit_*, 16 for the DINOv3 presets)")
    parser.add_argument("--img-size", type=positive_int, default=224,
                        help="square input size in pixels, a multiple of --patch-size (default: %(default)s)")
    parser.add_argument("--ffn-layer", choices=tuple(dict.fromkeys((*FFN_LAYERS, *ROPE_FFN_LAYERS))),
                        help="feed-forward block: mlp, swiglu or swiglufused for vit_* (the official ViT-g uses "
                             "swiglufused); mlp or swiglu/swiglu32/64/128 for the DINOv3 presets (default: mlp for "
                             "vit_*, the preset's for DINOv3)")
    parser.add_argument("--json", type=output_file, metavar="PATH",
                        help="also write the results as JSON to PATH")


def resolve_backbone_arguments(args: argparse.Namespace) -> bool:
    """Fill in the defaults of ``args.arch``'s family (patch size, FFN) and check that ``--ffn-layer`` is one of
    that family's; True for a RoPE (DINOv3) backbone. Errors go through ``args.parser`` (one line, exit 2)."""
    rope = arch_family(args.arch) == "rope"
    if args.patch_size is None:
        args.patch_size = ROPE_RELEASED["patch_size"] if rope else 14
    if args.ffn_layer is None:
        args.ffn_layer = ROPE_PRESETS[args.arch]["ffn_layer"] if rope else "mlp"
    allowed = tuple(ROPE_FFN_LAYERS) if rope else FFN_LAYERS
    if args.ffn_layer not in allowed:
        family = "a DINOv3 RoPE preset" if rope else "a learned-position vit_* arch"
        args.parser.error(f"--ffn-layer {args.ffn_layer} is not a feed-forward block of {args.arch} ({family}); "
                          f"use one of {', '.join(allowed)}")
    return rope


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny_cpu", metavar="NAME|PATH",
                        help="a recipe from configs/ (tiny_cpu, vits14_reg4, vitb14_reg4, vitl14_reg4, "
                             "vitg14_reg4) or a YAML file (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, before or after the options (a later one wins), "
                             "e.g. optim.epochs=2 train.num_workers=4")


def check_divisible(parser: argparse.ArgumentParser, option: str, size: int, patch_size: int) -> None:
    if size % patch_size:
        lower, upper = size // patch_size * patch_size, (size // patch_size + 1) * patch_size
        suggestions = f"{lower} or {upper}" if lower else str(upper)
        parser.error(f"{option} {size} is not a multiple of --patch-size {patch_size}; "
                     f"use e.g. {option} {suggestions}")


def config_error_message(command: str, error: Exception) -> str:
    """What a command prints for a :class:`~dinoreg.config.ConfigError`: one line for one problem, else a heading
    and a line per problem."""
    problems = getattr(error, "problems", None) or [str(error)]
    if len(problems) == 1:
        return f"dinoreg {command}: invalid configuration: {problems[0]}"
    return "\n".join([f"dinoreg {command}: invalid configuration:", *str(error).splitlines()[1:]])  # under its heading


def format_summary(final: dict[str, Any]) -> str:
    """The final loss and kNN accuracy of a training run, for its last printed line."""
    return ", ".join(f"{key} {final[key]:.4g}" for key in ("total_loss", "knn_top1") if key in final)
