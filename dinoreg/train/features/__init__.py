"""The training features beyond DINO + iBOT + KoLeo, one module each, behind the protocol of
:mod:`dinoreg.ssl.feature`: Gram anchoring (:mod:`.gram`), distillation (:mod:`.distillation`), the head warm-up
(:mod:`.head_warmup`), frozen parts of the backbone and its lr ramp (:mod:`.partial_training`).
:func:`build_features` turns a config into the run's features, in a fixed order (the order their frozen models join
the model, their terms the loss and their values the logs).

A new feature is a module here (a :class:`~dinoreg.ssl.feature.TrainingFeature` and a function from the config to
it, None when the config leaves it off), its line in :func:`build_features`, its config section in
:mod:`dinoreg.config_schema` (with its checks in :mod:`dinoreg.config`), and its tests.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dinoreg.ssl.feature import TrainingFeature
from dinoreg.train.features.distillation import distillation
from dinoreg.train.features.gram import gram_anchoring
from dinoreg.train.features.head_warmup import head_warmup
from dinoreg.train.features.partial_training import partial_training

__all__ = ["build_features"]


def build_features(cfg: DictConfig) -> list[TrainingFeature]:
    """The features ``cfg`` turns on, with the values of their frozen models read from their files (a distillation
    teacher, ``gram.ckpt``; on a resume too, where the checkpoint's own values then win). Under
    ``torch.device("meta")`` nothing is drawn."""
    total = int(cfg.optim.epochs) * int(cfg.train.epoch_length)
    features = (distillation(cfg), gram_anchoring(cfg, total_iterations=total),
                head_warmup(cfg), partial_training(cfg))
    return [feature for feature in features if feature is not None]
