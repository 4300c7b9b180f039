"""SLURM jobs with submitit: the sbatch request and its defaults (:data:`SUBMIT_DEFAULTS`), the job that runs a
dinoreg command line, requeueing and its rules.

How a preempted or timed-out training job continues:

1. SLURM sends :data:`REQUEUE_SIGNAL_NAME` (SIGUSR2, unless ``SUBMITIT_PREEMPT_SIGNAL`` names another) to every
   task ``signal_delay_s`` before the time limit (submitit's ``--signal=USR2@<delay>``), or when someone runs
   ``scancel --signal=USR2 <job>`` (preemption). ``dinoreg submit`` refuses a training config that would not
   save on it (:func:`check_requeue_signal_saves`).
2. While training, the loop's :class:`~dinoreg.train.signals.SignalWatcher` holds that signal: every rank
   finishes its iteration, saves a checkpoint, and :class:`~dinoreg.train.signals.StoppedOnSignal` is raised.
3. :class:`DinoregJob` then calls submitit's own handler for the signal, saved before training started. On
   rank 0 it calls :meth:`DinoregJob.checkpoint` and ``scontrol requeue``\\ s the job; the other ranks exit
   and leave no result behind. A job already requeued ``max_requeues`` times (``SLURM_RESTART_COUNT``, which
   counts every requeue: time limits, preemptions, ``scontrol requeue``, node failures) is not requeued: it
   ends with an error that says to submit the same command to continue from the checkpoint.
4. The requeued job keeps its job id, so ``%j`` names the same output directory, and runs the same command
   line: ``dinoreg train`` resumes from the newest checkpoint there.

Another signal in ``checkpoint.save_on_signals`` (``scancel --signal=USR1 <job>``) saves and stops the job
without a requeue. An external ``scontrol requeue`` or a node failure skips the requeue of 3: SLURM sends
SIGTERM (saved on if ``checkpoint.save_on_signals`` holds it and the kill grace allows) and restarts the job,
which resumes from the newest checkpoint. SIGTERM never requeues by itself: it is how SLURM cancels.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dinoreg.distributed import detect_environment
from dinoreg.errors import InputError
from dinoreg.run_dir import RunDir
from dinoreg.train.signals import EXIT_CODE_SAVED_ON_SIGNAL, StoppedOnSignal

__all__ = ["REQUEUE_SIGNAL_NAME", "SUBMIT_DEFAULTS", "DinoregJob", "JobCommandError", "JobWaitError", "SlurmRequest",
           "SubmitDefaults", "SubmitError", "check_job_strings", "check_path", "check_requeue_signal_saves",
           "check_text", "final_metrics", "format_sbatch", "job_state", "python_command", "sbatch_parameters",
           "submit", "wait_for_job"]

# The signal submitit asks SLURM for and handles (submitit reads the same variable).
REQUEUE_SIGNAL_NAME = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
# squeue states after which a job will not run again.
FINAL_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "SPECIAL_EXIT", "TIMEOUT"}


class SubmitError(InputError):
    """The job cannot be submitted as asked; the message says what to change."""


# What the batch script's strings may hold. Every value is one line of the script: submitit writes `#SBATCH
# --<option>=<value, shell-quoted>` lines, a setup line and one srun command line whose words it quotes. A newline
# in a value ends its line and the rest runs as a command (and sbatch stops reading #SBATCH lines at the first
# line that is not one), so no value may hold a line break or any other control character. Inside an #SBATCH
# line sbatch's own parser undoes the shell quoting but drops backslashes, so those are refused there. Where
# SLURM names things (partitions, accounts, QOS, features, host lists) only the characters of such names are
# allowed. The command after `--` and the --output-dir never reach a shell: they travel pickled.
_NAME_CHARACTERS = string.ascii_letters + string.digits + "_.-"
_SBATCH_VALUES = {  # SlurmRequest field -> (its option, the characters allowed or None for free text, in words)
    "partition": ("--partition", _NAME_CHARACTERS + ",", "partition names (letters, digits, _ . -), comma-separated"),
    "account": ("--account", _NAME_CHARACTERS, "an account name: letters, digits, _ . -"),
    "qos": ("--qos", _NAME_CHARACTERS, "a QOS name: letters, digits, _ . -"),
    "constraint": ("--constraint", _NAME_CHARACTERS + "+&|,*[]():!",
                   "node features (letters, digits, _ . - +) joined by SLURM's operators & | , * [ ] ( ) ! :"),
    "exclude": ("--exclude", _NAME_CHARACTERS + ",[]", "host names and ranges such as node[01-03],gpu7"),
    "job_name": ("--job-name", _NAME_CHARACTERS + "+=:@,", "letters, digits and _ . - + = : @ ,"),
    "comment": ("--comment", None, "printable text without backslashes"),
}
_CHARACTER_NAMES = {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL", "\t": "a tab"}


def _describe(character: str) -> str:
    name = _CHARACTER_NAMES.get(character)
    return f"{name} ({character!r})" if name else (
        repr(character) if character.isprintable() else f"the character U+{ord(character):04X}")


def check_text(option: str, value: str, *, allowed: Optional[str] = None, what: str = "one line of printable text",
               backslash: bool = True) -> None:
    """Raise :class:`SubmitError` (one line: the option, the character, what is allowed) unless ``value`` is one
    non-empty line of printable text, only of ``allowed`` characters when given, without backslashes unless
    ``backslash``."""
    if not value:
        raise SubmitError(f"{option} is empty; use {what}")
    for position, character in enumerate(value, 1):
        if unicodedata.category(character) in ("Cc", "Zl", "Zp"):  # control characters, line/paragraph separators
            why = " (each value must be one line of printable text)"
        elif allowed is not None and character not in allowed:
            why = ""
        elif character == "\\" and not backslash:
            why = " (sbatch drops backslashes from #SBATCH lines)"
        else:
            continue
        raise SubmitError(f"{option} {value!r}: {_describe(character)} at character {position} is not allowed{why}; "
                          f"use {what}")


def check_job_strings(argv: Sequence[str], log_dir: Optional[str], python: Optional[str] = None) -> None:
    """Check the strings of a job besides its :class:`SlurmRequest`: the dinoreg command line (pickled, but one line
    each), the submitit folder (in #SBATCH --output/--error and on the srun line) and the ``--python`` command."""
    for word in filter(None, argv):
        check_text("the job command", word, what="arguments without line breaks or control characters")
    if log_dir is not None:
        check_path("--log-dir", log_dir)
    if python is not None:
        python_command(python)


def check_path(option: str, path: str) -> None:
    """A job's folder (--log-dir, or --output-dir, under which it is by default): one line without backslashes
    (see :func:`check_text`), and no ``%`` but ``%j``, since SLURM expands its filename patterns in the log paths."""
    check_text(option, path, what="a path without line breaks, control characters or backslashes", backslash=False)
    pattern = re.search(r"%[^j]|%$", path)
    if pattern:
        raise SubmitError(f"{option} {path!r}: {pattern.group()!r} is not allowed: SLURM would expand it in the log "
                          "file names, where submitit could not find them; only %j (the job id) is")


def python_command(python: str) -> str:
    """``--python`` as the job's shell line gets it: split into words as a shell would (quotes group words), each
    word quoted, so that nothing in it is expanded or run (no $VARIABLES, $(...), `...`, ; or |)."""
    check_text("--python", python, what="a command such as python3 or 'singularity exec image.sif python'")
    try:
        words = shlex.split(python)
    except ValueError as error:
        raise SubmitError(f"--python {python!r}: {error}; quote words with spaces, e.g. --python \"'/opt/my "
                          "env/bin/python'\"") from None
    if not words:
        raise SubmitError("--python is empty; use a command such as python3")
    return shlex.join(words)


class JobCommandError(RuntimeError):
    """The dinoreg command inside a job exited with an error; carries what it printed to stderr."""


class JobWaitError(RuntimeError):
    """A job ended without results, or did not end in time."""


@dataclass(frozen=True)
class SubmitDefaults:
    """What ``dinoreg submit`` asks for where an option is not given (its ``--help`` shows these values), and the
    defaults of :class:`SlurmRequest`. A GPU job gets the official launcher's cores and memory per GPU; a CPU-only
    job leaves both to SLURM."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_gpu_task: int = 10  # the official launcher's cores per GPU task, for its data loader workers
    mem_gb_per_gpu: float = 40.0  # the official launcher's memory per GPU
    timeout_min: int = 2800  # each allocation's time limit; the job requeues itself when it is reached
    job_name: str = "dinoreg"
    # When SLURM sends REQUEUE_SIGNAL_NAME before the time limit: time for one iteration and a checkpoint.
    signal_delay_s: int = 120
    # Requeues allowed in all, counted by SLURM (SLURM_RESTART_COUNT); then the job ends, keeping its checkpoints.
    max_requeues: int = 10
    output_dir: str = "runs/%j"  # of training; %j becomes the job id, which a requeued job keeps
    training_log_subdir: str = "slurm"  # submitit's folder of a training job, inside its output directory
    command_log_dir: str = "slurm_logs/%j"  # submitit's folder of another command line

    def cpus_per_task(self, given: Optional[int], gpus_per_node: int) -> Optional[int]:
        """``given``, else ``cpus_per_gpu_task`` with GPUs and None (SLURM's default of 1) without."""
        return given or (self.cpus_per_gpu_task if gpus_per_node else None)

    def mem_gb(self, given: Optional[float], gpus_per_node: int) -> Optional[float]:
        """``given``, else ``mem_gb_per_gpu`` per GPU and None (SLURM's default) without GPUs."""
        return given if given is not None else (self.mem_gb_per_gpu * gpus_per_node if gpus_per_node else None)

    def log_dir(self, given: Optional[str], output_dir: Optional[str]) -> str:
        """submitit's folder, absolute: ``given``, else ``training_log_subdir`` inside the ``output_dir`` of a
        training job, or ``command_log_dir`` for another command line (``output_dir`` None)."""
        default = self.command_log_dir if output_dir is None else os.path.join(output_dir, self.training_log_subdir)
        return os.path.abspath(given or default)


SUBMIT_DEFAULTS = SubmitDefaults()


def check_requeue_signal_saves(save_on_signals: Sequence[str]) -> None:
    """Refuse a training job whose ``checkpoint.save_on_signals`` lacks :data:`REQUEUE_SIGNAL_NAME`: SLURM sends
    that signal before the time limit and on preemption, and the job requeues itself on it, so without a save
    there the run would be requeued mid-iteration and lose what it did since its last checkpoint."""
    if REQUEUE_SIGNAL_NAME not in save_on_signals:
        raise SubmitError(f"checkpoint.save_on_signals={list(save_on_signals)} lacks {REQUEUE_SIGNAL_NAME}, the "
                          "signal SLURM sends before the time limit and on preemption: without it the job would be "
                          "requeued mid-iteration without saving. Add it, e.g. "
                          f"checkpoint.save_on_signals=[SIGUSR1,{REQUEUE_SIGNAL_NAME},SIGTERM]")


@dataclass
class SlurmRequest:
    """What to ask SLURM for. One task per GPU; ``tasks_per_node`` is for CPU-only jobs (``gpus_per_node=0``)."""

    nodes: int = SUBMIT_DEFAULTS.nodes
    gpus_per_node: int = SUBMIT_DEFAULTS.gpus_per_node
    tasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    timeout_min: int = SUBMIT_DEFAULTS.timeout_min
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    comment: Optional[str] = None
    job_name: str = SUBMIT_DEFAULTS.job_name
    signal_delay_s: int = SUBMIT_DEFAULTS.signal_delay_s
    max_requeues: int = SUBMIT_DEFAULTS.max_requeues
    srun_args: list[str] = field(default_factory=list)


def sbatch_parameters(request: SlurmRequest) -> dict[str, Any]:
    """The request as submitit ``SlurmExecutor`` parameters (sbatch option names with ``_``)."""
    if request.nodes < 1:
        raise SubmitError(f"--nodes must be at least 1, got {request.nodes}")
    if request.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0, got {request.gpus_per_node}")
    tasks = request.tasks_per_node
    if request.gpus_per_node > 0:
        if tasks is not None and tasks != request.gpus_per_node:
            raise SubmitError(f"--tasks-per-node {tasks} with --gpus-per-node {request.gpus_per_node}: GPU jobs "
                              "run one task per GPU; drop --tasks-per-node")
        tasks = request.gpus_per_node
    elif not tasks:
        raise SubmitError("zero tasks: --gpus-per-node 0 asks for a CPU-only job, which needs --tasks-per-node N "
                          "(N >= 1 processes per node)")
    if request.timeout_min < 1:
        raise SubmitError(f"--timeout-min must be at least 1, got {request.timeout_min}")
    if not 0 < request.signal_delay_s < request.timeout_min * 60:
        raise SubmitError(f"--signal-delay-s {request.signal_delay_s} must be between 1 and the time limit "
                          f"({request.timeout_min * 60} s): it is how long before the end the job is told to save")
    if request.mem_gb is not None and not (0 < request.mem_gb < float("inf")):
        raise SubmitError(f"--mem-gb must be a positive number of GB, got {request.mem_gb}")
    if request.max_requeues < 0:
        raise SubmitError(f"--max-requeues must be >= 0, got {request.max_requeues}")
    for name, (option, allowed, what) in _SBATCH_VALUES.items():
        value = getattr(request, name)
        if value is not None:
            check_text(option, value, allowed=allowed, what=what, backslash=False)
    for argument in request.srun_args:
        check_text("--srun-arg", argument, what="one srun option such as --container-image=/images/x.sqsh")
        if not argument.startswith("-"):
            raise SubmitError(f"--srun-arg {argument!r} is not an srun option: srun would run it as the job's "
                              "command; give each option with its value, e.g. --srun-arg=--export=ALL")
    params: dict[str, Any] = {"job_name": request.job_name, "nodes": request.nodes, "ntasks_per_node": tasks,
                              "time": request.timeout_min, "signal_delay_s": request.signal_delay_s,
                              "wckey": None,  # no --wckey: clusters that enforce wckeys reject unknown ones
                              # scontrol requeue needs a requeueable job, whatever the cluster's JobRequeue
                              "additional_parameters": {"requeue": True}}
    if request.gpus_per_node:
        params["gpus_per_node"] = request.gpus_per_node
    if request.mem_gb is not None:
        params["mem"] = f"{int(request.mem_gb)}GB" if request.mem_gb == int(request.mem_gb) \
            else f"{int(request.mem_gb * 1024)}MB"
    optional = {"cpus_per_task": request.cpus_per_task, "partition": request.partition,
                "account": request.account, "qos": request.qos, "constraint": request.constraint,
                "exclude": request.exclude, "comment": request.comment}
    params.update({key: value for key, value in optional.items() if value is not None})
    if request.srun_args:
        params["srun_args"] = list(request.srun_args)
    # The job starts `python -m submitit.core._submit` in the submission folder, whose entries come first on
    # sys.path: a folder named dinoreg/ there (a clone of this repository, say) would shadow the installed
    # package and the job would die unpickling DinoregJob. PYTHONSAFEPATH (Python >= 3.11) keeps it off.
    params["setup"] = ["export PYTHONSAFEPATH=1"]
    return params


def format_sbatch(params: dict[str, Any], log_dir: str) -> list[str]:
    """The ``#SBATCH`` lines of the script submitit writes for these parameters and submitit folder."""
    from submitit.core.utils import JobPaths  # noqa: PLC0415 (start-up: submitit)

    options = {key: value for key, value in params.items()
               if key not in ("signal_delay_s", "additional_parameters", "srun_args", "setup") and value is not None}
    options.update(params.get("additional_parameters", {}))
    options["signal"] = f"{REQUEUE_SIGNAL_NAME[3:]}@{params['signal_delay_s']}"
    # task 0's logs; srun sends each task's own output to %j_<task>_log.out|err
    paths = JobPaths(log_dir)
    options.update({"output": str(paths.stdout).replace("%t", "0"), "error": str(paths.stderr).replace("%t", "0"),
                    "open_mode": "append"})
    lines = []
    for key in sorted(options):
        flag = "--" + key.replace("_", "-")
        value = options[key]
        lines.append(f"#SBATCH {flag}" if value is True else f"#SBATCH {flag}={shlex.quote(str(value))}")
    return lines


class DinoregJob:
    """The submitit callable: runs ``dinoreg <argv>`` in each task (``%j`` becomes the job id) and returns
    ``{"command", "exit_code", "output_dir", "final"}`` (``final``: the last training and kNN metrics).

    ``entry(argv) -> exit status`` runs a command line in-process (the CLI passes its ``run``; pickled by
    reference, so this module never imports the CLI). In-process, so that the training loop's signal handling
    and submitit's requeue handler share the task's process."""

    def __init__(self, argv: Sequence[str], *, entry: Callable[[list[str]], int], max_requeues: int,
                 output_dir: Optional[str] = None) -> None:
        self.argv = list(argv)
        self.entry = entry
        self.max_requeues = max_requeues
        self.output_dir = output_dir

    def __call__(self) -> dict[str, Any]:
        import submitit  # noqa: PLC0415 (start-up: submitit)

        environment = submitit.JobEnvironment()
        # A result left by an earlier allocation of this job (ranks that failed when it was requeued) is stale.
        environment.paths.result_pickle.unlink(missing_ok=True)
        argv = [arg.replace("%j", environment.job_id) for arg in self.argv]
        restarts = _restarts()
        process = detect_environment()  # where the process group will meet: the first host of the node list
        _log(f"job {environment.job_id} task {environment.global_rank}/{environment.num_tasks} on "
             f"{environment.hostname} (rendezvous {process.master_addr}:{process.master_port}), requeued {restarts} "
             f"times so far (at most {self.max_requeues}): dinoreg {shlex.join(argv)}")
        requeue = signal.getsignal(getattr(signal, REQUEUE_SIGNAL_NAME))  # submitit's; training replaces it
        stderr = _Tee(sys.stderr)
        try:
            with contextlib.redirect_stderr(stderr):
                code = self.entry(argv)
        except StoppedOnSignal as stop:
            _log(f"{stop}")
            if stop.signal_name == "SIGTERM":  # SLURM is cancelling or requeueing the job itself: leave no result
                sys.exit(EXIT_CODE_SAVED_ON_SIGNAL)
            if stop.signal_name != REQUEUE_SIGNAL_NAME:  # e.g. scancel --signal=USR1: save and stop, no requeue
                raise
            if restarts >= self.max_requeues:
                raise JobCommandError(f"{stop}; not requeued: the job was already requeued {restarts} times "
                                      f"(--max-requeues {self.max_requeues}); submit the same command to continue "
                                      "from that checkpoint") from None
            if callable(requeue):  # rank 0: checkpoint() then scontrol requeue and exit; other ranks return
                requeue(getattr(signal, REQUEUE_SIGNAL_NAME), None)
            # The other ranks leave no result (the requeued job writes it) and exit 0, so that srun's
            # --kill-on-bad-exit cannot end the step before rank 0 has requeued it.
            sys.exit(0)
        if code != 0:
            raise JobCommandError(f"dinoreg {shlex.join(argv)} exited with status {code}:\n{stderr.tail()}")
        output_dir = self.output_dir.replace("%j", environment.job_id) if self.output_dir else None
        return {"command": argv, "exit_code": code, "output_dir": output_dir,
                "final": final_metrics(Path(output_dir)) if output_dir else {}}

    def checkpoint(self) -> Any:
        """Called by submitit on rank 0 after the save on signal: requeue the same job, at most
        ``max_requeues`` times in all (``SLURM_RESTART_COUNT`` also counts external requeues)."""
        import submitit  # noqa: PLC0415 (start-up: submitit)

        restarts = _restarts()
        if restarts >= self.max_requeues:
            _log(f"not requeueing: the job was already requeued {restarts} times (--max-requeues "
                 f"{self.max_requeues}); its checkpoints stay in place, submit the same command to continue")
            return None
        _log(f"requeueing: requeue {restarts + 1} of at most {self.max_requeues}")
        return submitit.helpers.DelayedSubmission(self)


def final_metrics(output_dir: Path) -> dict[str, float]:
    """The last training row of ``metrics.jsonl`` with the last kNN results merged in."""
    path = RunDir(output_dir).metrics
    final: dict[str, float] = {}
    if not path.exists():
        return final
    knn: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "total_loss" in row:
            final = row
        elif any(key.startswith("knn") for key in row):
            knn = row
    return {**final, **{key: value for key, value in knn.items() if key != "iteration"}}


def submit(argv: Sequence[str], request: SlurmRequest, *, entry: Callable[[list[str]], int], log_dir: str,
           output_dir: Optional[str] = None, python: Optional[str] = None) -> Any:
    """Submit ``dinoreg <argv>`` as one SLURM job run by ``entry`` (see :class:`DinoregJob`); returns the
    ``submitit.SlurmJob``."""
    import submitit  # noqa: PLC0415 (start-up: submitit)

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SubmitError("sbatch/srun not found: this machine is not a SLURM submission host. On one machine "
                          "with several GPUs, launch with torchrun instead: launch/torchrun.sh train --config "
                          "... --output-dir ... (or torchrun --nproc_per_node=G -m dinoreg train ...)")
    parameters = sbatch_parameters(request)  # checks every string before anything is written
    check_job_strings(argv, log_dir, python)
    executor = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=request.max_requeues,
                                      python=None if python is None else python_command(python))
    executor.update_parameters(**parameters)
    from submitit.core.utils import FailedJobError  # noqa: PLC0415 (start-up: submitit)

    try:
        return executor.submit(DinoregJob(argv, entry=entry, max_requeues=request.max_requeues,
                                               output_dir=output_dir))
    except FailedJobError as error:  # carries sbatch's stderr
        messages = [line.strip() for line in str(error).splitlines() if "sbatch: error" in line]
        raise SubmitError("sbatch refused the job: " + ("; ".join(messages) or str(error)) +
                          "\ncheck --partition/--account/--qos/--constraint against `sinfo` and `sacctmgr show assoc "
                          "user=$USER`") from None


def job_state(job_id: str) -> str:
    """The job's state from ``squeue`` (which needs no SLURM accounting): e.g. PENDING, RUNNING, COMPLETED;
    ``GONE`` once SLURM has forgotten the job; ``UNKNOWN (<squeue's error>)`` when squeue cannot answer."""
    try:
        result = subprocess.run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T"],
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"UNKNOWN ({error})"
    if result.returncode == 0 and result.stdout.split():
        return result.stdout.split()[0]
    if result.returncode == 0 or "invalid job id" in result.stderr.lower():
        return "GONE"
    return f"UNKNOWN ({(result.stderr.strip().splitlines() or ['no output'])[-1]})"


def wait_for_job(job: Any, *, timeout_s: Optional[float] = None, poll_s: float = 1.0, grace_s: float = 15.0,
                 on_state: Callable[[str], None] = lambda state: None) -> list[Any]:
    """Wait until every task of ``job`` wrote its result, and return the results (raising the job's error).

    Follows the job through its requeues: an error a task wrote counts only once SLURM says the job ended (and
    stayed ended for a few seconds), since a job can be requeued after its tasks failed (a node failure, an
    ``scontrol requeue``, a requeue on preemption) and its next allocation replaces those results. Bounded: a job that
    ends without results (killed, cancelled, not requeued) raises :class:`JobWaitError` ``grace_s`` after SLURM says
    it ended (results can lag on a network filesystem), and so does ``timeout_s``. Works without SLURM accounting:
    states come from ``squeue``."""
    tasks = [job.task(index) for index in range(job.num_tasks)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    ended_at, last_state = None, None
    while True:
        written = [task.paths.result_pickle.exists() for task in tasks]
        failed = all(written) and any(task.exception() is not None for task in tasks)
        if all(written) and not failed:
            return job.results()
        state = job_state(job.job_id)
        if state != last_state:
            on_state(state)
            last_state = state
        if failed and state.startswith("UNKNOWN"):  # without squeue a requeue cannot be seen: take the error
            return job.results()
        if state in FINAL_STATES or state == "GONE":
            ended_at = ended_at or time.monotonic()
            if failed and time.monotonic() - ended_at >= min(grace_s, 5 * poll_s):
                return job.results()  # raises the first task's error
            if time.monotonic() - ended_at > grace_s:
                if any(written):
                    job.task(written.index(True)).result()
                raise JobWaitError(f"job {job.job_id} ended ({state}) without a result: it was killed, cancelled "
                                   f"or not requeued; see {job.paths.stderr}")
        else:
            ended_at = None
        if deadline is not None and time.monotonic() > deadline:
            raise JobWaitError(f"job {job.job_id} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _restarts() -> int:
    """How many times SLURM has requeued this job (time limits, preemptions, scontrol requeue, node failures)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def _log(message: str) -> None:
    print(f"[dinoreg.launch] {message}", file=sys.stderr, flush=True)


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps the last lines, for the error message of a failed job."""

    def __init__(self, stream: Any, keep: int = 40) -> None:
        self.stream, self.keep, self.lines = stream, keep, [""]

    def write(self, text: str) -> int:
        self.stream.write(text)
        parts = text.split("\n")
        self.lines[-1] += parts[0]
        self.lines.extend(parts[1:])
        del self.lines[:-self.keep]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def tail(self) -> str:
        return "\n".join(self.lines).strip()
