"""``dinoreg submit``: a dinoreg command line as a SLURM job. This module parses the options and delegates: the
mechanics, the defaults (:data:`~dinoreg.launch.SUBMIT_DEFAULTS`, which ``--help`` shows) and the requeue rules are
in :mod:`dinoreg.launch`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from dinoreg.argtypes import int_at_least, positive_int
from dinoreg.cli.common import add_recipe_arguments, config_error_message, format_summary
from dinoreg.launch import REQUEUE_SIGNAL_NAME
from dinoreg.launch import SUBMIT_DEFAULTS as DEFAULTS
from dinoreg.launch import (
    JobWaitError,
    SlurmRequest,
    SubmitError,
    check_job_strings,
    check_path,
    check_requeue_signal_saves,
    format_sbatch,
    python_command,
    sbatch_parameters,
    submit,
    wait_for_job,
)
from dinoreg.run_dir import OutputDirError, check_not_in_use, write_json


def add_submit_parser(commands: Any, *, job_entry: Callable[[list[str]], int],
                      job_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """``job_entry(argv)`` is what the job runs in each task: the dinoreg command line ``argv``, in-process;
    ``job_parser()`` the parser that checks a command line after ``--`` before it is queued. Both come from
    :mod:`dinoreg.cli`, which imports this module (so it cannot import them back)."""
    parser = commands.add_parser(
        "submit", help="submit training (or any dinoreg command) as a SLURM job that requeues itself",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit `dinoreg train` (or, after --, any dinoreg command line) to SLURM with submitit: "
                    "one task per GPU on each node, FSDP across all of them. Near its time limit or when "
                    f"preempted ({REQUEUE_SIGNAL_NAME}), the job saves a checkpoint on every rank, requeues itself "
                    "and resumes where it stopped.",
        epilog="`%j` in --output-dir and --log-dir becomes the job id; a requeued job keeps its id and so its "
               "directory.\n\n"
               "examples:\n"
               "  dinoreg submit --config vitl14_reg4 --nodes 4 --gpus-per-node 8 --partition gpu \\\n"
               "      --output-dir /checkpoint/$USER/vitl/%j train.dataset_path=/datasets/imagenet/train\n"
               "  dinoreg submit --gpus-per-node 0 --tasks-per-node 2 --timeout-min 30 --output-dir runs/%j\n"
               "  dinoreg submit --gpus-per-node 1 --timeout-min 60 -- analyze flops --arch vit_giant\n"
               "  dinoreg submit --dry-run --nodes 2 --config vitg14_reg4     # print the sbatch request only")
    add_recipe_arguments(parser)
    parser.add_argument("--output-dir", default=DEFAULTS.output_dir, metavar="DIR",
                        help="training output directory, made absolute (default: %(default)s)")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="submitit's folder: sbatch script, pickles, one stdout/stderr log per task (default: "
                             f"DIR/{DEFAULTS.training_log_subdir} for training, "
                             f"{DEFAULTS.command_log_dir.replace('%', '%%')} for a command after --)")
    resources = parser.add_argument_group("resources (sbatch options)")
    resources.add_argument("--nodes", type=positive_int, default=DEFAULTS.nodes, help="nodes (default: %(default)s)")
    resources.add_argument("--gpus-per-node", type=int_at_least(0, "a number of GPUs >= 0"),
                           default=DEFAULTS.gpus_per_node,
                           help="GPUs per node, one task each; 0 for a CPU-only job (default: %(default)s)")
    resources.add_argument("--tasks-per-node", type=positive_int,
                           help="processes per node of a CPU-only job (--gpus-per-node 0); with GPUs it is "
                                "the GPU count")
    resources.add_argument("--cpus-per-task", type=positive_int,
                           help="CPU cores per task, for its data loader workers (default: "
                                f"{DEFAULTS.cpus_per_gpu_task} with GPUs, as the official launcher; SLURM's default "
                                "of 1 without)")
    resources.add_argument("--mem-gb", type=float,
                           help=f"memory per node in GB (default: {DEFAULTS.mem_gb_per_gpu:g} per GPU, as the "
                                "official launcher; SLURM's default without GPUs)")
    resources.add_argument("--timeout-min", type=positive_int, default=DEFAULTS.timeout_min,
                           help="time limit of each allocation in minutes; the job requeues itself when it is "
                                "reached (default: %(default)s)")
    resources.add_argument("--partition", help="SLURM partition")
    resources.add_argument("--account", help="SLURM account to charge")
    resources.add_argument("--qos", help="quality of service")
    resources.add_argument("--constraint", help="node features, e.g. volta32gb")
    resources.add_argument("--exclude", metavar="NODES", help="nodes not to run on, e.g. node[01-03]")
    resources.add_argument("--comment", help="free text shown by squeue/sacct")
    resources.add_argument("--job-name", default=DEFAULTS.job_name, help="job name (default: %(default)s)")
    requeue = parser.add_argument_group("preemption and time limits")
    requeue.add_argument("--signal-delay-s", type=positive_int, default=DEFAULTS.signal_delay_s,
                         help="seconds before the time limit at which SLURM signals the job to save and requeue; "
                              "allow for one iteration plus a checkpoint (default: %(default)s)")
    requeue.add_argument("--max-requeues", type=int_at_least(0, "a number >= 0"), default=DEFAULTS.max_requeues,
                         help="requeues allowed in all (time limits, preemptions, scontrol requeue); then the job "
                              "ends and keeps its checkpoints (default: %(default)s)")
    job = parser.add_argument_group("job")
    job.add_argument("--srun-arg", action="append", default=[], metavar="ARG",
                     help="extra srun argument, repeatable, e.g. --srun-arg=--container-image=/images/dinoreg.sqsh")
    job.add_argument("--python", metavar="CMD",
                     help="command that starts Python inside the job (default: this interpreter), e.g. python3 "
                          "inside a container")
    job.add_argument("--dry-run", action="store_true", help="print the sbatch request and the command; submit nothing")
    job.add_argument("--wait", action="store_true",
                     help="wait for the job to finish (through requeues), print its result; exit 1 if it failed")
    job.add_argument("--wait-timeout-min", type=float, metavar="MIN", help="with --wait: give up after MIN minutes")
    job.add_argument("--json", type=Path, metavar="PATH", help="write the job id, directories and log paths to PATH")
    parser.set_defaults(handler=functools.partial(_submit, job_entry=job_entry, job_parser=job_parser), parser=parser)


def _submit(args: argparse.Namespace, *, job_entry: Callable[[list[str]], int],
            job_parser: Callable[[], argparse.ArgumentParser]) -> int:
    from dinoreg.config import ConfigError, load_config  # noqa: PLC0415 (start-up: omegaconf)

    def fail(message: str, code: int) -> int:
        print(f"dinoreg submit: {message}", file=sys.stderr)
        return code

    gpus = args.gpus_per_node
    request = SlurmRequest(
        nodes=args.nodes, gpus_per_node=gpus, tasks_per_node=args.tasks_per_node,
        cpus_per_task=DEFAULTS.cpus_per_task(args.cpus_per_task, gpus), mem_gb=DEFAULTS.mem_gb(args.mem_gb, gpus),
        timeout_min=args.timeout_min, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, exclude=args.exclude, comment=args.comment, job_name=args.job_name,
        signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues, srun_args=args.srun_arg)
    if args.wait_timeout_min is not None and not 0 < args.wait_timeout_min < float("inf"):
        return fail(f"--wait-timeout-min must be a positive number of minutes, got {args.wait_timeout_min}", 2)
    try:  # every string the job carries, before anything is read or written
        params = sbatch_parameters(request)
        check_path("--output-dir", args.output_dir)
        check_job_strings([args.config, *args.overrides, *args.job_command], args.log_dir, args.python)
    except SubmitError as error:
        return fail(str(error), 2)
    output_dir: str | None = None
    if args.job_command:
        if args.overrides:
            return fail(f"key=value overrides {args.overrides} apply to training; with a command after --, "
                        "put its own options there", 2)
        argv = args.job_command
        refusal = io.StringIO()
        try:  # catch a typo now rather than after the job waited in the queue
            with contextlib.redirect_stderr(refusal):
                job_parser().parse_args(argv)
        except SystemExit:
            why = (refusal.getvalue().strip().splitlines() or ["refused"])[-1]
            return fail(f"the job command `dinoreg {shlex.join(argv)}` is invalid: {why}", 2)
        log_dir = DEFAULTS.log_dir(args.log_dir, None)
    else:
        output_dir = os.path.abspath(args.output_dir)
        try:
            cfg = load_config(args.config, [*args.overrides, f"train.output_dir={output_dir}"])
        except ConfigError as error:
            print(config_error_message("submit", error), file=sys.stderr)
            return 2
        try:  # a run training into that folder now (a job still queued holds no lock yet)
            check_not_in_use(output_dir)
        except OutputDirError as error:
            return fail(str(error), 1)
        try:
            check_requeue_signal_saves(cfg.checkpoint.save_on_signals)
        except SubmitError as error:
            return fail(str(error), 2)
        config = os.path.abspath(args.config) if Path(args.config).is_file() else args.config
        argv = ["train", "--config", config, "--output-dir", output_dir, *args.overrides]
        log_dir = DEFAULTS.log_dir(args.log_dir, output_dir)
    try:
        check_job_strings(argv, log_dir, args.python)
    except SubmitError as error:
        return fail(str(error), 2)
    tasks = args.nodes * params["ntasks_per_node"]
    command = "dinoreg " + shlex.join(argv)
    if args.dry_run:
        print("sbatch request (dry run: nothing submitted)")
        print("\n".join(format_sbatch(params, log_dir)))
        if args.python:
            print(f"python in the job: {python_command(args.python)}")
        print(f"each of the {tasks} task(s) runs: {command}")
        print(f"submitit folder (script, logs): {log_dir}")
        return 0
    try:
        job = submit(argv, request, entry=job_entry, log_dir=log_dir, output_dir=output_dir, python=args.python)
    except SubmitError as error:
        return fail(str(error), 1)
    info = {"job_id": job.job_id, "command": command, "output_dir": output_dir and output_dir.replace("%j", job.job_id),
            "log_dir": str(job.paths.folder), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "submission_file": str(job.paths.submission_file)}
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {params['ntasks_per_node']} task(s), {gpus} GPU(s) "
          f"per node\n  command     {command}")
    if output_dir:
        print(f"  output dir  {info['output_dir']}")
    print(f"  logs        {info['stdout']}\n              {info['stderr']}   (task 0; one pair per task)\n"
          f"  follow      tail -f {info['stdout']}   (training progress; warnings and errors: the .err log)\n"
          f"  cancel      scancel {job.job_id}")
    if args.json:
        print(f"wrote {write_json(args.json, info)}")
    if not args.wait:
        return 0
    timeout_s = None if args.wait_timeout_min is None else 60 * args.wait_timeout_min
    try:
        results = wait_for_job(job, timeout_s=timeout_s, on_state=lambda state: print(f"job {job.job_id}: {state}"))
    except JobWaitError as error:
        return fail(str(error), 1)
    except Exception as error:  # the job's own error (submitit's FailedJobError carries its traceback)
        return fail(f"job {job.job_id} failed:\n{error}", 1)
    summary = format_summary(results[0].get("final") or {})
    print(f"job {job.job_id} done" + (f": {summary}" if summary else ""))
    return 0
