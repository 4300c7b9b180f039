"""``dinoreg train`` and ``dinoreg bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dinoreg.argtypes import int_at_least, non_negative_float, output_file, output_folder, positive_float, positive_int
from dinoreg.cli.common import add_recipe_arguments, config_error_message, format_summary
from dinoreg.errors import InputError
from dinoreg.models.weights import WeightsFileError
from dinoreg.run_dir import write_json


def add_train_parser(commands: Any) -> None:
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
    add_recipe_arguments(train)
    train.add_argument("--output-dir", type=output_folder, metavar="DIR",
                       help="where the config, metrics, TensorBoard logs and weights go (sets train.output_dir); "
                            "required except with --print-config")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration and exit without training")
    train.add_argument("--no-resume", action="store_true",
                       help="start fresh instead of resuming from DIR/checkpoints; refused when DIR already "
                            "holds a run, unless --force")
    train.add_argument("--force", action="store_true",
                       help="with --no-resume: move the run already in DIR (checkpoints, metrics, TensorBoard "
                            "logs, weights) aside to DIR/previous-<time>/ and start fresh")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even when the config differs from the checkpoint's in keys that change the "
                            "model or the data order (the differences are logged)")
    train.set_defaults(handler=_train, parser=train)


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmarks (speed, not correctness)",
                                description="Benchmarks; numbers for docs/BENCHMARKS.md and the README.")
    benches = bench.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    bench_train = _bench_command(benches, _bench_train, "results",
        "train", help="iteration time, images/s, TFLOP/s and MFU, peak memory and data wait of the training loop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the real training loop for --warmup + --iterations steps in a temporary directory and "
                    "summarise the last --iterations: step time (median, mean, p90) on a clock synchronised with "
                    "the device after every step, images/s, FLOPs per step (counted on the meta device), achieved "
                    "TFLOP/s, MFU against a matmul peak measured in the same run and against the device's nominal "
                    "peak when known, peak memory (CUDA max allocated, or the process's peak RSS), data wait and "
                    "whether the losses are finite and falling. A benchmark keeps nothing: no evaluation, no "
                    "checkpoint, no teacher file; the artifact monitor is off (monitor.period=N turns it on) and "
                    "the model is drawn on the device (train.initialisation=cpu for the reproducible start).",
        epilog="examples:\n"
               "  dinoreg bench train --config vitl14_reg4 --compare --json l.json\n"
               "  dinoreg bench train --config vitl14_reg4 train.fsdp=always     # FSDP2 in one process\n"
               "  dinoreg bench flops --config vitg14_reg4 --json g_flops.json\n"
               "  dinoreg bench train --config vitg14_reg4 --flops g_flops.json --profile g_kernels.txt")
    bench_train.add_argument("--iterations", type=positive_int, default=50,
                             help="measured iterations (default: %(default)s)")
    bench_train.add_argument("--warmup", type=int_at_least(1, "a number of iterations >= 1"), default=10,
                             help="iterations run first and not measured, at least 1 (default: %(default)s)")
    bench_train.add_argument("--compare", action="store_true",
                             help="also run the same steps the naive way (eager, math attention, no activation "
                                  "checkpointing, single-tensor AdamW), after freeing the first run's memory, and "
                                  "report the speed-up; a naive run that runs out of memory is reported as not "
                                  "fitting and the first result is kept")
    bench_train.add_argument("--flops", type=flops_file, metavar="PATH",
                             help="the FLOPs of a step, from `dinoreg bench flops --json PATH` for the same config "
                                  "and batch, instead of counting them here")
    bench_train.add_argument("--profile", type=output_file, metavar="PATH",
                             help="profile 2 more steps after the timed ones and write the table of their top "
                                  "operators and kernels (by self device time on a GPU) to PATH")
    _bench_command(benches, _bench_flops, "counts",
        "flops", help="the FLOPs of one training step of a recipe (no GPU, no weights)",
        description="FLOPs of one training step on one device at the recipe's per-device batch: the student's "
                    "forward on every crop (x3 with its backward) and the target teacher's on the global crops, "
                    "heads included, 2 FLOPs per multiply-add, counted with torch's FlopCounterMode on the model "
                    "built on the meta device (a second or two for ViT-g). `dinoreg bench train --flops` reads the "
                    "JSON.",
        epilog="example: dinoreg bench flops --config vitl14_reg4 train.batch_size_per_gpu=32 --json l_flops.json")
    _bench_command(benches, _bench_heads, "results",
        "heads", help="peak memory of the prototype heads and losses alone",
        description="One forward + backward through the student and teacher prototype heads and the DINO and iBOT "
                    "losses of a recipe, at its per-device batch and iBOT masks, with the backbones replaced by "
                    "stand-ins that emit tokens of the right shapes; prints the peak memory of that step (CUDA max "
                    "allocated, or the resident-set high-water mark on CPU) and compares it with the size of the "
                    "fp32 logits of all rows.",
        epilog="example: dinoreg bench heads --config vitl14_reg4 train.batch_size_per_gpu=4")
    bench_memory = _bench_command(benches, _bench_memory, "plan",
        "memory", help="plan the memory per GPU of a run and the largest per-GPU batch that fits, before submitting",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per GPU: fp32 master parameters, bf16 compute copies, gradients and AdamW moments (counted on "
                    "the model built on the meta device, divided by --gpus under full_shard or shard_grad_op), "
                    "activations per crop group (one block measured by a real forward on this CPU at the model's "
                    "width, precision and checkpointing mode, times the depth), heads and losses (measured at two "
                    "small batches, extended linearly), an assumed reserve, the total, and the largest per-GPU "
                    "batch that fits --gpu-memory-gib. Takes a minute or two on a CPU for ViT-L/g; allocates no "
                    "full model.",
        epilog="examples:\n"
               "  dinoreg bench memory --config vitl14_reg4 --gpus 8 --gpu-memory-gib 80\n"
               "  dinoreg bench memory --config vitg14_reg4 --gpus 16 --batch 32 --gpu-memory-gib 141 \\\n"
               "      --activation-checkpointing selective train.sharding=full_shard")
    bench_memory.add_argument("--gpus", type=positive_int, default=1,
                              help="GPUs the run shards over (default: %(default)s)")
    bench_memory.add_argument("--batch", type=positive_int, metavar="B",
                              help="images per GPU (default: the recipe's train.batch_size_per_gpu)")
    bench_memory.add_argument("--gpu-memory-gib", type=positive_float, default=80.0, metavar="GIB",
                              help="memory of one GPU, for the largest batch that fits (default: %(default)s)")
    bench_memory.add_argument("--activation-checkpointing", choices=("none", "selective", "full"),
                              help="plan with this train.activation_checkpointing (default: the recipe's)")
    bench_memory.add_argument("--reserve-gib", type=non_negative_float, default=2.0, metavar="GIB",
                              help="memory assumed taken by the CUDA context, NCCL buffers and fragmentation "
                                   "(default: %(default)s)")
    bench_memory.add_argument("--fp32", action="store_true",
                              help="plan an fp32 run (a CPU's) instead of bf16 (a GPU's)")
    bench_checkpoint = _bench_command(benches, _bench_checkpoint, "results",
        "checkpoint", help="time saving and loading a full training checkpoint; its size",
        description="Save and load a recipe's full training state (student, teacher, DINO/iBOT centres, AdamW "
                    "state) with the training loop's own checkpoint functions, in one process, and print the "
                    "median times and the size on disk.")
    bench_checkpoint.add_argument("--repeats", type=positive_int, default=3,
                                  help="saves and loads to take the median of (default: %(default)s)")
    bench_checkpoint.add_argument("--dir", type=output_folder, metavar="DIR",
                                  help="write the checkpoints under DIR (default: the system temporary directory)")

    bench_data = _bench_command(benches, _bench_data, "results",
        "data", help="images/s per worker core of the data pipeline, the data wait of a step, the index's bytes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The recipe's multi-crop on a dataset (train.dataset_path, or --data). Per image, in this process "
                    "on one core: the decode (with the draft reduction the crops allow, as the training loader "
                    "decodes), the geometric crops and the collate (iBOT masks included), timed separately and in "
                    "total, so images/s per worker core and the cores per GPU needed at 200 and 400 img/s; the "
                    "photometric distortions timed on this CPU as extra information (training runs them on the "
                    "device). With --step-seconds or --gpu-img-s: the real training loader with --workers workers, "
                    "read at the pace of a training step, and the share of the step spent waiting for it. The "
                    "dataset's index bytes per image where it has an index. With --compare official: the official "
                    "DINOv2 augmentation and collate on the same files in another Python, side by side.",
        epilog="examples:\n"
               "  dinoreg bench data --config vitl14_reg4 --data /data/imagenet/train --images 2000\n"
               "  dinoreg bench data --config vitl14_reg4 --data /data/jpegs --workers 10 --gpu-img-s 200\n"
               "  dinoreg bench data --config vitg14_reg4 --data /data/jpegs --compare official \\\n"
               "      --official /tmp/dinov2 --official-python /tmp/tvenv/bin/python --json g_data.json")
    bench_data.add_argument("--data", metavar="PATH",
                            help="the dataset: a folder of images, a file list or anything train.dataset_path "
                                 "accepts (default: the config's train.dataset_path)")
    bench_data.add_argument("--images", type=positive_int, default=200,
                            help="images timed per part, after the warm-up (default: %(default)s)")
    bench_data.add_argument("--warmup", type=int_at_least(0, "a number of images >= 0"), default=10,
                            help="images processed first and not timed (default: %(default)s)")
    bench_data.add_argument("--workers", type=int_at_least(0, "a number of workers >= 0"),
                            help="loader workers for the data-wait measurement (default: the config's "
                                 "train.num_workers)")
    pace = bench_data.add_mutually_exclusive_group()
    pace.add_argument("--step-seconds", type=positive_float, metavar="S",
                      help="measure the data wait with the loader read once every S seconds (the step time)")
    pace.add_argument("--gpu-img-s", type=positive_float, metavar="R",
                      help="measure the data wait at the step time of a GPU training at R images/s "
                           "(S = train.batch_size_per_gpu / R); also prints the cores per GPU at R")
    bench_data.add_argument("--steps", type=positive_int, default=20,
                            help="steps timed for the data wait, after the workers' prefetch is drained "
                                 "(default: %(default)s)")
    bench_data.add_argument("--compare", choices=("official",),
                            help="official: also time the official DINOv2 augmentation and collate on the same "
                                 "files (needs --official)")
    bench_data.add_argument("--official", metavar="DIR",
                            help="with --compare official: the folder holding the official dinov2/ package")
    bench_data.add_argument("--official-python", metavar="PYTHON",
                            help="with --compare official: a Python where the official code and torchvision import "
                                 "(default: this one)")

# the config keys that name a weights file to read at start-up
_WEIGHTS_KEYS = ("train.init_from", "student.pretrained_weights", "distillation.teacher", "gram.ckpt", "phase.start_from")


def _bench_command(benches: Any, handler: Any, what: str, name: str, **parser_options: Any) -> argparse.ArgumentParser:
    """A ``dinoreg bench`` subcommand: the recipe arguments, ``--json`` (the ``what`` as JSON) and its handler."""
    parser = benches.add_parser(name, **parser_options)
    add_recipe_arguments(parser)
    parser.add_argument("--json", type=output_file, metavar="PATH", help=f"also write the {what} as JSON to PATH")
    parser.set_defaults(handler=handler, parser=parser)
    return parser


def _failures() -> tuple[type[Exception], ...]:
    """What a run or a benchmark can fail with that is the input's fault or the machine's, not a bug: each is told
    in one line by :func:`_report_failure`. Anything else is a bug: its traceback shows where."""
    return (InputError, OSError)


def _report_failure(command: str, error: Exception, cfg: Any) -> int:
    """Print ``error`` (one of :func:`_failures`) for ``dinoreg COMMAND`` and return the exit code: 2 for a bad
    configuration value (a recipe, a dataset or a weights file that cannot be used), 1 otherwise. ``cfg``: the
    configuration when it was loaded, to name the key of a weights file."""
    from omegaconf import OmegaConf  # noqa: PLC0415 (start-up: omegaconf)

    from dinoreg.config import ConfigError  # noqa: PLC0415 (start-up: omegaconf)
    from dinoreg.data import DatasetError  # noqa: PLC0415 (start-up: kornia)

    if isinstance(error, ConfigError):
        print(config_error_message(command, error), file=sys.stderr)
        return 2
    if isinstance(error, DatasetError):  # a bad value, as every other bad config value: exit 2
        print(f"dinoreg {command}: invalid configuration: train.dataset_path: {error}", file=sys.stderr)
        return 2
    if isinstance(error, WeightsFileError):  # a file a config key names: say which key
        keys = [key for key in _WEIGHTS_KEYS if cfg is not None and str(OmegaConf.select(cfg, key) or "") == error.path]
        named = f"{keys[0]}: " if keys and not str(error).startswith(keys[0]) else ""
        print(f"dinoreg {command}: {named}{error}", file=sys.stderr)
        return 2
    print(f"dinoreg {command}: {error}", file=sys.stderr)
    return 1


def _train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf  # noqa: PLC0415 (start-up: omegaconf)

    from dinoreg.config import ConfigError, load_config  # noqa: PLC0415 (start-up: omegaconf)
    from dinoreg.train.loop import train  # noqa: PLC0415 (start-up: training stack)
    from dinoreg.train.run_folder import prepare_output_dir  # noqa: PLC0415 (start-up: training stack)

    if args.output_dir is None and not args.print_config:
        args.parser.error("the following arguments are required: --output-dir (except with --print-config)")
    output = [f"train.output_dir={args.output_dir}"] if args.output_dir is not None else []
    try:
        cfg = load_config(args.config, [*args.overrides, *output])
    except ConfigError as error:
        return _report_failure("train", error, None)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    try:
        prepare_output_dir(args.output_dir, resume=not args.no_resume, force=args.force)
        final = train(cfg, resume=not args.no_resume, allow_config_change=args.allow_config_change)
    except _failures() as error:
        return _report_failure("train", error, cfg)
    if final:  # the main process's; the others log nothing
        print(f"done: {format_summary(final)}; outputs in {args.output_dir}")
    return 0


def _run_benchmark(args: argparse.Namespace, run: Any, report: Any) -> int:
    from dinoreg.config import ConfigError, load_config  # noqa: PLC0415 (start-up: omegaconf)

    try:
        result = run()
    except _failures() as error:
        try:  # the keys of the weights files it names
            cfg = load_config(args.config, args.overrides)
        except ConfigError:
            cfg = None
        return _report_failure(f"bench {args.benchmark}", error, cfg)
    print(report(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    from dinoreg.tools.data_bench import benchmark_data, format_data_report  # noqa: PLC0415 (start-up: training stack)

    if args.compare == "official" and args.official is None:
        args.parser.error("--compare official needs --official DIR, the folder holding the official dinov2/ package")
    if args.compare is None and (args.official is not None or args.official_python is not None):
        args.parser.error("--official and --official-python are used only with --compare official")
    return _run_benchmark(args, lambda: benchmark_data(
        args.config, overrides=args.overrides, data=args.data, images=args.images, warmup=args.warmup,
        workers=args.workers, step_seconds=args.step_seconds, gpu_images_per_s=args.gpu_img_s, steps=args.steps,
        official=args.official if args.compare == "official" else None, official_python=args.official_python),
        format_data_report)


def _bench_memory(args: argparse.Namespace) -> int:
    from dinoreg.tools.planner import format_memory_plan, plan_memory  # noqa: PLC0415 (start-up: training stack)

    return _run_benchmark(args, lambda: plan_memory(
        args.config, gpus=args.gpus, batch=args.batch, gpu_memory_gib=args.gpu_memory_gib,
        activation_checkpointing=args.activation_checkpointing, reserve_gib=args.reserve_gib,
        overrides=args.overrides, bf16=False if args.fp32 else None), format_memory_plan)


def _bench_heads(args: argparse.Namespace) -> int:
    from dinoreg.tools.heads import benchmark_heads, format_heads_report  # noqa: PLC0415 (start-up: training stack)

    return _run_benchmark(args, lambda: benchmark_heads(args.config, overrides=args.overrides), format_heads_report)


def _bench_train(args: argparse.Namespace) -> int:
    from dinoreg.tools.training import benchmark_training, format_report  # noqa: PLC0415 (start-up: training stack)

    profile = None if args.profile is None else str(args.profile)
    return _run_benchmark(args, lambda: benchmark_training(args.config, iterations=args.iterations,
                                                           warmup=args.warmup, overrides=args.overrides,
                                                           compare=args.compare, flops=args.flops, profile=profile),
                          format_report)


def _bench_flops(args: argparse.Namespace) -> int:
    from dinoreg.tools.flops import count_step_flops, format_flops_report  # noqa: PLC0415 (start-up: fvcore)

    return _run_benchmark(args, lambda: count_step_flops(args.config, overrides=args.overrides), format_flops_report)


def flops_file(text: str) -> dict[str, float]:
    """``--flops PATH``: a JSON object with a number >= 0 for each of the step's FLOP counts (read as data)."""
    from dinoreg.tools.flops import FLOP_KEYS  # noqa: PLC0415 (start-up: fvcore)

    try:
        counts = json.loads(Path(text).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as JSON ({type(error).__name__}); write it with "
                                         "`dinoreg bench flops --json PATH`") from None
    ok = isinstance(counts, dict) and all(isinstance(counts.get(key), (int, float)) and not isinstance(
        counts.get(key), bool) and counts[key] >= 0 for key in FLOP_KEYS)
    if not ok or not counts["step_flops"] > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a FLOPs file: it needs numbers {', '.join(FLOP_KEYS)} "
                                         "(step_flops > 0); write it with `dinoreg bench flops --json PATH`")
    return {key: float(counts[key]) for key in FLOP_KEYS}


def _bench_checkpoint(args: argparse.Namespace) -> int:
    from dinoreg.tools.checkpoint import (  # noqa: PLC0415 (start-up: training stack)
        benchmark_checkpoint,
        format_checkpoint_report,
    )

    directory = None if args.dir is None else str(args.dir)
    return _run_benchmark(args, lambda: benchmark_checkpoint(args.config, repeats=args.repeats,
                                                             overrides=args.overrides, directory=directory),
                          format_checkpoint_report)
