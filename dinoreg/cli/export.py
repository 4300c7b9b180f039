"""``dinoreg export``: a training checkpoint's backbone as a file that loads anywhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dinoreg.argtypes import positive_int
from dinoreg.errors import InputError
from dinoreg.export.source import ExportError, read_backbone, read_backbone_with_heads, resolve_reader
from dinoreg.export.writers import (
    DTYPES,
    FORMATS,
    HEAD_FORMATS,
    check_output,
    official_load_overrides,
    export_backbone,
    resize_backbone,
)
from dinoreg.models.formats import timm_resizes_like


def add_export_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write a checkpoint's teacher (or student) backbone in the official (DINOv2 / DINOv3), "
                       "safetensors, Hugging Face or timm layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read one backbone straight from a sharded training checkpoint (any world size; no FSDP, no "
                    "process group, no optimizer state) and write it for another ecosystem. The output is "
                    "written under a temporary name and renamed when complete.",
        epilog="formats:\n" + "\n".join(f"  {name:<12} {what}" for name, what in FORMATS.items()) + "\n\n"
               "examples:\n"
               "  dinoreg export runs/vitl --format safetensors --output vitl14_reg4.safetensors\n"
               "  dinoreg export runs/vitl/checkpoints/125000 --format hf --output hf/vitl14_reg4 --img-size 518\n"
               "  dinoreg export runs/vitl --format timm --output vitl14_reg4_timm.pth --dtype bf16\n"
               "  dinoreg export runs/tiny --format timm --output tiny_timm.pth --timm-name vit_small_patch14_reg4_dinov2\n"
               "  dinoreg export runs/tiny_rope --format hf --output hf/tiny_rope                # DINOv3ViTModel\n"
               "  dinoreg export runs/tiny_rope --format dinov3 --output tiny_rope.pth           # official DINOv3 hub\n"
               "  dinoreg export runs/tiny_rope --format timm --output t.pth --timm-name vit_small_patch16_dinov3_qkvb\n"
               "load it: dinoreg.load_backbone(path) (every format), torch.load(path) (dinov2, dinov3), "
               "dinov3_vits16(weights=path) of the official DINOv3 hub or of this repository's hubconf (dinov3), "
               "transformers.AutoModel.from_pretrained(dir) or pipeline('image-feature-extraction', model=dir) (hf), "
               "timm.create_model(f['model_name'], pretrained=True, pretrained_cfg_overlay={**f['pretrained_cfg'], "
               "'file': path}, **f['model_kwargs']) with f = torch.load(path) (timm; see docs/EXPORT.md)")
    export.add_argument("source", metavar="RUN_OR_CHECKPOINT", type=Path,
                        help="a training output directory (its newest intact checkpoint) or a checkpoint "
                             "directory RUN/checkpoints/<iteration>")
    export.add_argument("--format", required=True, choices=tuple(FORMATS), help="output layout (see below)")
    export.add_argument("--output", required=True, type=Path, metavar="PATH",
                        help="file to write (a directory for --format hf)")
    export.add_argument("--part", choices=("teacher", "student"), default="teacher",
                        help="which backbone; the teacher (EMA) is the one to use (default: %(default)s)")
    export.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="tensor precision of the output (default: %(default)s)")
    export.add_argument("--img-size", type=positive_int, metavar="PIXELS",
                        help="resample pos_embed for this input size, e.g. 518 as the released models; a RoPE "
                             "backbone resamples nothing and only records the size (the HF image processor's crop) "
                             "(default: the training global crop size)")
    export.add_argument("--allow-interpolation-mismatch", action="store_true",
                        help="hf: export even though the Hugging Face class resizes position embeddings differently "
                             "from this model (outputs then agree only at --img-size); see README")
    export.add_argument("--allow-rope-periods-mismatch", action="store_true",
                        help="hf, timm (RoPE backbones): export even though the model's RoPE periods differ from what "
                             "its base gives (e.g. rounded to bf16 as in the released DINOv3 files), which transformers "
                             "and timm recompute: their features then differ slightly from this model's")
    export.add_argument("--timm-name", metavar="NAME",
                        help="timm: the timm entry point to build the model with, needed when timm registers no "
                             "model for the architecture (the stored kwargs set every field; the error suggests a "
                             "name): a DINOv2 ViT name for a learned-position backbone, one of timm's DINOv3 models "
                             "(vit_*_patch16_dinov3[_qkvb]) for a RoPE one (default: timm's name for the "
                             "architecture, e.g. vit_small_patch14_reg4_dinov2, vit_small_patch16_dinov3_qkvb)")
    export.add_argument("--with-heads", action="store_true",
                        help="also write the DINO and iBOT heads of --part, in the official layout, so that others can "
                             "continue pretraining from the model (train.init_from): safetensors (dino_head.* keys), "
                             "dinov2 or dinov3 (the official teacher checkpoint layout); dinoreg.load_backbone reads "
                             "the backbone")
    export.add_argument("--force", action="store_true", help="replace PATH if it exists")
    export.set_defaults(handler=_export, parser=export)


def _export(args: argparse.Namespace) -> int:
    try:
        check_output(args.format, args.output, force=args.force)
        if args.with_heads and args.format not in HEAD_FORMATS:
            raise ExportError(f"--with-heads writes {' or '.join(HEAD_FORMATS)} (the heads in the official layout); "
                              f"--format {args.format} holds a backbone only")
        reader = resolve_reader(args.source, warn=lambda message: print(f"dinoreg export: {message}",
                                                                         file=sys.stderr))
        checkpoint = reader.checkpoint  # its files verified while resolving it: the reads below do not again
        if args.with_heads:  # one read of the checkpoint for both
            model, source, heads = read_backbone_with_heads(reader, part=args.part)
        else:
            (model, source), heads = read_backbone(reader, part=args.part), None
        if args.img_size and args.img_size != model.arch_kwargs["img_size"]:
            model = resize_backbone(model, args.img_size)
        path = export_backbone(model, source, fmt=args.format, output=args.output, dtype=args.dtype,
                               force=args.force, allow_interpolation_mismatch=args.allow_interpolation_mismatch,
                               timm_name=args.timm_name, heads=heads,
                               allow_periods_mismatch=args.allow_rope_periods_mismatch)
    except (InputError, OSError) as error:
        message = str(error).replace("allow_interpolation_mismatch=True", "--allow-interpolation-mismatch")
        message = message.replace("timm_name=", "--timm-name ")
        message = message.replace("allow_periods_mismatch=True", "--allow-rope-periods-mismatch")
        print(f"dinoreg export: {message}", file=sys.stderr)
        return 1
    print(f"wrote {path}: {args.part} backbone{' and heads' if args.with_heads else ''} of {checkpoint} (iteration {source.iteration}, saved by "
          f"{source.world_size} process(es)), {args.format}, {args.dtype}, img_size {model.arch_kwargs['img_size']}")
    if args.format == "timm" and not timm_resizes_like(model.arch_kwargs):
        print(f"note: timm resizes position embeddings with antialiased bicubic at the exact grid, this model "
              f"another way: the timm model is fixed to {model.arch_kwargs['img_size']} px (dynamic_img_size=False, "
              "so timm refuses other sizes rather than computing other features); --img-size exports another size")
    overrides = official_load_overrides(model) if args.format in ("dinov2", "dinov3") else {}
    if overrides:
        arguments = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        print(f"note: a .pth holds tensors only; load it with dinoreg.load_backbone(path, {arguments}) "
              "(or export --format safetensors, which records the architecture)")
    return 0
