"""What a run finds in its output folder when it starts: the lock that keeps it to one run, the checkpoint it
resumes from (damaged ones skipped and set aside, or a refusal when none is intact), and a fresh start over an
earlier run (moved aside, never deleted)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from dinoreg.distributed import DistributedEnvironment, broadcast_flag, detect_environment
from dinoreg.run_dir import OutputDirError, RunDir, RunLock, check_not_in_use
from dinoreg.train.checkpoint import CheckpointError, check_no_foreign_entries, checkpoint_dirs, config_differences
from dinoreg.train.checkpoint_reader import CheckpointReader, newest_intact

__all__ = ["PREVIOUS_PREFIX", "lock_output_dir", "prepare_output_dir", "resume_point"]

PREVIOUS_PREFIX = "previous-"  # RUN/previous-<time>/: what --no-resume --force moved aside


def lock_output_dir(cfg: DictConfig, env: DistributedEnvironment) -> Optional[RunLock]:
    """One run per output folder: the main process holds its lock for the run's life; every rank stops with it
    when another run holds it (or the folder cannot be written)."""
    lock, failure = None, None
    if env.is_main:
        try:
            lock = RunLock(cfg.train.output_dir)
        except Exception as error:  # noqa: BLE001 -- whatever it is, every rank must stop with it, not wait
            failure = error
    if broadcast_flag(failure is not None):
        raise failure or OutputDirError(f"the main process could not lock {cfg.train.output_dir} (see its message)")
    return lock


def resume_point(cfg: DictConfig, output: RunDir, world_size: int, allow_config_change: bool,
                  warn: Callable[[str], None]) -> Optional[CheckpointReader]:
    """The checkpoint to resume from (None: start fresh), verified, after checking that the config still fits it."""
    check_no_foreign_entries(output.root)
    skipped: list[str] = []
    reader = newest_intact(output.root, warn=skipped.append)  # as train.init_from, phase.start_from, export
    published = checkpoint_dirs(output.root)
    if reader is None and published:
        raise CheckpointError(
            f"every checkpoint of {output.root} is damaged, so there is nothing to resume from: {'; '.join(skipped)}. "
            "Restore the files, or start over with --no-resume --force (which moves the run's checkpoints and logs "
            f"aside to {output.root}/{PREVIOUS_PREFIX}<time>/)")
    for message in skipped:
        warn(message)
    if reader is None:
        return None
    checkpoint = reader.checkpoint
    saved = _saved_config(checkpoint)
    breaking, benign = config_differences(saved, cfg)
    # Another number of processes with the same global batch (per-device batch scaled) is a benign change.
    saved_global = saved.train.batch_size_per_gpu * reader.verify()["world_size"]
    if saved_global == cfg.train.batch_size_per_gpu * world_size:
        moved = [line for line in breaking if line.startswith("train.batch_size_per_gpu:")]
        breaking, benign = [line for line in breaking if line not in moved], benign + moved
    if breaking and not allow_config_change:
        raise CheckpointError(
            f"the config differs from the one {checkpoint} was saved with, in keys that change the model or the "
            "data order:\n  " + "\n  ".join(breaking) +
            "\nResume with the saved values, or pass --allow-config-change to resume anyway.")
    for line in breaking + benign:
        warn(f"config changed since {checkpoint.name}: {line}")
    return reader


def _saved_config(checkpoint: Path) -> DictConfig:
    """The config ``checkpoint`` was saved with (YAML, read as data), or one line saying why it is not one."""
    path = RunDir(checkpoint).config
    try:
        saved = OmegaConf.load(path)
        if not isinstance(saved, DictConfig) or not isinstance(saved.train.batch_size_per_gpu, int):
            raise ValueError(f"a {type(saved).__name__} without train.batch_size_per_gpu")
    except Exception as error:  # noqa: BLE001 -- YAML, OmegaConf or shape: the file is not what a save writes
        first = (str(error).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path} is not the config a dinoreg checkpoint holds ({type(error).__name__}: {first}): "
                              "the file was edited or damaged; restore it, or delete that checkpoint to resume from "
                              "an older one") from None
    return saved


def prepare_output_dir(output_dir: str | Path, *, resume: bool, force: bool) -> None:
    """Refuse to start fresh over an existing run unless ``force``, which moves its checkpoints and logs aside to
    ``RUN/previous-<time>/`` (on the main process only: the others wait for it in the process-group rendezvous).
    Refuses while another run trains into the folder."""
    check_not_in_use(output_dir)
    previous = RunDir(output_dir).training_outputs()
    if resume or not previous:
        return
    if not force:
        raise OutputDirError(f"--no-resume: {output_dir} already holds a run ({', '.join(p.name for p in previous)}); "
                         f"pass --force to move it aside to {PREVIOUS_PREFIX}<time>/ and start fresh, or choose "
                         "another --output-dir")
    if detect_environment().is_main:
        aside = Path(output_dir) / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in previous:
            path.rename(aside / path.name)
        print(f"moved the earlier run's {', '.join(p.name for p in previous)} aside to {aside}")
