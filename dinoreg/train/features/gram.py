"""Gram anchoring (DINOv3, ``gram.*`` and ``crops.gram_teacher_*``), as one training feature.

The student's global-crop patch tokens (registers and cls excluded) are anchored to those of a frozen Gram teacher
through the mean squared difference of their Gram matrices (the loss in :mod:`dinoreg.ssl.gram`). The Gram
teacher is the EMA teacher itself (``gram.ema_teacher``) or a frozen model of the teacher's architecture,
``gram_teacher``, read from ``gram.ckpt`` or copied from the EMA teacher at the start of ``gram.it_load_ema_teacher``
and after the refreshes of :class:`GramSchedule`. It may see its own crops: the global crops' boxes at
``crops.gram_teacher_crops_size``, undistorted (cut by the workers) or distorted (the workers cut the global crops
at that size, the device distorts them and resizes the student's copy down).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dinoreg.config import build_backbone_from_config
from dinoreg.data import TrainingBatch, normalise_uint8
from dinoreg.ssl.feature import StepOutputs, TrainingFeature
from dinoreg.ssl.gram import GramSpec, gram_loss, gram_loss_weight, resize_patch_features, select_gram_tokens
from dinoreg.ssl.meta_arch import SSLMetaArch
from dinoreg.train.initial_weights import fitted_backbone, read_weights

__all__ = ["GramAnchoring", "GramSchedule", "gram_anchoring"]

NAME = "gram_teacher"


class GramSchedule:
    """When the Gram teacher is set and how much the Gram loss weighs, per iteration (DINOv3's ``gram.*``).

    The Gram teacher is ready from iteration 0 with ``gram.ckpt`` or ``gram.ema_teacher``, else from
    ``gram.it_load_ema_teacher``, at whose start the EMA teacher is copied into it (:attr:`copy_before`); it is
    refreshed after the iterations of :meth:`refresh_after`. Everything is a function of the iteration, so a
    resumed run does what the uninterrupted one did (DINOv3 recounts its refreshes from the iteration too).
    """

    def __init__(self, cfg: Any, total_iterations: int) -> None:
        gram, epoch_length = cfg.get("gram"), int(cfg.train.epoch_length)  # an official config has no gram section
        self.enabled = gram is not None and bool(gram.use_loss)
        if not self.enabled:
            self.copy_before, self.ready_from, self.from_file, self._refreshes = None, 0, False, set()
            return
        own_teacher = not gram.ema_teacher
        self.from_file = own_teacher and bool(gram.ckpt)  # the Gram teacher is read from gram.ckpt at start-up
        self.copy_before = int(gram.it_load_ema_teacher) if own_teacher and gram.it_load_ema_teacher >= 0 else None
        self.ready_from = 0 if not own_teacher or gram.ckpt else self.copy_before
        refreshes = [m for m in range(gram.update_frequency, total_iterations + 1, gram.update_frequency)
                     if m >= gram.it_first_update] if own_teacher and gram.rep_update else []
        self._refreshes = set(refreshes if gram.max_updates is None else refreshes[:gram.max_updates])
        schedule = gram.loss_weight_schedule
        if schedule is None:
            self._weight = lambda it: float(gram.loss_weight)
        else:
            cosine = schedule.get("cosine_epochs")
            self._weight = lambda it: gram_loss_weight(
                it, start=schedule["start"], peak=schedule["peak"], end=schedule["end"],
                warmup_iterations=int(schedule["warmup_epochs"] * epoch_length), total_iterations=total_iterations,
                cosine_iterations=None if cosine is None else int(cosine * epoch_length))

    def weight(self, it: int) -> float:
        """The Gram loss's weight at iteration ``it``: 0 while there is no Gram teacher (or without Gram anchoring)."""
        if not self.enabled or it < self.ready_from:
            return 0.0
        return self._weight(it)

    def refresh_after(self, it: int) -> bool:
        """Whether the EMA teacher is copied into the Gram teacher after iteration ``it``'s EMA update."""
        return it + 1 in self._refreshes


def gram_spec(cfg: DictConfig) -> GramSpec:
    """``cfg.gram`` as the loss's :class:`~dinoreg.ssl.gram.GramSpec`."""
    gram = cfg.gram
    return GramSpec(normalized=gram.normalized, img_level=gram.img_level, remove_neg=gram.remove_neg,
                    remove_only_teacher_neg=gram.remove_only_teacher_neg, tokens_used=gram.tokens_used,
                    resize_method=gram.global_teacher_resize_method, resize_antialias=gram.global_teacher_resize_antialias,
                    ema_teacher=gram.ema_teacher, compute_stats=gram.compute_stats)


def gram_crops(cfg: DictConfig) -> tuple[Optional[int], bool]:
    """``(size, undistorted)`` of a Gram teacher's own crops, as DINOv3 makes them: the same boxes and flips as the
    global crops, at ``crops.gram_teacher_crops_size``, without distortions (``crops.gram_teacher_no_distortions``)
    or with the global crops' own, applied at that size before the student's crops are resized down. Size None:
    the Gram teacher sees the student's global crops (no Gram teacher of its own, or no size and distortions)."""
    gram, crops = cfg.gram, cfg.crops
    if gram.ema_teacher:
        return None, False
    if crops.gram_teacher_no_distortions:
        return crops.gram_teacher_crops_size or crops.global_crops_size, True
    return crops.gram_teacher_crops_size, False


class GramAnchoring(TrainingFeature):
    """The Gram loss term, the Gram teacher (``gram_teacher``, unless the EMA teacher is the Gram teacher), its
    load and refreshes, its crops."""

    name = "gram"

    def __init__(self, spec: GramSpec, schedule: GramSchedule, *, backbone: Optional[nn.Module],
                 tensors: Optional[dict[str, Tensor]], crops: tuple[Optional[int], bool], student_size: int) -> None:
        """``backbone``: the Gram teacher's (None: the EMA teacher is the Gram teacher); ``tensors``: its values read
        from ``gram.ckpt`` (None: it starts as the teacher's copy). ``crops``: see :func:`gram_crops`;
        ``student_size``: the student's global crop size."""
        self.spec, self.schedule, self.crops, self.student_size = spec, schedule, crops, student_size
        self._backbone, self._tensors = backbone, tensors
        self.teacher_copies = self.compiled = (NAME,) if backbone is not None else ()

    def frozen_models(self) -> dict[str, nn.ModuleDict]:
        return {NAME: nn.ModuleDict({"backbone": self._backbone})} if self._backbone is not None else {}

    def frozen_tensors(self) -> dict[str, dict[str, Tensor]]:
        tensors, self._tensors = self._tensors, None  # handed over: the feature keeps no copy for the run
        return {NAME: tensors} if tensors is not None else {}

    # --- data: the Gram teacher's crops

    def worker_crops(self, global_size: int) -> tuple[int, Optional[int]]:
        size, undistorted = self.crops
        # distorted at a larger size: the workers cut the global crops at that size, the device distorts them there
        # and resizes them down for the student (prepare_batch)
        return (size if size and not undistorted else global_size), (size if undistorted else None)

    def prepare_batch(self, batch: TrainingBatch) -> TrainingBatch:
        """Undistorted Gram crops are normalised; distorted ones are the global crops as the workers cut them (at
        the Gram teacher's size), and the student's are those resized down (bicubic, antialiased), as DINOv3 does."""
        size, undistorted = self.crops
        if undistorted:
            return batch.replace(gram_crops=normalise_uint8(batch.gram_crops))
        if size:
            student = self.student_size
            return batch.replace(gram_crops=batch.global_crops, global_crops=F.interpolate(
                batch.global_crops, size=(student, student), mode="bicubic", align_corners=False, antialias=True))
        return batch

    # --- the loss

    def values(self, iteration: int) -> dict[str, float]:
        return {"gram_loss_weight": self.schedule.weight(iteration)}

    def loss_terms(self, model: SSLMetaArch, outputs: StepOutputs) -> tuple[dict[str, Tensor], Optional[Tensor]]:
        """``gram_loss`` (and with ``compute_stats`` its value on the masked and the unmasked tokens, without
        gradient) between the student's patch tokens [2B, N, D] and the Gram teacher's on the same views; zeros
        while the weight is 0, so that every step logs the same terms."""
        spec, weight = self.spec, outputs.values.get("gram_loss_weight", 0.0)
        student_patches = outputs.student_global["x_norm_patchtokens"]
        names = ["gram_loss"] + (["gram_masked_loss", "gram_unmasked_loss"] if spec.compute_stats else [])
        if not weight > 0:
            return {name: student_patches.new_zeros(()) for name in names}, None
        with torch.no_grad():
            target = (outputs.teacher_global["x_norm_patchtokens"] if spec.ema_teacher
                      else self._teacher_patches(model, outputs.batch))
        options = dict(apply_norm=spec.normalized, img_level=spec.img_level, remove_neg=spec.remove_neg,
                       remove_only_teacher_neg=spec.remove_only_teacher_neg)
        masks = outputs.student_masks
        if masks is None:  # an unmasked student: every token is unmasked
            masks = torch.zeros(student_patches.shape[:2], dtype=torch.bool, device=student_patches.device)

        def term(which: str, **overrides: bool) -> Tensor:  # a batch without masked tokens scores 0, not NaN
            student, teacher = select_gram_tokens(student_patches, target, masks, which)
            return gram_loss(student, teacher, **{**options, **overrides}) if student.numel() else student.sum()

        terms = {"gram_loss": term(spec.tokens_used)}
        for which in ("masked", "unmasked") if spec.compute_stats else ():
            with torch.no_grad():
                terms[f"gram_{which}_loss"] = term(which, img_level=False)
        return terms, weight * terms["gram_loss"]

    def _teacher_patches(self, model: SSLMetaArch, batch: TrainingBatch) -> Tensor:
        """The Gram teacher's patch tokens on ``gram_crops`` (else the global crops), resized to the student's
        patch grid when its crops are larger ([2B, N, D])."""
        crops = batch.global_crops if batch.gram_crops is None else batch.gram_crops
        backbone = getattr(model, NAME)["backbone"]
        patches = backbone(crops, is_training=True)["x_norm_patchtokens"]  # [2B, T, D]
        grid, student_grid = crops.shape[-1] // backbone.patch_size, batch.global_crops.shape[-1] // backbone.patch_size
        return resize_patch_features(patches, grid, student_grid, mode=self.spec.resize_method,
                                     antialias=self.spec.resize_antialias)

    # --- the step: the Gram teacher's copy and refreshes

    def before_step(self, model: SSLMetaArch, iteration: int) -> None:
        """The Gram teacher's copy of the EMA teacher at the start of ``gram.it_load_ema_teacher``."""
        if self._backbone is not None and self.schedule.copy_before == iteration:
            refresh(model)

    def after_step(self, model: SSLMetaArch, iteration: int) -> None:
        """Its refreshes after the steps :class:`GramSchedule` names."""
        if self._backbone is not None and self.schedule.refresh_after(iteration):
            refresh(model)

    def missing_on_resume(self, iteration: int) -> dict[str, Optional[str]]:
        """Gram anchoring may be turned on in a run saved without it (DINOv3 anchors a running pretraining, with
        ``--allow-config-change``): a checkpoint without a Gram teacher is then complete if the Gram teacher is
        read from ``gram.ckpt`` or copied from the EMA teacher at or after the resumed iteration."""
        if self._backbone is None:
            return {}
        copy_before = self.schedule.copy_before
        if self.schedule.from_file or (copy_before is not None and iteration <= copy_before):
            return {f"{NAME}.": None}
        return {f"{NAME}.": "A Gram teacher added to a run saved without one must be read from gram.ckpt=FILE or "
                            f"copied at or after the resumed iteration (gram.it_load_ema_teacher >= {iteration}); or"}


@torch.no_grad()
def refresh(model: SSLMetaArch) -> None:
    """Gram teacher <- the EMA teacher's backbone (DINOv3's ``update_gram``: a copy, no momentum)."""
    source, target = model.teacher["backbone"], getattr(model, NAME)["backbone"]
    for ours, theirs in zip([*target.parameters(), *target.buffers()], [*source.parameters(), *source.buffers()]):
        ours.copy_(theirs)


def gram_anchoring(cfg: DictConfig, *, total_iterations: int) -> Optional[GramAnchoring]:
    """The feature of ``cfg`` (None without ``gram.use_loss``). ``gram.ckpt`` is read on a resume too: a checkpoint
    saved before Gram anchoring was turned on holds no Gram teacher (one that has it overwrites these values).
    Under ``torch.device("meta")`` nothing is drawn."""
    if not cfg.gram.use_loss:
        return None
    backbone = tensors = None
    if not cfg.gram.ema_teacher:
        with torch.random.fork_rng(devices=[]):  # a copy of the teacher: its own draws must not shift the heads'
            backbone = build_backbone_from_config(cfg, stochastic_depth=False)
        if cfg.gram.ckpt:
            weights = read_weights(cfg.gram.ckpt, key="gram.ckpt")
            tensors = {f"backbone.{k}": v for k, v in fitted_backbone(backbone, weights.backbone,
                                                                      key="gram.ckpt").items()}
    return GramAnchoring(gram_spec(cfg), GramSchedule(cfg, total_iterations), backbone=backbone, tensors=tensors,
                         crops=gram_crops(cfg), student_size=cfg.crops.global_crops_size)
