"""``dinoreg <subcommand>``: parses arguments and delegates; no logic of its own.

Subcommands:
  train            self-supervised training (DINO + iBOT + KoLeo) from a recipe
  bench train      time the real training loop: iteration time, images/s, data wait
  bench checkpoint time saving and loading a full training checkpoint; its size
  model-info       build a backbone and print its parameters, FLOPs and output shapes
  analyze flops    FLOPs and parameters versus the number of register tokens

FLOPs everywhere are fvcore's unit: one multiply-add counts as one flop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from dinoreg.models import ARCHS, FFN_LAYERS, build_backbone

FLOP_UNIT = "1 FLOP = 1 multiply-add (fvcore's convention)"
# Positional-embedding resampling for other input sizes: (interpolate_antialias, interpolate_offset)
INTERPOLATIONS = {"antialias": (True, 0.0), "legacy": (False, 0.1)}


# ----------------------------------------------------------------------------- argument types

def _int_at_least(minimum: int, what: str):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


_positive_int = _int_at_least(1, "a positive integer")
_register_count = _int_at_least(0, "a number of register tokens >= 0")


def _register_list(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0 such as 0,1,2,4,8,16; got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"register counts must be >= 0; got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"register counts must not repeat; got {text!r}")
    return values


def _add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="vit_small", choices=ARCHS,
                        help="backbone architecture (default: %(default)s)")
    parser.add_argument("--patch-size", type=_positive_int, default=14,
                        help="patch size in pixels (default: %(default)s)")
    parser.add_argument("--img-size", type=_positive_int, default=224,
                        help="square input size in pixels, a multiple of --patch-size (default: %(default)s)")
    parser.add_argument("--ffn-layer", default="mlp", choices=FFN_LAYERS,
                        help="feed-forward block; the official ViT-g uses swiglufused (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the results as JSON to PATH")


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny_cpu", metavar="NAME|PATH",
                        help="a recipe from configs/ (tiny_cpu, vits14_reg4, vitb14_reg4, vitl14_reg4, "
                             "vitg14_reg4) or a YAML file (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. optim.epochs=2 train.num_workers=4")


def _check_divisible(parser: argparse.ArgumentParser, option: str, size: int, patch_size: int) -> None:
    if size % patch_size:
        lower, upper = size // patch_size * patch_size, (size // patch_size + 1) * patch_size
        suggestions = f"{lower} or {upper}" if lower else str(upper)
        parser.error(f"{option} {size} is not a multiple of --patch-size {patch_size}; "
                     f"use e.g. {option} {suggestions}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinoreg", description="DINOv2-style self-supervised ViTs with register tokens.")
    commands = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)

    train = commands.add_parser(
        "train", help="self-supervised training (DINO + iBOT + KoLeo) from a recipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a student/teacher ViT with registers. The configuration is the schema defaults "
                    "(the official DINOv2 ones), then the recipe, then key=value overrides.",
        epilog="Writes DIR/config.yaml (resolved), DIR/metrics.jsonl, TensorBoard events under "
               "DIR/tensorboard, checkpoints under DIR/checkpoints/<iteration> and the teacher backbone "
               "DIR/teacher_backbone.safetensors. Run it again on the same DIR to resume from the newest "
               "checkpoint. Runs as one process, or one process per GPU under torchrun or srun (FSDP2).\n\n"
               "exit codes: 0 done, 1 error, 2 bad configuration or arguments, 75 stopped by a signal after "
               "saving a checkpoint (requeue and rerun to resume).\n\n"
               "examples:\n"
               "  dinoreg train --output-dir runs/tiny                   # tiny_cpu on the synthetic dataset\n"
               "  torchrun --nproc_per_node=8 -m dinoreg train --config vitl14_reg4 --output-dir runs/l \\\n"
               "      train.dataset_path=/data/imagenet/train train.batch_size_per_gpu=32")
    _add_recipe_arguments(train)
    train.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                       help="where the config, metrics, TensorBoard logs and weights go (sets train.output_dir)")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration and exit without training")
    train.add_argument("--no-resume", action="store_true",
                       help="start fresh instead of resuming from DIR/checkpoints; refused when DIR already "
                            "holds a run, unless --force")
    train.add_argument("--force", action="store_true",
                       help="with --no-resume: delete the run already in DIR (checkpoints, metrics, TensorBoard "
                            "logs, weights) and start fresh")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even when the config differs from the checkpoint's in keys that change the "
                            "model or the data order (the differences are logged)")
    train.set_defaults(handler=_train, parser=train)

    info = commands.add_parser(
        "model-info", help="build a backbone; print parameters, FLOPs and output shapes",
        description="Build a backbone and print its parameter count, FLOPs per image and the shapes "
                    f"returned by forward_features. FLOPs: {FLOP_UNIT}.")
    _add_backbone_arguments(info)
    info.add_argument("--registers", type=_register_count, default=4,
                      help="number of register tokens (default: %(default)s)")
    info.add_argument("--batch-size", type=_positive_int, default=1,
                      help="images in the batch whose output shapes are shown (default: %(default)s)")
    info.add_argument("--local-size", type=_positive_int, metavar="PIXELS",
                      help="also show FLOPs and shapes for local crops of this size, e.g. 98")
    info.add_argument("--interpolation", choices=tuple(INTERPOLATIONS), default="antialias",
                      help="positional-embedding resampling for sizes other than --img-size: antialias "
                           "(bicubic, antialiased, no offset; the released registers models and our *_reg4 "
                           "recipes) or legacy (bicubic with DINO's 0.1 offset; the official defaults) "
                           "(default: %(default)s)")
    info.set_defaults(handler=_model_info, parser=info)

    bench = commands.add_parser("bench", help="benchmarks (speed, not correctness)",
                                description="Benchmarks; numbers for docs/BENCHMARKS.md and the README.")
    benches = bench.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    bench_train = benches.add_parser(
        "train", help="iteration time, images/s and data wait of the training loop",
        description="Run the real training loop (kNN evaluation off) for --warmup + --iterations steps in a "
                    "temporary directory and summarise the last --iterations.")
    _add_recipe_arguments(bench_train)
    bench_train.add_argument("--iterations", type=_positive_int, default=50,
                             help="measured iterations (default: %(default)s)")
    bench_train.add_argument("--warmup", type=_int_at_least(0, "a number of iterations >= 0"), default=10,
                             help="iterations run first and not measured (default: %(default)s)")
    bench_train.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    bench_train.set_defaults(handler=_bench_train, parser=bench_train)
    bench_checkpoint = benches.add_parser(
        "checkpoint", help="time saving and loading a full training checkpoint; its size",
        description="Save and load a recipe's full training state (student, teacher, DINO/iBOT centres, AdamW "
                    "state) with the training loop's own checkpoint functions, in one process, and print the "
                    "median times and the size on disk.")
    _add_recipe_arguments(bench_checkpoint)
    bench_checkpoint.add_argument("--repeats", type=_positive_int, default=3,
                                  help="saves and loads to take the median of (default: %(default)s)")
    bench_checkpoint.add_argument("--dir", type=Path, metavar="DIR",
                                  help="write the checkpoints under DIR (default: the system temporary directory)")
    bench_checkpoint.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    bench_checkpoint.set_defaults(handler=_bench_checkpoint, parser=bench_checkpoint)

    analyze = commands.add_parser("analyze", help="diagnostics of the registers paper",
                                  description="Diagnostics of the registers paper.")
    analyses = analyze.add_subparsers(dest="analysis", metavar="<analysis>", required=True)
    flops = analyses.add_parser(
        "flops", help="FLOPs and parameters versus the number of register tokens",
        description="FLOPs per image and parameters of a backbone for several register counts "
                    f"(Darcet et al. 2023, Fig. 12). FLOPs: {FLOP_UNIT}.")
    _add_backbone_arguments(flops)
    flops.set_defaults(arch="vit_large")
    flops.add_argument("--registers", type=_register_list, default=[0, 1, 2, 4, 8, 16],
                       help="comma-separated register counts (default: 0,1,2,4,8,16)")
    flops.set_defaults(handler=_analyze_flops, parser=flops)
    return parser


# ----------------------------------------------------------------------------- subcommands

def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def _train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf  # noqa: PLC0415

    from dinoreg.config import ConfigError, load_config  # noqa: PLC0415
    from dinoreg.train.checkpoint import CheckpointError  # noqa: PLC0415 (heavy imports)
    from dinoreg.train.distributed import DistributedSetupError  # noqa: PLC0415
    from dinoreg.train.loop import NonFiniteLossError, StoppedOnSignal, prepare_output_dir, train  # noqa: PLC0415

    try:
        cfg = load_config(args.config, [*args.overrides, f"train.output_dir={args.output_dir}"])
    except ConfigError as error:
        print(f"dinoreg train: invalid configuration:\n{error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    try:
        prepare_output_dir(args.output_dir, resume=not args.no_resume, force=args.force)
        final = train(cfg, resume=not args.no_resume, allow_config_change=args.allow_config_change)
    except StoppedOnSignal as stop:
        print(f"dinoreg train: {stop}", file=sys.stderr)
        return stop.exit_code
    except (NonFiniteLossError, CheckpointError, DistributedSetupError, ValueError) as error:
        print(f"dinoreg train: {error}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{key} {final[key]:.4g}" for key in ("total_loss", "knn_top1") if key in final)
    print(f"done: {summary}; outputs in {args.output_dir}")
    return 0


def _run_benchmark(args: argparse.Namespace, run: Any, report: Any) -> int:
    from dinoreg.config import ConfigError  # noqa: PLC0415

    try:
        result = run()
    except ConfigError as error:
        print(f"dinoreg bench {args.benchmark}: invalid configuration:\n{error}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from dinoreg.bench import benchmark_training, format_report  # noqa: PLC0415 (heavy imports)

    return _run_benchmark(args, lambda: benchmark_training(args.config, iterations=args.iterations,
                                                           warmup=args.warmup, overrides=args.overrides),
                          format_report)


def _bench_checkpoint(args: argparse.Namespace) -> int:
    from dinoreg.bench import benchmark_checkpoint, format_checkpoint_report  # noqa: PLC0415 (heavy imports)

    directory = None if args.dir is None else str(args.dir)
    return _run_benchmark(args, lambda: benchmark_checkpoint(args.config, repeats=args.repeats,
                                                             overrides=args.overrides, directory=directory),
                          format_checkpoint_report)


def _model_info(args: argparse.Namespace) -> int:
    from dinoreg.analysis.flops import count_flops, count_parameters  # noqa: PLC0415 (fvcore is slow to import)

    _check_divisible(args.parser, "--img-size", args.img_size, args.patch_size)
    if args.local_size is not None:
        _check_divisible(args.parser, "--local-size", args.local_size, args.patch_size)
    antialias, offset = INTERPOLATIONS[args.interpolation]
    model = build_backbone(args.arch, patch_size=args.patch_size, img_size=args.img_size,
                           num_register_tokens=args.registers, init_values=1e-5, ffn_layer=args.ffn_layer,
                           interpolate_antialias=antialias, interpolate_offset=offset).eval()
    params = count_parameters(model)
    print(f"backbone     {args.arch}/{args.patch_size}, {args.registers} registers, ffn {args.ffn_layer}, "
          f"embed_dim {model.embed_dim}, {model.n_blocks} blocks")
    print(f"parameters   {params:,} ({params / 1e6:.2f} M)")
    print(f"FLOPs        per image, {FLOP_UNIT}")
    report: dict[str, Any] = {"arch": args.arch, "patch_size": args.patch_size, "registers": args.registers,
                              "ffn_layer": args.ffn_layer, "interpolation": args.interpolation, "embed_dim": model.embed_dim, "params": params,
                              "crops": []}
    crops = [("global", args.img_size)] + ([("local", args.local_size)] if args.local_size else [])
    for name, size in crops:
        flops = count_flops(model, size)
        with torch.no_grad():
            out = model.forward_features(torch.randn(args.batch_size, 3, size, size))
        shapes = {key: list(value.shape) for key, value in out.items() if isinstance(value, torch.Tensor)}
        grid = size // args.patch_size
        print(f"\n{name} crop {size}x{size}: {grid}x{grid} = {grid * grid} patches, "
              f"{flops / 1e9:.2f} GFLOPs per image")
        print(f"  forward_features, batch of {args.batch_size}:")
        for key, shape in shapes.items():
            print(f"    {key:<20} {shape}")
        report["crops"].append({"name": name, "img_size": size, "flops": flops, "shapes": shapes})
    if args.json:
        _write_json(args.json, report)
    return 0


def _analyze_flops(args: argparse.Namespace) -> int:
    from dinoreg.analysis.flops import flops_vs_registers  # noqa: PLC0415 (fvcore is slow to import)

    _check_divisible(args.parser, "--img-size", args.img_size, args.patch_size)
    registers = list(args.registers)
    wanted = registers if 0 in registers else [0] + registers  # the baseline of the % column
    rows = flops_vs_registers(args.arch, args.patch_size, args.img_size, wanted, ffn_layer=args.ffn_layer)
    baseline = next(row["flops"] for row in rows if row["registers"] == 0)
    rows = [row for row in rows if row["registers"] in registers]
    print(f"{args.arch}/{args.patch_size} at {args.img_size}x{args.img_size}, ffn {args.ffn_layer}; "
          f"GFLOPs per image, {FLOP_UNIT}")
    print(f"{'registers':>9}  {'params':>15}  {'GFLOPs':>9}  {'vs 0 registers':>14}")
    for row in rows:
        extra = 100.0 * (row["flops"] - baseline) / baseline
        print(f"{row['registers']:>9}  {row['params']:>15,}  {row['flops'] / 1e9:>9.2f}  {extra:>+13.2f}%")
    if args.json:
        _write_json(args.json, rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinoreg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
