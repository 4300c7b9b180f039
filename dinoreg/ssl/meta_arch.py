"""Student and teacher, and the DINO + iBOT + KoLeo objective of DINOv2, for one batch.

The arithmetic is the official ``SSLMetaArch.forward_backward``; it is written without the static-shape
padding buffers the official code needs for xformers (padded rows never reach a loss, so the values
are the same) and it returns the loss instead of calling backward itself. It receives what it needs as
arguments (backbones, head sizes, loss weights, centering); :func:`dinoreg.train.build.build_ssl_model`
builds it from a config. What a training feature adds (a frozen teacher, a loss term, a change of masking) comes
through the :class:`~dinoreg.ssl.feature.TrainingFeature` protocol: this module names no feature.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from dinoreg.data.batch import TrainingBatch
from dinoreg.models import DINOHead, VisionTransformer
from dinoreg.ssl.feature import StepOutputs, TrainingFeature
from dinoreg.ssl.losses import DEFAULT_CHUNK_ELEMENTS, DINOLoss, KoLeoLoss, iBOTPatchLoss


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


@dataclass(frozen=True)
class HeadSpec:
    """A projection head (:class:`~dinoreg.models.DINOHead`): an MLP of ``nlayers`` layers to the bottleneck,
    then ``n_prototypes`` prototypes, weight-normalised (DINOv2's layout) or a plain linear layer
    (``weight_norm=False``, DINOv3's)."""

    n_prototypes: int
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int
    weight_norm: bool = True

    def build(self, in_dim: int) -> DINOHead:
        return DINOHead(in_dim, self.n_prototypes, nlayers=self.nlayers, hidden_dim=self.hidden_dim,
                        bottleneck_dim=self.bottleneck_dim, weight_norm=self.weight_norm)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the objective's terms (official ``dino.loss_weight``, ``dino.koleo_loss_weight``,
    ``ibot.loss_weight``); a zero weight turns the term off."""

    dino: float
    koleo: float
    ibot: float


CENTERINGS = ("centering", "sinkhorn_knopp")


def _settle_centres(model: "SSLMetaArch", prefix: str, keep_vars: bool) -> None:
    model.dino_loss.apply_center_update()
    model.ibot_patch_loss.apply_center_update()


class SSLMetaArch(nn.Module):
    def __init__(self, student_backbone: VisionTransformer, teacher_backbone: VisionTransformer, *,
                 dino_head: HeadSpec, ibot_head: Optional[HeadSpec], loss_weights: LossWeights,
                 centering: str, pack_crops: bool = True, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 features: Sequence[TrainingFeature] = ()) -> None:
        """``teacher_backbone``: the same architecture as ``student_backbone`` (without stochastic depth); it
        starts as an exact copy. ``ibot_head``: a separate iBOT head; None shares the DINO head (official
        default). ``centering``: the teacher's ``"centering"`` (softmax, EMA centre) or ``"sinkhorn_knopp"``.
        ``pack_crops``: the student sees global and local crops in one packed pass (False: one pass per crop
        group, the same values). ``chunk_elements``: the losses' row chunks over the prototypes (see
        :mod:`dinoreg.ssl.losses`). ``features``: the run's training features (:mod:`dinoreg.ssl.feature`); their
        frozen models are added under their names, after the teacher, frozen; those of ``teacher_copies`` start as
        the teacher backbone's copy."""
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering {centering!r}: choose one of {', '.join(CENTERINGS)}")
        self.loss_weights, self.centering, self.pack_crops = loss_weights, centering, pack_crops
        embed_dim = student_backbone.embed_dim
        self.do_ibot = loss_weights.ibot > 0
        self.separate_ibot_head = self.do_ibot and ibot_head is not None
        student: dict[str, nn.Module] = {"backbone": student_backbone, "dino_head": dino_head.build(embed_dim)}
        if self.separate_ibot_head:
            student["ibot_head"] = ibot_head.build(embed_dim)
        self.student = nn.ModuleDict(student)
        # The teacher starts as an exact copy of the student and is only ever updated by EMA.
        teacher = {name: copy.deepcopy(module) for name, module in student.items() if name != "backbone"}
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, **teacher})
        self.teacher.load_state_dict(self.student.state_dict(), strict=True)
        self.teacher.requires_grad_(False)

        self.features = tuple(features)
        self.frozen_names: tuple[str, ...] = ()  # the features' frozen models, in the order they were added
        for feature in self.features:
            for name, frozen in feature.frozen_models().items():
                if hasattr(self, name):
                    raise ValueError(f"feature {feature.name!r}: the model already has a {name!r}")
                self.add_module(name, frozen)
                if name in feature.teacher_copies:
                    frozen["backbone"].load_state_dict(self.teacher["backbone"].state_dict(), strict=True)
                frozen.requires_grad_(False)
                self.frozen_names += (name,)

        self.dino_loss = DINOLoss(dino_head.n_prototypes, chunk_elements=chunk_elements)
        self.ibot_patch_loss = iBOTPatchLoss((ibot_head if self.separate_ibot_head else dino_head).n_prototypes,
                                             chunk_elements=chunk_elements)
        self.koleo_loss = KoLeoLoss()
        # a state read (a checkpoint, a copy) sees the centres with their deferred update folded in: no caller has
        # to remember the in-flight all-reduce of the last step's centre update
        self.register_state_dict_pre_hook(_settle_centres)
        for feature in self.features:  # the whole model is there: each feature checks what it added
            feature.attach(self)

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # no stochastic depth in the teacher (it has none anyway), and it is never trained
        for name in self.frozen_names:
            getattr(self, name).eval()
        return self

    @property
    def teacher_backbone(self) -> VisionTransformer:
        return self.teacher["backbone"]

    # --- teacher -----------------------------------------------------------------------------

    @property
    def teacher_copies(self) -> tuple[str, ...]:
        """The frozen models that start as the teacher backbone's copy (their ``backbone``)."""
        return tuple(name for feature in self.features for name in feature.teacher_copies)

    @property
    def target_teacher(self) -> nn.ModuleDict:
        """The model that gives the targets: a feature's (a distillation teacher), else the EMA teacher."""
        return next((target for feature in self.features if (target := feature.target_teacher(self)) is not None),
                    self.teacher)

    @property
    def ibot_all_patches(self) -> bool:
        """iBOT scores every patch of the global crops, which the student sees unmasked (a feature's choice)."""
        return self.do_ibot and any(feature.unmasks_student for feature in self.features)

    @torch.no_grad()
    def _teacher_targets(self, out: dict[str, Tensor], mask_indices: Tensor, n_masked: Tensor, teacher_temp: float
                         ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """``(cls targets, masked-patch targets, stats)`` from ``out``, the target teacher's backbone outputs on
        the global crops."""
        teacher = self.target_teacher
        cls_view1, cls_view2 = out["x_norm_clstoken"].chunk(2)
        # Swapped so that view 1 of the student is matched with view 2 of the teacher and vice versa.
        cls_tokens = torch.cat((cls_view2, cls_view1))  # [2B, D]
        cls_logits = teacher["dino_head"](cls_tokens)  # [2B, K], bf16 under autocast: the losses upcast
        patch_logits = None
        if self.do_ibot:
            masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)  # [M, D]
            head = teacher["ibot_head"] if "ibot_head" in teacher else teacher["dino_head"]
            patch_logits = head(masked_patches)  # [M, K]

        if self.centering == "centering":
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_probs = None
            if patch_logits is not None:
                patch_probs = self.ibot_patch_loss.softmax_center_teacher(patch_logits.unsqueeze(0), teacher_temp)
                patch_probs = patch_probs.squeeze(0)
                self.ibot_patch_loss.update_center(patch_logits.unsqueeze(0))
        else:
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = None
            if patch_logits is not None:
                patch_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp, n_masked)
        stats = {
            "teacher_entropy": _entropy(cls_probs).mean(),  # -> log K if the teacher collapses to uniform
            "teacher_batch_entropy": _entropy(cls_probs.mean(0)),  # -> 0 if every image picks one prototype
        }
        return cls_probs, patch_probs, stats

    # --- student and losses ------------------------------------------------------------------

    def forward_loss(self, batch: TrainingBatch, *, teacher_temp: float,
                     values: Optional[Mapping[str, float]] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch``: normalised crops, 2 global views per image (view 1 of every image, then view 2: DINO pairs
        each with the other), local crops and the global crops' iBOT masks (see
        :class:`~dinoreg.data.batch.TrainingBatch`). ``values``: this iteration's schedule values, for the features'
        loss terms (:meth:`~dinoreg.ssl.feature.TrainingFeature.loss_terms`). Returns the total loss and detached
        per-term metrics."""
        if batch.n_global_crops != 2 or batch.masks is None:
            raise ValueError(f"a training batch needs 2 global crops per image (DINO's cross-view targets) and the "
                             f"iBOT masks; got {batch.n_global_crops} global crops, masks "
                             f"{'present' if batch.masks is not None else 'absent'}")
        global_crops, local_crops = batch.global_crops, batch.local_crops
        masks, mask_indices, masks_weight = batch.masks, batch.mask_indices, batch.masks_weight
        n_masked = batch.n_masked_patches
        student_masks = masks
        if self.ibot_all_patches:  # a feature's choice: the student sees every patch, iBOT scores them all
            student_masks, masks = None, torch.ones_like(masks)  # [2B, N]
            mask_indices = torch.arange(masks.numel(), device=masks.device)  # [2B * N]
            masks_weight = torch.full((masks.numel(),), 1.0 / masks.shape[1], device=masks.device)
            n_masked = torch.tensor([masks.numel()], device=masks.device)
        n_global_crops, n_local_crops = batch.n_global_crops, batch.n_local_crops
        n_loss_terms = n_global_crops * (n_global_crops - 1) + n_global_crops * n_local_crops

        with torch.no_grad():
            teacher_out = self.target_teacher["backbone"](global_crops, is_training=True)
        teacher_cls, teacher_patch, metrics = self._teacher_targets(teacher_out, mask_indices, n_masked, teacher_temp)

        crops = [global_crops] + ([local_crops] if n_local_crops else [])
        crop_masks = [student_masks] + ([None] if n_local_crops else [])
        if self.pack_crops:
            outs = self.student["backbone"](crops, masks=crop_masks, is_training=True)
        else:
            outs = [self.student["backbone"]([c], masks=[m], is_training=True, first_group=i)[0]
                    for i, (c, m) in enumerate(zip(crops, crop_masks))]
        global_out = outs[0]
        global_cls = global_out["x_norm_clstoken"]  # [2B, D]
        # One pass through the shared head for cls tokens (and masked patches when the head is shared).
        head_inputs = [global_cls]
        if n_local_crops:
            head_inputs.append(outs[1]["x_norm_clstoken"])  # [nB, D]
        if self.do_ibot:
            masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)  # [M, D]
            if not self.separate_ibot_head:
                head_inputs.append(masked_patches)
        head_out = self.student["dino_head"](torch.cat(head_inputs)).split([t.shape[0] for t in head_inputs])
        global_logits = head_out[0]

        teacher_views = list(teacher_cls.chunk(n_global_crops))
        losses: dict[str, Tensor] = {}
        if n_local_crops:
            losses["dino_local_crops_loss"] = self.dino_loss(
                list(head_out[1].chunk(n_local_crops)), teacher_views) / n_loss_terms
        # The official code scores both cross-view pairs in one mean over 2B rows, hence the factor 2.
        losses["dino_global_crops_loss"] = self.dino_loss([global_logits], [teacher_cls]) * 2 / n_loss_terms
        total = self.loss_weights.dino * sum(losses.values())
        if self.loss_weights.koleo > 0:
            # per global view: never pull two views of one image apart
            koleo = sum(self.koleo_loss(view.float()) for view in global_cls.chunk(n_global_crops))
            losses["koleo_loss"] = self.loss_weights.koleo * koleo
            total = total + losses["koleo_loss"]
        if self.do_ibot:
            student_patch = self.student["ibot_head"](masked_patches) if self.separate_ibot_head else head_out[-1]
            losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                student_patch, teacher_patch, student_masks_flat=masks,
                n_masked_patches=mask_indices.shape[0], masks_weight=masks_weight)
            total = total + self.loss_weights.ibot * losses["ibot_loss"]
        if self.features:
            outputs = StepOutputs(batch=batch, student_masks=student_masks, student_global=global_out,
                                  teacher_global=teacher_out, cls_targets=teacher_cls, patch_targets=teacher_patch,
                                  values=values or {})
            for feature in self.features:
                terms, addition = feature.loss_terms(self, outputs)
                total = total if addition is None else total + addition
                losses.update(terms)
        metrics.update({name: value.detach() for name, value in losses.items()})
        metrics["total_loss"] = total.detach()
        return total, metrics

    @torch.no_grad()
    def update_teacher(self, momentum: float, *, backbone: bool = True) -> None:
        """EMA: teacher <- momentum * teacher + (1 - momentum) * student, for every student sub-module (the heads
        only when not ``backbone``: a head warm-up keeps both backbones as they are), in two multi-tensor
        operations over all parameters (the same values as a loop of ``mul_``/``add_``)."""
        teacher, student = [], []
        for name, student_module in self.student.items():
            if name == "backbone" and not backbone:
                continue
            teacher += list(self.teacher[name].parameters())
            student += [p.detach() for p in student_module.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)
