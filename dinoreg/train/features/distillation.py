"""DINOv2's distillation (``distillation.*``), as one training feature.

A frozen teacher, ``distillation_teacher`` (a backbone with its DINO and iBOT heads, read from a dinoreg run, a
``dinoreg export --with-heads`` file or an official ``teacher_checkpoint.pth``, DINOv2 or DINOv3 layout; any
architecture of either family with the student's prototype counts), gives the DINO and iBOT targets; the EMA teacher
is then the student's average, kept for evaluation and export. With ``distillation.mask_student=false`` (DINOv2's
setting) the student sees every patch and the iBOT loss scores every patch of the global crops.

A teacher whose patch size is not the student's (a DINOv3 ViT-L/16 teacher, a ViT-S/14 student) sees its own resize
of the same crops (:class:`TeacherCrops`): a crop of S px, S/p patches a side for the student's patch p, reaches the
teacher at (S/p) x q px for its patch q (``distillation.teacher_resize_method``, ``..._antialias``), so both give
the same patch grid and patch (r, c) covers the same part of the crop for both: the iBOT targets align patch for
patch, and the DINO targets come from the same views. Only the crops the teacher sees are resized: the two global
crops (in DINOv2 and DINOv3 alike the teacher never sees the local crops, whose DINO targets are the global crops'
class tokens). A RoPE teacher runs at any such size as it is; a learned-position (DINOv2) teacher has its
``pos_embed`` resampled once, when it is built, to its grid at that size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dinoreg.errors import InputError
from dinoreg.models import backbone_from_arch_kwargs
from dinoreg.models.head import head_spec_of
from dinoreg.ssl.feature import TrainingFeature
from dinoreg.ssl.meta_arch import HeadSpec, SSLMetaArch
from dinoreg.train.initial_weights import check_heads, fitted_backbone, read_weights

__all__ = ["Distillation", "TeacherCrops", "TeacherMismatchError", "check_distillation_teacher", "distillation"]

NAME = "distillation_teacher"


class TeacherMismatchError(InputError, ValueError):
    """A distillation teacher whose prototypes are not the student's, or crops on which the student's and the
    teacher's patch grids cannot match: the message names the keys."""


@dataclass(frozen=True)
class TeacherCrops:
    """What the frozen teacher sees of the student's crops: each resized from S px (``S / student_patch`` patches a
    side) to ``S / student_patch * teacher_patch`` px, so that the teacher's patch (r, c) covers the part of the crop
    that the student's patch (r, c) covers. ``method`` and ``antialias``: ``F.interpolate``'s ``mode`` and
    ``antialias`` (``align_corners=False`` where it applies). Equal patch sizes: the crops as they are.

    Called as a forward pre-hook of the teacher's backbone (:meth:`attach_to`), it resizes whatever reaches it (a
    batch, or a list of crop groups), so every caller of the teacher (the loss, FLOP counts) sees the same thing."""

    student_patch: int
    teacher_patch: int
    method: str = "bicubic"
    antialias: bool = True

    @property
    def resizes(self) -> bool:
        return self.student_patch != self.teacher_patch

    def size(self, student_size: int, key: str = "the crop size") -> int:
        """The teacher's side for a student crop side ``student_size`` (``key``: the config key that set it, for the
        error when the student's patches do not tile it, so that no teacher grid can match)."""
        if student_size <= 0 or student_size % self.student_patch:
            lower = max(student_size // self.student_patch, 1) * self.student_patch
            raise TeacherMismatchError(
                f"{key}={student_size} is not a whole number of the student's {self.student_patch}-px patches, so the "
                f"teacher ({self.teacher_patch}-px patches) cannot see the same patch grid: set {key} to a multiple of "
                f"{self.student_patch}, e.g. {lower} or {lower + self.student_patch}")
        return student_size // self.student_patch * self.teacher_patch

    def __call__(self, crops: Tensor) -> Tensor:
        """``crops`` [B, C, H, W] at the student's size -> [B, C, H', W'] at the teacher's, in their dtype (resized
        in fp32: under FSDP's bf16 policy the crops reach the teacher already cast)."""
        if not self.resizes:
            return crops
        height, width = crops.shape[-2:]
        size = (self.size(height, "the crop height"), self.size(width, "the crop width"))
        align_corners = False if self.method in ("bilinear", "bicubic") else None
        return F.interpolate(crops.float(), size=size, mode=self.method, align_corners=align_corners,
                             antialias=self.antialias).to(crops.dtype)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            x, args = args[0], args[1:]
            return (self._resize_input(x), *args), kwargs
        return args, {**kwargs, "x": self._resize_input(kwargs["x"])}

    def _resize_input(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        return self(x) if isinstance(x, Tensor) else [self(crops) for crops in x]

    def attach_to(self, backbone: nn.Module) -> None:
        """Make ``backbone`` (the teacher's) see its resize of every input: a forward pre-hook (none when the patch
        sizes are equal)."""
        if self.resizes:
            backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True)


def _prototypes(heads: nn.ModuleDict, name: str) -> int:
    head = heads[name] if name in heads else heads["dino_head"]  # a shared head scores the patches too
    return head.out_dim  # either layout: DINOv2's weight-normalised last layer or DINOv3's plain one


def check_distillation_teacher(teacher: nn.ModuleDict, student: nn.ModuleDict, *, patch_size: int,
                               crop_sizes: Mapping[str, int] = ()) -> None:
    """``teacher`` (a backbone and heads) scores the student's prototypes; on each of ``crop_sizes`` (the student's
    crops the teacher sees, by config key) the student's patches (``patch_size``) make a whole grid, so that the
    teacher, on its resize of that crop (:class:`TeacherCrops`), makes the same."""
    problems = [f"{name}: the teacher scores {_prototypes(teacher, name)} prototypes, the student "
                f"{_prototypes(student, name)}" for name in ("dino_head", "ibot_head")
                if _prototypes(teacher, name) != _prototypes(student, name)]
    if problems:
        raise TeacherMismatchError("the distillation teacher does not fit the student: " + "; ".join(problems)
                                   + " (set dino.head_n_prototypes and ibot.head_n_prototypes to the teacher's)")
    crops = TeacherCrops(patch_size, teacher["backbone"].patch_size)
    for key, size in dict(crop_sizes).items():
        crops.size(size, key)


class Distillation(TrainingFeature):
    """The frozen teacher and its targets; the student unmasked unless ``distillation.mask_student``."""

    name = "distillation"

    def __init__(self, teacher: nn.ModuleDict, tensors: dict[str, Tensor], *, mask_student: bool,
                 crops: TeacherCrops, global_crops_size: int) -> None:
        """``teacher``: the frozen model (on the meta device); ``tensors``: its values, by state key. ``crops``: what
        its backbone sees of the student's crops (attached to it here); ``global_crops_size``: the student's."""
        self._teacher, self._tensors = teacher, tensors
        self.unmasks_student = not mask_student
        self.crops, self.global_crops_size = crops, global_crops_size
        crops.attach_to(teacher["backbone"])

    def frozen_models(self) -> dict[str, nn.ModuleDict]:
        return {NAME: self._teacher}

    def frozen_tensors(self) -> dict[str, dict[str, Tensor]]:
        tensors, self._tensors = self._tensors, {}  # handed over: the feature keeps no copy for the run
        return {NAME: tensors}

    def attach(self, model: SSLMetaArch) -> None:
        check_distillation_teacher(getattr(model, NAME), model.student,
                                   patch_size=model.student["backbone"].patch_size,
                                   crop_sizes={"crops.global_crops_size": self.global_crops_size})

    def target_teacher(self, model: SSLMetaArch) -> Optional[nn.ModuleDict]:
        return getattr(model, NAME)


def distillation(cfg: DictConfig) -> Optional[Distillation]:
    """The feature of ``cfg`` (None without ``distillation.enabled``): the frozen teacher of
    ``distillation.teacher`` on the meta device (its architecture and head sizes from the file; built for its
    resize of the global crops, a ``pos_embed`` resampled once) and its tensors, checked to fit it. Its values
    always come from its file, never from a draw; a resumed run reads them again (they are in its checkpoints
    too)."""
    if not cfg.distillation.enabled:
        return None
    weights = read_weights(cfg.distillation.teacher, key="distillation.teacher")
    crops = TeacherCrops(cfg.student.patch_size, weights.arch["patch_size"], cfg.distillation.teacher_resize_method,
                         cfg.distillation.teacher_resize_antialias)
    arch = {**weights.arch, "img_size": crops.size(cfg.crops.global_crops_size, "crops.global_crops_size"),
            "attn_backend": cfg.student.attention_backend,
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
                        mask_student=cfg.distillation.mask_student, crops=crops,
                        global_crops_size=cfg.crops.global_crops_size)
