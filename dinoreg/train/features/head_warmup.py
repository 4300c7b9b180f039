"""The head warm-up (``optim.head_warmup_iterations``), as one training feature.

For a start from a backbone alone (``student.pretrained_weights``: the heads start fresh), the first iterations
train the heads only: both backbones stay as they are (no gradient, no update, no weight decay, no moments, no EMA),
then training goes on with the normal schedules.
"""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig

from dinoreg.ssl.feature import TrainingFeature

__all__ = ["HeadWarmup", "head_warmup"]


class HeadWarmup(TrainingFeature):
    """Iterations ``0 .. iterations - 1`` train the heads only."""

    name = "head_warmup"

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations

    def trains_backbone(self, iteration: int) -> bool:
        return iteration >= self.iterations


def head_warmup(cfg: DictConfig) -> Optional[HeadWarmup]:
    """The feature of ``cfg`` (None when ``optim.head_warmup_iterations`` is 0)."""
    iterations = int(cfg.optim.head_warmup_iterations)
    return HeadWarmup(iterations) if iterations > 0 else None
