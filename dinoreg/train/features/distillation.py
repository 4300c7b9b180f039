"""DINOv2's distillation (``distillation.*``), as one training feature.

A frozen teacher, ``distillation_teacher`` (a backbone with its DINO and iBOT heads, read from a dinoreg run, a
``dinoreg export --with-heads`` file or an official ``teacher_checkpoint.pth``; any architecture with the student's
patch size and prototype counts), gives the DINO and iBOT targets; the EMA teacher is then the student's average,
kept for evaluation and export. With ``distillation.mask_student=false`` (DINOv2's setting) the student sees every
patch and the iBOT loss scores every patch of the global crops.
"""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinoreg.errors import InputError
from dinoreg.models import backbone_from_arch_kwargs
from dinoreg.models.head import head_spec_of
from dinoreg.ssl.feature import TrainingFeature
from dinoreg.ssl.meta_arch import HeadSpec, SSLMetaArch
from dinoreg.train.initial_weights import check_heads, fitted_backbone, read_weights

__all__ = ["Distillation", "TeacherMismatchError", "check_distillation_teacher", "distillation"]

NAME = "distillation_teacher"


class TeacherMismatchError(InputError, ValueError):
    """A distillation teacher whose prototypes or patch size are not the student's: the message names the keys."""


def _prototypes(heads: nn.ModuleDict, name: str) -> int:
    head = heads[name] if name in heads else heads["dino_head"]  # a shared head scores the patches too
    return head.last_layer.parametrizations.weight.original1.shape[0]


def check_distillation_teacher(teacher: nn.ModuleDict, student: nn.ModuleDict, *, patch_size: int) -> None:
    """``teacher`` (a backbone and heads) scores the student's prototypes on the student's patch grid."""
    problems = [f"{name}: the teacher scores {_prototypes(teacher, name)} prototypes, the student "
                f"{_prototypes(student, name)}" for name in ("dino_head", "ibot_head")
                if _prototypes(teacher, name) != _prototypes(student, name)]
    if teacher["backbone"].patch_size != patch_size:  # the iBOT masks index the same patch grid
        problems.append(f"patch size: the teacher's is {teacher['backbone'].patch_size}, the student's {patch_size}")
    if problems:
        raise TeacherMismatchError("the distillation teacher does not fit the student: " + "; ".join(problems)
                                   + " (set dino.head_n_prototypes, ibot.head_n_prototypes, student.patch_size to "
                                   "the teacher's)")


class Distillation(TrainingFeature):
    """The frozen teacher and its targets; the student unmasked unless ``distillation.mask_student``."""

    name = "distillation"

    def __init__(self, teacher: nn.ModuleDict, tensors: dict[str, Tensor], *, mask_student: bool) -> None:
        """``teacher``: the frozen model (on the meta device); ``tensors``: its values, by state key."""
        self._teacher, self._tensors = teacher, tensors
        self.unmasks_student = not mask_student

    def frozen_models(self) -> dict[str, nn.ModuleDict]:
        return {NAME: self._teacher}

    def frozen_tensors(self) -> dict[str, dict[str, Tensor]]:
        tensors, self._tensors = self._tensors, {}  # handed over: the feature keeps no copy for the run
        return {NAME: tensors}

    def attach(self, model: SSLMetaArch) -> None:
        check_distillation_teacher(getattr(model, NAME), model.student,
                                   patch_size=model.student["backbone"].patch_size)

    def target_teacher(self, model: SSLMetaArch) -> Optional[nn.ModuleDict]:
        return getattr(model, NAME)


def distillation(cfg: DictConfig) -> Optional[Distillation]:
    """The feature of ``cfg`` (None without ``distillation.enabled``): the frozen teacher of
    ``distillation.teacher`` on the meta device (its architecture and head sizes from the file; built for the global
    crop size, ``pos_embed`` resampled once) and its tensors, checked to fit it. Its values always come from its
    file, never from a draw; a resumed run reads them again (they are in its checkpoints too)."""
    if not cfg.distillation.enabled:
        return None
    weights = read_weights(cfg.distillation.teacher, key="distillation.teacher")
    arch = {**weights.arch, "img_size": cfg.crops.global_crops_size, "attn_backend": cfg.student.attention_backend,
            "attn_backend_required": cfg.student.attention_backend_required}
    with torch.device("meta"):
        backbone = backbone_from_arch_kwargs(arch)
        heads = {name: HeadSpec(**{k: v for k, v in spec.items() if k != "in_dim"}).build(backbone.embed_dim)
                 for name, spec in ((name, head_spec_of(head)) for name, head in weights.heads.items())}
    check_heads(weights, heads, key="distillation.teacher")
    tensors = {f"backbone.{k}": v
               for k, v in fitted_backbone(backbone, weights.backbone, key="distillation.teacher").items()}
    tensors.update({f"{name}.{k}": v for name, head in weights.heads.items() for k, v in head.items()})
    return Distillation(nn.ModuleDict({"backbone": backbone, **heads}), tensors,
                        mask_student=cfg.distillation.mask_student)
