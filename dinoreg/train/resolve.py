"""The run's config, resolved once at start-up and read-only from then on.

:func:`resolve_run_config` turns the loaded config (:func:`dinoreg.config.load_config`) into the values this run
uses: the learning rate scaled for the global batch of this world size, and ``phase.start_from`` resolved to the
checkpoint directory it starts from. The result is what ``config.yaml`` and every checkpoint save, and what the
builders, schedules and periodic tools receive; it is frozen (``OmegaConf.set_readonly``), so a builder that
writes to it fails at once instead of changing what the others read.
"""

from __future__ import annotations

import copy
from typing import Callable, Generic, NamedTuple, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf

from dinoreg.config import apply_scaling_rule
from dinoreg.train.checkpoint_reader import CheckpointReader, open_checkpoint

__all__ = ["ResolvedRun", "resolve_run_config"]

Checkpoint = TypeVar("Checkpoint")


class ResolvedRun(NamedTuple, Generic[Checkpoint]):
    """What :func:`resolve_run_config` resolved: the run's config (read-only), the checkpoint to resume from (None: a
    fresh start) and, on a fresh start of a phase, its source checkpoint, opened and verified (for the build)."""

    cfg: DictConfig
    checkpoint: Optional[Checkpoint]
    phase_source: Optional[CheckpointReader]


def resolve_run_config(cfg: DictConfig, *, world_size: int,
                       find_checkpoint: Callable[[DictConfig], Optional[Checkpoint]] = lambda cfg: None
                       ) -> ResolvedRun[Checkpoint]:
    """The run's config resolved, the checkpoint to resume from and a phase's source. ``cfg`` is left as it is;
    the resolved copy has:

    - ``optim.lr`` from ``optim.base_lr`` and the scaling rule for a global batch of ``train.batch_size_per_gpu`` x
      ``world_size`` (:func:`~dinoreg.config.apply_scaling_rule`);
    - ``phase.start_from``: the checkpoint directory it names (itself, or a run's newest intact checkpoint) when the
      run starts fresh; a resumed run takes every weight from its own checkpoint and keeps the saved value.

    ``find_checkpoint(config)``: the checkpoint to resume from, given the config with its learning rate scaled
    (the resume compares it with the saved one; :func:`dinoreg.train.run_folder.resume_point`)."""
    resolved = copy.deepcopy(cfg)
    OmegaConf.set_readonly(resolved, False)
    apply_scaling_rule(resolved, world_size=world_size)
    checkpoint, phase_source = find_checkpoint(resolved), None
    if checkpoint is None and resolved.phase.start_from:
        phase_source = open_checkpoint(resolved.phase.start_from, key="phase.start_from")
        resolved.phase.start_from = str(phase_source.checkpoint)
    OmegaConf.set_readonly(resolved, True)
    return ResolvedRun(resolved, checkpoint, phase_source)
