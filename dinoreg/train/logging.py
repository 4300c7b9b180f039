"""Where training figures go: ``metrics.jsonl``, TensorBoard, and a progress line with ETA.

Every figure is logged, never printed once: one JSON object per logged iteration (training rows and
evaluation rows share the file, evaluation rows carry ``knn_top1``), the same scalars to TensorBoard,
and a tqdm bar on a terminal or plain periodic lines otherwise (e.g. under SLURM).

TensorBoard groups the scalars by what they are (:func:`tensorboard_tag`): ``loss/``, ``optim/``
(schedules), ``grad_norm/``, ``eval/``, ``data/`` and ``monitor/`` (the artifact monitor, which also adds
its maps as images and the patch-token norms as a histogram). The run's resolved config is in the HParams
tab, beside the final metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

from dinoreg.run_dir import RunDir, write_text

# "train [kNN] |███▏      | 191/600, eta 0:05:54 loss 8.134 img/s 43.7 knn 0.478": 80 columns hold it
BAR_FORMAT = "{desc} |{bar:10}| {n_fmt}/{total_fmt}{postfix}"
# Shown after the ETA, in this order, when present: on a terminal's bar the first ones only (fits 80 columns),
# in a log's plain lines all of them.
_BAR_KEYS = ("total_loss", "images_per_sec", "knn_top1")
_LINE_KEYS = (*_BAR_KEYS, "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "gram_loss")
_SHORT = {"total_loss": "loss", "dino_local_crops_loss": "dino_l", "dino_global_crops_loss": "dino_g",
          "koleo_loss": "koleo", "ibot_loss": "ibot", "gram_loss": "gram", "images_per_sec": "img/s", "knn_top1": "knn"}


_OPTIM = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr", "gram_loss_weight")
_DATA = ("images_per_sec", "data_wait", "bad_files")
_LOSS_DIAGNOSTICS = ("teacher_entropy", "teacher_batch_entropy")  # the DINO loss's, beside its terms
# the HParams tab shows these beside the config: their last values are the run's outcome
HPARAM_METRICS = ("eval/knn_top1", "eval/knn_top5", "eval/segmentation_miou", "loss/total")
EVALUATION_PREFIXES = ("knn_", "segmentation_")  # the periodic evaluations' keys, under eval/ in TensorBoard


def tensorboard_tag(key: str) -> Optional[str]:
    """The TensorBoard tag of a ``metrics.jsonl`` key, in its group (``None``: not shown, a duplicate)."""
    if "/" in key:  # grouped where it is made (monitor/...)
        return key
    if key == "grad_norm":  # the backbone's, also logged as grad_norm_backbone
        return None
    if key.endswith("_loss"):
        return f"loss/{key[:-len('_loss')]}"
    if key in _LOSS_DIAGNOSTICS:
        return f"loss/{key}"
    if key.startswith("grad_norm_"):
        return f"grad_norm/{key[len('grad_norm_'):]}"
    if key.startswith(EVALUATION_PREFIXES):
        return f"eval/{key}"
    if key in _OPTIM:
        return f"optim/{key}"
    if key in _DATA:
        return f"data/{key}"
    return f"other/{key}"  # a new figure nobody has grouped yet: shown, not lost


def hparam_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as the flat ``{"optim.lr": 0.004, ...}`` TensorBoard's HParams tab shows (lists as text;
    unset values left out)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(hparam_values(value, f"{name}."))
        elif value is not None:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _drop_rows_from(metrics: Path, iteration: int) -> None:
    """Rows logged at ``iteration`` or later are from a run that stopped before its next checkpoint; the resumed
    run logs those iterations again. Keep every iteration once (atomically: a crash here loses nothing)."""
    if not metrics.is_file():
        return
    lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or _row_iteration(line) < iteration]
    if len(kept) != len(lines):
        write_text(metrics, "".join(kept))


def _row_iteration(line: str) -> float:
    try:
        return json.loads(line).get("iteration", -1)
    except ValueError:  # a line cut by a crash while it was written
        return math.inf


class TrainingLogger:
    """Writes metrics of one run. Only the main process should create one with ``enabled=True``."""

    def __init__(self, output_dir: str | Path, *, total_iterations: int, start_iteration: int = 0,
                 enabled: bool = True, print_every: int = 10) -> None:
        self.enabled = enabled
        self.total = total_iterations
        self.print_every = max(print_every, 1)
        self.start_iteration = start_iteration
        self.done = start_iteration - 1  # the last iteration whose step has finished
        self.started = time.perf_counter()
        self.paused = 0.0  # seconds spent outside the training steps (evaluations, monitor, checkpoints)
        self.last_train: dict[str, float] = {}
        self.latest: dict[str, float] = {}  # every key's most recent value
        if not enabled:
            return
        files = RunDir(output_dir)
        # From a checkpoint or from the start (a run stopped before its first checkpoint): its iterations are done
        # again, so their earlier rows go, and TensorBoard drops their events (purge_step)
        _drop_rows_from(files.metrics, start_iteration)
        self.jsonl = open(files.metrics, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.writer = SummaryWriter(log_dir=str(files.tensorboard_run), purge_step=start_iteration)
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total_iterations, initial=start_iteration, dynamic_ncols=True,
                        disable=not self.interactive, desc="train",
                        bar_format=BAR_FORMAT)

    def log(self, iteration: int, metrics: Mapping[str, Any], *, step_done: bool = True) -> None:
        """Record ``metrics`` (floats or 0-d tensors) for ``iteration``."""
        if not self.enabled:
            return
        row = {"iteration": iteration, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key, value in row.items():
            tag = tensorboard_tag(key) if key != "iteration" else None
            if tag and math.isfinite(value):
                self.writer.add_scalar(tag, value, iteration)
        self.latest.update(row)
        if "total_loss" in row:
            self.last_train = row
        if step_done:
            self._progress(iteration, row)
        elif any(key.startswith(EVALUATION_PREFIXES) for key in row):
            self.write(f"eval @ iteration {iteration}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k != "iteration"))

    def image(self, tag: str, picture: Tensor, iteration: int) -> None:
        """A ``[3, H, W]`` picture with values in ``[0, 1]``, in TensorBoard's Images tab."""
        if self.enabled:
            self.writer.add_image(tag, picture, iteration)

    def distribution(self, tag: str, values: Tensor, iteration: int) -> None:
        """The distribution of ``values``, in TensorBoard's Histograms and Distributions tabs."""
        if self.enabled:
            self.writer.add_histogram(tag, values.float().flatten(), iteration)

    def hparams(self, config: Mapping[str, Any]) -> None:
        """The resolved config in the HParams tab, beside the last values of ``HPARAM_METRICS`` (read from the
        scalars as they come). Written once, when a run starts fresh; a resumed run keeps its own."""
        if self.enabled and self.start_iteration == 0:
            for summary in hparams(hparam_values(config), dict.fromkeys(HPARAM_METRICS, 0.0))[:2]:
                self.writer.file_writer.add_summary(summary)  # experiment, session start (the end: finished())

    def finished(self) -> None:
        """Mark the HParams session complete (a run that stopped early stays "unknown")."""
        if self.enabled:
            self.writer.file_writer.add_summary(hparams({}, {})[2])

    def eta(self, iteration: int) -> float:
        """Seconds left after ``iteration``, from the time the training steps took so far (what ran between
        them, evaluations and checkpoints, is left out: it would make a short run look hours long)."""
        done = iteration + 1 - self.start_iteration
        training = time.perf_counter() - self.started - self.paused
        return training / max(done, 1) * (self.total - iteration - 1)

    def advance(self, iteration: int) -> None:
        """``iteration``'s step is done, its figures not read yet (they come with :meth:`log` later): on a
        terminal the bar and the ETA move on with the figures last read."""
        self.done = max(self.done, iteration)
        if self.enabled and self.interactive:
            self._progress(iteration, {})

    def _progress(self, iteration: int, row: Mapping[str, float]) -> None:
        shown = {**self.last_train, **row}
        self.done = max(self.done, iteration)
        eta = f"eta {_format_duration(self.eta(self.done))}"
        if self.interactive:
            self.bar.n = self.done + 1
            self.bar.set_postfix_str(" ".join([eta, *(f"{_SHORT[k]} {shown[k]:.4g}" for k in _BAR_KEYS if k in shown)]))
            return
        # the first step, every print_every-th and the last: the rows as they are read (see train.log_every)
        if (iteration == self.start_iteration or (iteration + 1) % self.print_every == 0
                or iteration + 1 == self.total or "knn_top1" in row):
            fields = " ".join(f"{_SHORT[k]} {shown[k]:.4g}" for k in _LINE_KEYS if k in shown)
            print(f"[{iteration + 1}/{self.total}] {eta} {fields}", flush=True)

    @contextlib.contextmanager
    def activity(self, what: str, *, label: str, log: bool = True) -> Iterator[None]:
        """Work between two training steps (an evaluation, the monitor, a checkpoint save): shown while it runs
        (on a terminal, ``label`` in the bar; with ``log``, a line when it starts and one when it ends in a log)
        and left out of the ETA."""
        started = time.perf_counter()
        log = log and self.enabled and not self.interactive
        if self.enabled and self.interactive:
            self.bar.set_description_str(f"train [{label}]", refresh=True)
        elif log:
            print(f"{what}...", flush=True)
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.paused += seconds
            if self.enabled and self.interactive:
                self.bar.set_description_str("train", refresh=True)
            elif log:
                print(f"{what}: done in {seconds:.1f} s", flush=True)

    def progress(self, items: Iterable[Any], what: str, total: Optional[int] = None) -> Iterable[Any]:
        """``items`` with a bar of their own below the training bar, on a terminal (as is, elsewhere)."""
        if not (self.enabled and self.interactive):
            return items
        return tqdm(items, desc=what, total=total, leave=False, position=1, dynamic_ncols=True)

    def warn(self, message: str) -> None:
        self.write(f"warning: {message}", stream=sys.stderr)

    def write(self, message: str, stream: Any = None) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            (self.bar.write if self.interactive else print)(message, file=stream or sys.stdout)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
