"""``dinoreg model-info`` and ``dinoreg analyze``."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dinoreg.analysis.common import pyplot, save_figure
from dinoreg.argtypes import output_file, positive_int, register_count, register_list
from dinoreg.cli.analyze import add_artifact_tools
from dinoreg.cli.common import (FLOP_UNIT, INTERPOLATIONS, add_backbone_arguments, check_divisible,
                                resolve_backbone_arguments)
from dinoreg.models import ROPE_PRESETS
from dinoreg.run_dir import write_json

DEFAULT_PRESET_SIZES = (224, 512)


def add_model_info_parser(commands: Any) -> None:
    info = commands.add_parser(
        "model-info", help="build a backbone; print parameters, FLOPs and output shapes",
        description="Build a backbone (either family: DINOv2's learned-position vit_* or DINOv3's RoPE presets "
                    f"{', '.join(ROPE_PRESETS)}) on the meta device (nothing allocated: vit7b16 takes a second) and "
                    "print its parameter count, FLOPs per image and the shapes returned by forward_features; "
                    f"--presets lists the DINOv3 presets. FLOPs: {FLOP_UNIT}.")
    add_backbone_arguments(info)
    info.add_argument("--registers", type=register_count, default=4,
                      help="number of register tokens (a DINOv3 preset's storage tokens) (default: %(default)s)")
    info.add_argument("--batch-size", type=positive_int, default=1,
                      help="images in the batch whose output shapes are shown (default: %(default)s)")
    info.add_argument("--local-size", type=positive_int, metavar="PIXELS",
                      help="also show FLOPs and shapes for local crops of this size, e.g. 98")
    info.add_argument("--interpolation", choices=tuple(INTERPOLATIONS),
                      help="positional-embedding resampling of a vit_* arch for sizes other than --img-size: "
                           "antialias (bicubic, antialiased, no offset; the released registers models and our *_reg4 "
                           "recipes) or legacy (bicubic with DINO's 0.1 offset; the official defaults) (default: "
                           "antialias; a RoPE preset has no position embedding to resample)")
    info.add_argument("--presets", action="store_true",
                      help="instead, list the DINOv3 presets: width, depth, heads, FFN, storage tokens, parameters "
                           "and FLOPs per image at each of --sizes")
    info.add_argument("--sizes", type=positive_int, nargs="+", metavar="PIXELS", default=list(DEFAULT_PRESET_SIZES),
                      help="with --presets: the square image sizes, multiples of 16 (default: %(default)s)")
    info.set_defaults(handler=_model_info, parser=info)


def add_analyze_parser(commands: Any) -> None:
    analyze = commands.add_parser("analyze", help="diagnostics of the registers paper",
                                  description="Diagnostics of the registers paper.")
    analyses = analyze.add_subparsers(dest="analysis", metavar="<analysis>", required=True)
    flops = analyses.add_parser(
        "flops", help="FLOPs and parameters versus the number of register tokens",
        description="FLOPs per image and parameters of a backbone for several register counts "
                    f"(Darcet et al. 2023, Fig. 12). FLOPs: {FLOP_UNIT}.")
    add_backbone_arguments(flops)
    flops.set_defaults(arch="vit_large")
    flops.add_argument("--png", type=output_file, metavar="PATH",
                       help="also draw the FLOPs increase versus the number of registers to PATH (Fig. 12)")
    flops.add_argument("--registers", type=register_list, default=[0, 1, 2, 4, 8, 16],
                       help="comma-separated register counts (default: 0,1,2,4,8,16)")
    flops.set_defaults(handler=_analyze_flops, parser=flops)
    add_artifact_tools(analyses)


def _model_info(args: argparse.Namespace) -> int:
    from dinoreg.tools.flops import build_counted_backbone, count_flops_on_meta, count_parameters  # noqa: PLC0415

    if args.presets:
        return _presets(args)
    rope = resolve_backbone_arguments(args)
    check_divisible(args.parser, "--img-size", args.img_size, args.patch_size)
    if args.local_size is not None:
        check_divisible(args.parser, "--local-size", args.local_size, args.patch_size)
    if rope and args.interpolation is not None:
        args.parser.error(f"--interpolation: {args.arch} is a RoPE backbone, with no position embedding to resample "
                          "(it runs at any multiple of its patch size); leave --interpolation out")
    interpolation = None if rope else args.interpolation or "antialias"
    kwargs: dict[str, Any] = {"patch_size": args.patch_size, "img_size": args.img_size, "ffn_layer": args.ffn_layer}
    if not rope:
        antialias, offset = INTERPOLATIONS[interpolation]
        kwargs.update(init_values=1e-5, interpolate_antialias=antialias, interpolate_offset=offset)
    model = build_counted_backbone(args.arch, registers=args.registers, **kwargs).eval()  # on the meta device
    params = count_parameters(model)
    if rope:
        print(f"backbone     {args.arch}/{args.patch_size} (DINOv3, RoPE), {args.registers} storage tokens (the "
              f"registers), ffn {args.ffn_layer} x{model.arch_kwargs['ffn_ratio']:g}, embed_dim {model.embed_dim}, "
              f"{model.n_blocks} blocks, {model.num_heads} heads")
    else:
        print(f"backbone     {args.arch}/{args.patch_size}, {args.registers} registers, ffn {args.ffn_layer}, "
              f"embed_dim {model.embed_dim}, {model.n_blocks} blocks")
    print(f"parameters   {params:,} ({params / 1e6:.2f} M)")
    print(f"FLOPs        per image, {FLOP_UNIT}")
    report: dict[str, Any] = {"arch": args.arch, "pos_embed_type": model.pos_embed_type, "patch_size": args.patch_size,
                              "registers": args.registers, "ffn_layer": args.ffn_layer, "interpolation": interpolation,
                              "embed_dim": model.embed_dim, "params": params, "crops": []}
    crops = [("global", args.img_size)] + ([("local", args.local_size)] if args.local_size else [])
    for name, size in crops:
        flops = count_flops_on_meta(model, size)
        out = model.forward_features(torch.zeros(args.batch_size, 3, size, size, device="meta"))
        shapes = {key: list(value.shape) for key, value in out.items() if isinstance(value, torch.Tensor)}
        grid = size // args.patch_size
        print(f"\n{name} crop {size}x{size}: {grid}x{grid} = {grid * grid} patches, "
              f"{flops / 1e9:.2f} GFLOPs per image")
        print(f"  forward_features, batch of {args.batch_size}:")
        for key, shape in shapes.items():
            print(f"    {key:<20} {shape}")
        report["crops"].append({"name": name, "img_size": size, "flops": flops, "shapes": shapes})
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from dinoreg.tools.flops import preset_rows  # noqa: PLC0415 (start-up: fvcore)

    sizes = list(dict.fromkeys(args.sizes))
    for size in sizes:
        check_divisible(args.parser, "--sizes", size, 16)
    rows = preset_rows(sizes)
    print(f"DINOv3 presets (RoPE, patch 16, as released: LayerScale, mask_k_bias, layernormbf16); GFLOPs per image, "
          f"{FLOP_UNIT}")
    header = f"{'arch':<11} {'dim':>5} {'depth':>5} {'heads':>5} {'ffn':>12} {'storage':>7} {'params':>15}"
    print(header + "".join(f" {f'GFLOPs@{size}':>12}" for size in sizes))
    for row in rows:
        ffn = f"{row['ffn_layer']} x{row['ffn_ratio']:g}"
        print(f"{row['arch']:<11} {row['embed_dim']:>5} {row['depth']:>5} {row['num_heads']:>5} {ffn:>12} "
              f"{row['storage_tokens']:>7} {row['params']:>15,}"
              + "".join(f" {row['flops'][size] / 1e9:>12.2f}" for size in sizes))
    if args.json:
        print(f"wrote {write_json(args.json, rows)}")
    return 0


def _analyze_flops(args: argparse.Namespace) -> int:
    from dinoreg.tools.flops import flops_vs_registers  # noqa: PLC0415 (start-up: fvcore)

    rope = resolve_backbone_arguments(args)
    check_divisible(args.parser, "--img-size", args.img_size, args.patch_size)
    registers = list(args.registers)
    wanted = registers if 0 in registers else [0] + registers  # the baseline of the % column
    rows = flops_vs_registers(args.arch, args.patch_size, args.img_size, wanted, ffn_layer=args.ffn_layer)
    baseline = next(row["flops"] for row in rows if row["registers"] == 0)
    rows = [row for row in rows if row["registers"] in registers]
    print(f"{args.arch}/{args.patch_size} at {args.img_size}x{args.img_size}, ffn {args.ffn_layer}"
          f"{' (DINOv3, RoPE: the registers are its storage tokens)' if rope else ''}; GFLOPs per image, {FLOP_UNIT}")
    print(f"{'registers':>9}  {'params':>15}  {'GFLOPs':>9}  {'vs 0 registers':>14}")
    for row in rows:
        extra = 100.0 * (row["flops"] - baseline) / baseline
        print(f"{row['registers']:>9}  {row['params']:>15,}  {row['flops'] / 1e9:>9.2f}  {extra:>+13.2f}%")
    if args.json:
        print(f"wrote {write_json(args.json, rows)}")
    if args.png:
        _plot_flops(args, rows, baseline)
    return 0


def _plot_flops(args: argparse.Namespace, rows: list[dict[str, Any]], baseline: float) -> None:
    figure, axis = pyplot().subplots(figsize=(5, 3.2))
    counts = [row["registers"] for row in rows]
    axis.plot(counts, [100.0 * (row["flops"] - baseline) / baseline for row in rows], marker="o")
    axis.set(xlabel="register tokens", ylabel="FLOPs increase vs 0 registers (%)", xticks=counts,
             title=f"{args.arch}/{args.patch_size} at {args.img_size} px")
    axis.grid(alpha=0.3)
    save_figure(figure, args.png)
    print(f"wrote {args.png}")
