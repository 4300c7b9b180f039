"""Continued pretraining of part of the backbone (``optim.freeze``, ``optim.train_last_blocks``,
``optim.unfreeze_ramp_iterations``), as one training feature.

* ``optim.freeze``: parts of the student backbone that never train: ``patch_embed``, ``cls_token``, ``pos_embed``
  (the learned-position family only; a RoPE backbone learns no positions), ``register_tokens`` (a RoPE backbone's
  ``storage_tokens``; either name for either family) and ``mask_token``.
* ``optim.train_last_blocks=N``: only blocks ``depth - N .. depth - 1`` of the student backbone train, with its
  final norm(s) (``norm``, and a RoPE backbone's untied ``cls_norm`` / ``local_cls_norm``) and the heads; the
  embeddings (patch embedding, tokens, position embedding) and the earlier blocks are frozen.
* ``optim.unfreeze_ramp_iterations=R``: from the first iteration the backbone trains (after
  ``optim.head_warmup_iterations=H``), its learning rate is the schedule's times ``(it - H + 1) / R`` for
  ``it < H + R``, then the schedule's; the heads keep theirs. The factor is the logged ``backbone_lr_scale``.

Frozen parameters are switched off when the model is built (``requires_grad=False``): they get no gradient, are in
no optimiser group (so AdamW's decoupled weight decay never touches them and they have no moments), and the layer-
wise lr decay of what trains is unchanged. The EMA update would still move their teacher copies (``m t + (1 - m) s``
is not ``t`` in floating point even where ``t == s``): after every step the feature puts them back, to the
student's values where they were equal when training started (every start but a phase's), else to the values the
teacher had then (a phase continuing a run whose student and teacher differ: the teacher keeps what it loaded).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dinoreg.config_checks import FREEZE_NAMES
from dinoreg.ssl.feature import SSLMetaArch, TrainingFeature
from dinoreg.train.optim import BACKBONE_LR_SCALE

__all__ = ["PartialTraining", "frozen_parameter_names", "partial_training"]

# The backbone's final norms: they train with the last blocks. A RoPE backbone without untied norms has None there.
FINAL_NORMS = ("norm", "cls_norm", "local_cls_norm")
# Either family's name for its registers: the learned family's register_tokens, a RoPE backbone's storage_tokens.
_TOKEN_ALIASES = {"register_tokens": ("register_tokens", "storage_tokens"),
                  "storage_tokens": ("register_tokens", "storage_tokens")}


def _named_part(backbone: nn.Module, name: str) -> list[str]:
    """The parameter names of the backbone part ``name`` (one of :data:`~dinoreg.config_checks.FREEZE_NAMES`)."""
    if name == "patch_embed":
        return [f"patch_embed.{local}" for local, _ in backbone.patch_embed.named_parameters()]
    own = dict(backbone.named_parameters(recurse=False))
    for attribute in _TOKEN_ALIASES.get(name, (name,)):
        if attribute in own:
            return [attribute]
    raise ValueError(f"optim.freeze: the {type(backbone).__name__} has no {name} (the config's checks let it "
                     "through); remove it from optim.freeze")


def frozen_parameter_names(backbone: nn.Module, freeze: Sequence[str], train_last_blocks: Optional[int]) -> list[str]:
    """The names of the parameters of ``backbone`` that do not train, in its order."""
    frozen = {param_name for name in freeze for param_name in _named_part(backbone, name)}
    if train_last_blocks is not None:
        depth = len(backbone.blocks)
        if not 1 <= train_last_blocks <= depth:
            raise ValueError(f"optim.train_last_blocks={train_last_blocks} must be in [1, {depth}]")
        trained = {f"blocks.{index}." for index in range(depth - train_last_blocks, depth)}
        trained |= {f"{norm}." for norm in FINAL_NORMS if getattr(backbone, norm, None) is not None}
        frozen |= {name for name, _ in backbone.named_parameters() if not name.startswith(tuple(trained))}
    return [name for name, _ in backbone.named_parameters() if name in frozen]


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the EMA and the copies work shard by shard), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class PartialTraining(TrainingFeature):
    """Frozen parts of the student backbone (teacher copies kept), and the backbone's learning-rate ramp."""

    name = "partial_training"

    def __init__(self, freeze: Sequence[str], train_last_blocks: Optional[int], ramp_iterations: int,
                 ramp_start: int) -> None:
        self.freeze = tuple(freeze)
        self.train_last_blocks = train_last_blocks
        self.ramp_iterations = ramp_iterations
        self.ramp_start = ramp_start  # the first iteration the backbone trains (the head warm-up's end)
        self.frozen_names: tuple[str, ...] = ()
        # (teacher tensors, what they are put back to after each step): set at the first step
        self._restore: Optional[tuple[list[Tensor], list[Tensor]]] = None

    def attach(self, model: SSLMetaArch) -> None:
        """Switch off the frozen student parameters before the optimiser, the sharding and the compilation see
        them (``requires_grad`` survives all three, and the move off the meta device)."""
        student = model.student["backbone"]
        self.frozen_names = tuple(frozen_parameter_names(student, self.freeze, self.train_last_blocks))
        parameters = dict(student.named_parameters())
        for name in self.frozen_names:
            parameters[name].requires_grad_(False)

    def values(self, iteration: int) -> dict[str, float]:
        if not self.ramp_iterations:
            return {}
        return {BACKBONE_LR_SCALE: min(1.0, max(0.0, (iteration - self.ramp_start + 1) / self.ramp_iterations))}

    def before_step(self, model: SSLMetaArch, iteration: int) -> None:
        if self._restore is not None or not self.frozen_names:
            return
        # At the first step this process runs (the start, or the resumed checkpoint: the frozen values are the
        # same in both, so a resume decides as the run did)
        students = dict(model.student["backbone"].named_parameters())
        teachers = dict(model.teacher["backbone"].named_parameters())
        targets, sources = [], []
        for name in self.frozen_names:
            teacher, student = _local(teachers[name].detach()), _local(students[name].detach())
            targets.append(teacher)
            sources.append(student if torch.equal(teacher, student) else teacher.clone())
        self._restore = (targets, sources)

    def after_step(self, model: SSLMetaArch, iteration: int) -> None:
        if self._restore is not None:
            with torch.no_grad():
                for teacher, value in zip(*self._restore):
                    teacher.copy_(value)


def partial_training(cfg: DictConfig) -> Optional[PartialTraining]:
    """The feature of ``cfg`` (None when ``optim.freeze`` is empty, ``optim.train_last_blocks`` null and
    ``optim.unfreeze_ramp_iterations`` 0)."""
    optim = cfg.optim
    freeze, last, ramp = list(optim.freeze), optim.train_last_blocks, int(optim.unfreeze_ramp_iterations)
    if not freeze and last is None and not ramp:
        return None
    return PartialTraining(freeze, None if last is None else int(last), ramp, int(optim.head_warmup_iterations))
