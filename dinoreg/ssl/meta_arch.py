"""Student and teacher, and the DINO + iBOT + KoLeo objective of DINOv2, for one batch.

The arithmetic is the official ``SSLMetaArch.forward_backward``; it is written without the static-shape
padding buffers the official code needs for xformers (padded rows never reach a loss, so the values
are the same) and it returns the loss instead of calling backward itself.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from dinoreg.models import DINOHead, DinoVisionTransformer, build_backbone
from dinoreg.models.weights import CheckpointMismatchError, load_weights_into
from dinoreg.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss


def backbone_kwargs(student_cfg: Any, *, img_size: int, with_drop_path: bool) -> dict[str, Any]:
    """Backbone constructor arguments from ``cfg.student`` (the teacher gets no stochastic depth)."""
    kwargs = dict(
        img_size=img_size,
        patch_size=student_cfg.patch_size,
        init_values=student_cfg.layerscale,
        ffn_layer=student_cfg.ffn_layer,
        block_chunks=student_cfg.block_chunks,
        qkv_bias=student_cfg.qkv_bias,
        proj_bias=student_cfg.proj_bias,
        ffn_bias=student_cfg.ffn_bias,
        num_register_tokens=student_cfg.num_register_tokens,
        interpolate_antialias=student_cfg.interpolate_antialias,
        interpolate_offset=student_cfg.interpolate_offset,
        attn_backend=student_cfg.attention_backend,
        attn_backend_required=student_cfg.attention_backend_required,
        embed_dim=student_cfg.embed_dim,
        depth=student_cfg.depth,
        num_heads=student_cfg.num_heads,
    )
    if with_drop_path:
        kwargs.update(drop_path_rate=student_cfg.drop_path_rate, drop_path_uniform=student_cfg.drop_path_uniform)
    return kwargs


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: Any, *, load_pretrained: bool = True) -> None:
        """``load_pretrained``: read ``cfg.student.pretrained_weights`` (off when a checkpoint will be loaded)."""
        super().__init__()
        self.cfg = cfg
        img_size = cfg.crops.global_crops_size
        student_backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg.student, img_size=img_size,
                                                                             with_drop_path=True))
        teacher_backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg.student, img_size=img_size,
                                                                             with_drop_path=False))
        if cfg.student.pretrained_weights and load_pretrained:  # continued pretraining; the heads start fresh
            _load_pretrained(student_backbone, cfg.student.pretrained_weights)
        embed_dim = student_backbone.embed_dim
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.separate_ibot_head = self.do_ibot and cfg.ibot.separate_head
        student: dict[str, nn.Module] = {"backbone": student_backbone, "dino_head": self._head(cfg.dino, embed_dim)}
        if self.separate_ibot_head:
            student["ibot_head"] = self._head(cfg.ibot, embed_dim)
        self.student = nn.ModuleDict(student)
        # The teacher starts as an exact copy of the student and is only ever updated by EMA.
        teacher = {name: copy.deepcopy(module) for name, module in student.items() if name != "backbone"}
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, **teacher})
        self.teacher.load_state_dict(self.student.state_dict(), strict=True)
        self.teacher.requires_grad_(False)

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        ibot_dim = cfg.ibot.head_n_prototypes if self.separate_ibot_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()

    @staticmethod
    def _head(head_cfg: Any, in_dim: int) -> DINOHead:
        return DINOHead(in_dim, head_cfg.head_n_prototypes, nlayers=head_cfg.head_nlayers,
                        hidden_dim=head_cfg.head_hidden_dim, bottleneck_dim=head_cfg.head_bottleneck_dim)

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # no stochastic depth in the teacher (it has none anyway), and it is never trained
        return self

    @property
    def teacher_backbone(self) -> DinoVisionTransformer:
        return self.teacher["backbone"]

    # --- teacher -----------------------------------------------------------------------------

    @torch.no_grad()
    def _teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, n_masked: Tensor,
                         teacher_temp: float) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        out = self.teacher["backbone"](global_crops, is_training=True)
        cls_view1, cls_view2 = out["x_norm_clstoken"].chunk(2)
        # Swapped so that view 1 of the student is matched with view 2 of the teacher and vice versa.
        cls_tokens = torch.cat((cls_view2, cls_view1))  # [2B, D]
        cls_logits = self.teacher["dino_head"](cls_tokens).float()  # [2B, K]
        patch_logits = None
        if self.do_ibot:
            masked_patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)  # [M, D]
            head = self.teacher["ibot_head"] if self.separate_ibot_head else self.teacher["dino_head"]
            patch_logits = head(masked_patches).float()  # [M, K]

        if self.cfg.train.centering == "centering":
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

    def forward_loss(self, batch: dict[str, Tensor], *, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch``: normalised ``global_crops`` [2B,3,G,G] (view 1 then view 2), ``local_crops`` [nB,3,L,L],
        ``masks`` [2B, N] bool, ``mask_indices`` [M], ``masks_weight`` [M], ``n_masked_patches`` [1].
        Returns the total loss and detached per-term metrics."""
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        masks, mask_indices = batch["masks"], batch["mask_indices"]
        n_global_crops = 2
        n_local_crops = local_crops.shape[0] // (global_crops.shape[0] // n_global_crops)
        n_loss_terms = n_global_crops * (n_global_crops - 1) + n_global_crops * n_local_crops

        teacher_cls, teacher_patch, metrics = self._teacher_targets(
            global_crops, mask_indices, batch["n_masked_patches"], teacher_temp)

        crops = [global_crops] + ([local_crops] if n_local_crops else [])
        crop_masks = [masks] + ([None] if n_local_crops else [])
        outs = self.student["backbone"](crops, masks=crop_masks, is_training=True)
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
        head_out = self.student["dino_head"](torch.cat(head_inputs)).float().split([t.shape[0] for t in head_inputs])
        global_logits = head_out[0]

        teacher_views = list(teacher_cls.chunk(n_global_crops))
        losses: dict[str, Tensor] = {}
        if n_local_crops:
            losses["dino_local_crops_loss"] = self.dino_loss(
                list(head_out[1].chunk(n_local_crops)), teacher_views) / n_loss_terms
        # The official code scores both cross-view pairs in one mean over 2B rows, hence the factor 2.
        losses["dino_global_crops_loss"] = self.dino_loss([global_logits], [teacher_cls]) * 2 / n_loss_terms
        total = self.cfg.dino.loss_weight * sum(losses.values())
        if self.cfg.dino.koleo_loss_weight > 0:
            # per global view: never pull two views of one image apart
            koleo = sum(self.koleo_loss(view.float()) for view in global_cls.chunk(n_global_crops))
            losses["koleo_loss"] = self.cfg.dino.koleo_loss_weight * koleo
            total = total + losses["koleo_loss"]
        if self.do_ibot:
            student_patch = self.student["ibot_head"](masked_patches).float() if self.separate_ibot_head else head_out[-1]
            losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                student_patch, teacher_patch, student_masks_flat=masks,
                n_masked_patches=mask_indices.shape[0], masks_weight=batch["masks_weight"])
            total = total + self.cfg.ibot.loss_weight * losses["ibot_loss"]
        metrics.update({name: value.detach() for name, value in losses.items()})
        metrics["total_loss"] = total.detach()
        return total, metrics

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- momentum * teacher + (1 - momentum) * student, for every student sub-module."""
        for name, student_module in self.student.items():
            for t, s in zip(self.teacher[name].parameters(), student_module.parameters()):
                t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def max_entropy(cfg: Any) -> float:
    """log K: the teacher entropy of a collapse to the uniform distribution."""
    return math.log(cfg.dino.head_n_prototypes)


def _load_pretrained(backbone: DinoVisionTransformer, path: str) -> None:
    """Strictly, with ``pos_embed`` resampled to the global crop size; errors name the config key."""
    if not os.path.exists(path):
        raise ValueError(f"student.pretrained_weights: {path} does not exist; give an official or exported "
                         "backbone (.pth, .safetensors, or a `dinoreg export` output), or leave it empty")
    try:
        load_weights_into(backbone, path)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(
            f"student.pretrained_weights {path} does not fit the configured student (student.arch, patch_size, "
            f"num_register_tokens, ffn_layer...):\n{error}") from None
