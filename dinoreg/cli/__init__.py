"""``dinoreg <subcommand>``: parses arguments and delegates; no logic of its own.

Subcommands:
  train            self-supervised training (DINO + iBOT + KoLeo) from a recipe
  submit           the same (or any command) as a SLURM job that requeues itself and resumes
  export           a checkpoint's backbone in the official, safetensors, Hugging Face or timm layout
  bench train      time the real training loop: iteration time, images/s, MFU, peak memory, data wait
  bench flops      the FLOPs of one training step of a recipe (no GPU, no weights)
  bench memory     plan a run's memory per GPU and the largest batch that fits, before submitting
  bench heads      peak memory of the prototype heads and losses alone
  bench checkpoint time saving and loading a full training checkpoint; its size
  eval knn         weighted kNN accuracy of a frozen backbone (DINO's protocol)
  eval linear      linear probes over a learning-rate grid (DINOv2's protocol)
  eval segmentation linear semantic-segmentation probe on patch tokens: mIoU (DINOv2's protocol)
  data export-synthetic  the synthetic dataset as image folders with PNG label maps
  model-info       build a backbone and print its parameters, FLOPs and output shapes
  analyze flops    FLOPs and parameters versus the number of register tokens
  analyze <tool>   the registers paper's diagnostics on any backbone: norms, layers, positions, neighbors,
                   attention, pca, lost, antialias, disconnect, probe

FLOPs of model-info and analyze flops are fvcore's unit (one multiply-add counts as one flop); bench train and
bench flops count 2 FLOPs per multiply-add, the unit of MFU and of the devices' peaks.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from dinoreg import __version__
from dinoreg.cli.data import add_data_parser
from dinoreg.cli.evaluate import add_eval_parser
from dinoreg.cli.export import add_export_parser
from dinoreg.cli.model import add_analyze_parser, add_model_info_parser
from dinoreg.cli.submit import add_submit_parser
from dinoreg.cli.train import add_bench_parser, add_train_parser
from dinoreg.train.signals import StoppedOnSignal

__all__ = ["build_parser", "line_buffered_output", "main", "run"]


class _Parser(argparse.ArgumentParser):
    """Takes ``key=value`` overrides before, between and after options (``train --config C a=1 --output-dir D
    b=2``): argparse gives a ``nargs="*"`` positional only its first run of words; the later runs, which it would
    refuse as unrecognized, are the same command's overrides, in the order written."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                   ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if isinstance(getattr(parsed, "overrides", None), list):
            parsed.overrides += [word for word in extras if not word.startswith("-")]  # load_config checks each
            extras = [word for word in extras if word.startswith("-")]
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        """One line, as every other refusal: the problem and where to read the usage (argparse would print the usage
        first, several lines of it)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dinoreg", description="DINOv2-style self-supervised ViTs with register tokens.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    add_train_parser(commands)
    # the job runs its command line through run(), in-process, after build_parser() checked it
    add_submit_parser(commands, job_entry=run, job_parser=build_parser)
    for add_parser in (add_export_parser, add_eval_parser, add_data_parser, add_model_info_parser, add_bench_parser,
                       add_analyze_parser):
        add_parser(commands)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Run one dinoreg command line in this process and return its exit status; a training run stopped by a
    signal raises :class:`~dinoreg.train.signals.StoppedOnSignal` (the SLURM job wrapper requeues the job when it is
    :data:`~dinoreg.launch.REQUEUE_SIGNAL_NAME`)."""
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    job_command: list[str] = []
    if argv[:1] == ["submit"] and "--" in argv:  # dinoreg submit [options] -- <any dinoreg command line>
        split = argv.index("--")
        argv, job_command = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "submit":
        args.job_command = job_command
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinoreg`` console script; returns the exit status."""
    line_buffered_output()
    try:
        return run(argv)
    except StoppedOnSignal as stop:
        print(f"dinoreg: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C without checkpoint.save_on_signals=[SIGINT]: the shell's convention
        print("dinoreg: interrupted (Ctrl-C); a training run resumes from its last checkpoint when started again",
              file=sys.stderr)
        return 130


def line_buffered_output() -> None:
    """Write every line of stdout and stderr through at once, also to a file or a pipe (block-buffered by default):
    the log of a killed run then holds everything it printed."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and not stream.isatty():
            stream.reconfigure(line_buffering=True)


if __name__ == "__main__":
    sys.exit(main())
