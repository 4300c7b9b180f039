"""Parameter groups (layer-wise lr decay, weight-decay rules), AdamW, per-iteration schedules.

The semantics are the official DINOv2 ones (``dinov2/utils/param_groups.py``,
``dinov2/train/train.py``, ``CosineScheduler`` in ``dinov2/utils/utils.py``), with one difference
of method: groups are decided from the module structure (which module owns a parameter), not by
matching substrings of parameter names, so a renamed attribute cannot silently change a learning
rate.

One training step uses this module as::

    values = schedules.values(it)
    apply_optim_schedule(optimizer, lr=values["lr"], weight_decay=values["weight_decay"],
                         last_layer_lr=values["last_layer_lr"])
    ...backward...
    grad_norms = clip_grad_norms_on_device(student, clip_grad)  # 0-d tensors: nothing waits for the device
    optimizer.step()
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)
from torch import Tensor, nn

from dinoreg.config_schema import ADAMW_IMPLEMENTATIONS
from dinoreg.models.layers import LayerScale
from dinoreg.models.layers import RMSNorm
from dinoreg.models.vit import VisionTransformer

__all__ = [
    "BACKBONE_LR_SCALE",
    "DIVERGENCE_HINT",
    "IterationSchedule",
    "SCHEDULE_NAMES",
    "Schedules",
    "apply_optim_schedule",
    "build_optimizer",
    "build_param_groups",
    "clip_grad_norms_on_device",
    "cosine_schedule",
    "separate_backbone_groups",
    "zero_first_iterations",
]

# The keys of Schedules.values; the training features add their own values beside them.
SCHEDULE_NAMES = ("lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr")
# A training feature's value (TrainingFeature.values) that scales the backbone's learning rate (and with it AdamW's
# decoupled weight decay) and not the heads'; 1 where no feature gives it.
BACKBONE_LR_SCALE = "backbone_lr_scale"
# What to change when the loss diverges (the optimiser's keys).
DIVERGENCE_HINT = "Lower optim.base_lr or raise optim.warmup_epochs, and check the data."

# Direct parameters of the backbone; all are token / position embeddings and share layer id 0.
EMBEDDING_PARAMETERS = ("cls_token", "pos_embed", "register_tokens", "storage_tokens", "mask_token")
# Every parameter of these modules is exempt from weight decay (the official rule is "norm" in the
# name, which in the ViT means exactly its LayerNorms).
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, RMSNorm)
FUSE_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


# --- parameter groups ------------------------------------------------------------------------


def _backbone_layer_ids(backbone: VisionTransformer) -> tuple[dict[int, int], set[int]]:
    """``id(param) -> layer id`` for the embeddings (0) and blocks (i + 1), and the ids of the
    patch-embedding parameters. Parameters not in the map (the final norm) get ``depth + 1``."""
    layer_ids: dict[int, int] = {}
    patch_embed_ids = {id(p) for p in backbone.patch_embed.parameters()}
    for param_id in patch_embed_ids:
        layer_ids[param_id] = 0
    for name, param in backbone.named_parameters(recurse=False):
        if name not in EMBEDDING_PARAMETERS:
            raise ValueError(f"backbone parameter {name!r} has no layer-decay rule; add it to "
                             f"EMBEDDING_PARAMETERS or move it into a submodule")
        # Layer 0 like the other embeddings, register_tokens included (the official registers code does the same).
        layer_ids[id(param)] = 0
    for index, block in enumerate(backbone.blocks):
        for param in block.parameters():
            layer_ids[id(param)] = index + 1
    return layer_ids, patch_embed_ids


def _wd_multiplier(module: nn.Module, local_name: str) -> float:
    if isinstance(module, NORM_TYPES) or local_name == "bias":
        return 0.0
    if isinstance(module, LayerScale) and local_name == "gamma":
        return 0.0
    # Everything else decays, as in the official code: also cls/pos/register/mask tokens and both
    # tensors of the weight-normalised last layer (magnitude g and direction v).
    return 1.0


def build_param_groups(student: nn.ModuleDict | Mapping[str, nn.Module], *, layerwise_decay: float,
                       patch_embed_lr_mult: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups for ``student`` (``backbone``, ``dino_head``, ``ibot_head``...).

    Each trainable parameter appears exactly once, in a group
    ``{"params", "lr_multiplier", "wd_multiplier", "is_last_layer", "names"}``; groups are fused by
    identical multipliers and flag. ``lr_multiplier = layerwise_decay ** (depth + 1 - layer_id)``
    with layer id 0 for the embeddings, ``i + 1`` for block ``i``, ``depth + 1`` for the rest of
    the backbone and for heads; patch-embedding parameters are further scaled by
    ``patch_embed_lr_mult``. Weight decay is off for biases, norm layers and LayerScale gammas.
    ``is_last_layer`` marks every parameter of a head's ``last_layer`` (frozen early in training).
    """
    fused: dict[tuple[float, float, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for key, submodel in student.items():
        if isinstance(submodel, VisionTransformer):
            layer_ids, patch_embed_ids = _backbone_layer_ids(submodel)
            depth = len(submodel.blocks)
        elif key == "backbone":
            raise TypeError(f"student['backbone'] is a {type(submodel).__name__}, not a "
                            f"VisionTransformer; build parameter groups before wrapping it")
        else:  # a head: layer id depth + 1 with depth 0, i.e. lr multiplier 1
            layer_ids, patch_embed_ids, depth = {}, set(), 0
        last_layer = getattr(submodel, "last_layer", None)
        last_layer_ids = {id(p) for p in last_layer.parameters()} if isinstance(last_layer, nn.Module) else set()

        for module_name, module in submodel.named_modules():
            for local_name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                layer_id = layer_ids.get(id(param), depth + 1)
                lr_multiplier = layerwise_decay ** (depth + 1 - layer_id)
                if id(param) in patch_embed_ids:
                    lr_multiplier *= patch_embed_lr_mult
                group_key = (lr_multiplier, _wd_multiplier(module, local_name), id(param) in last_layer_ids)
                group = fused.setdefault(group_key, {"params": [], **dict(zip(FUSE_KEYS, group_key)), "names": []})
                group["params"].append(param)
                group["names"].append(".".join(filter(None, (key, module_name, local_name))))
    return list(fused.values())


def build_optimizer(param_groups: Iterable[dict[str, Any]], *, betas: tuple[float, float] = (0.9, 0.999),
                    implementation: str = "auto", device: torch.device = torch.device("cpu")) -> torch.optim.AdamW:
    """AdamW over ``param_groups``. lr and weight decay start at 0 (so a step taken before
    :func:`apply_optim_schedule` changes nothing) and are set every iteration by the schedules.

    ``implementation``: torch's kernels for the update. ``auto`` is ``fused`` on CUDA and ``foreach``
    (multi-tensor) elsewhere; ``for_loop`` is the single-tensor loop (the official code's, with torch's default
    on CPU). On CPU ``foreach`` and ``for_loop`` give bitwise the same parameters."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"unknown AdamW implementation {implementation!r}; choose one of "
                         f"{', '.join(ADAMW_IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    kernels = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(list(param_groups), lr=0.0, weight_decay=0.0, betas=tuple(betas), **kernels)


def _backbone_share(group: Mapping[str, Any]) -> float:
    """The fraction of the group's parameters that are the backbone's (by their names ``backbone.*``)."""
    return sum(name.startswith("backbone.") for name in group["names"]) / max(len(group["names"]), 1)


def separate_backbone_groups(optimizer: torch.optim.Optimizer) -> None:
    """Split, in place, every group that holds backbone and head parameters (by default groups are fused by their
    multipliers only: the backbone's final norm shares one with the heads' biases) into its backbone part and the
    rest, with the same settings, so that :func:`apply_optim_schedule` can scale the backbone's learning rate
    alone. The AdamW state (per parameter) is kept; call it before a checkpoint is loaded into the optimizer, as
    the checkpoint's groups are split too."""
    groups = []
    for group in optimizer.param_groups:
        parts: dict[bool, dict[str, Any]] = {}
        for param, name in zip(group["params"], group["names"]):
            part = parts.setdefault(name.startswith("backbone."), {**group, "params": [], "names": []})
            part["params"].append(param)
            part["names"].append(name)
        groups += [parts[key] for key in (True, False) if key in parts]
    optimizer.param_groups[:] = groups


def apply_optim_schedule(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float,
                         last_layer_lr: float, backbone_lr_scale: float = 1.0) -> None:
    """Set every group's lr and weight decay for this iteration from the scheduled values; the backbone's groups
    get ``backbone_lr_scale`` times their lr (a feature's ramp: :data:`BACKBONE_LR_SCALE`), which needs groups
    that do not mix backbone and head parameters (:func:`separate_backbone_groups`)."""
    for group in optimizer.param_groups:
        scale = 1.0
        if backbone_lr_scale != 1.0:
            share = _backbone_share(group)
            if 0 < share < 1:
                raise ValueError(f"a backbone lr scale of {backbone_lr_scale} needs groups without a mix of backbone "
                                 f"and head parameters: call separate_backbone_groups(optimizer) once, first")
            scale = backbone_lr_scale if share == 1 else 1.0
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"] * scale


def clip_grad_norms_on_device(student: nn.ModuleDict | Mapping[str, nn.Module], max_norm: float) -> dict[str, Tensor]:
    """Clip each sub-model's gradients separately to ``max_norm`` (as the official trainer does) and return their
    pre-clip norms by sub-model name, as 0-d tensors on the parameters' device (the norm over all ranks under
    FSDP2): nothing in it waits for the device. ``max_norm <= 0`` only measures."""
    norms: dict[str, Tensor] = {}
    for key, submodel in student.items():
        params = [p for p in submodel.parameters() if p.grad is not None]
        if max_norm > 0:  # foreach: multi-tensor norms and scaling (the same values as the per-tensor loop)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        norms[key] = norm
    return norms


# --- schedules -------------------------------------------------------------------------------


class IterationSchedule:
    """A value per training iteration, backed by an fvcore scheduler over ``where = it / total``.

    ``schedule(it)`` for ``0 <= it < total_iters``; ``final_value`` from ``total_iters`` on (as the
    official ``CosineScheduler``).
    """

    def __init__(self, scheduler: ParamScheduler | None, total_iters: int, final_value: float) -> None:
        if total_iters < 0:
            raise ValueError(f"total_iters must be >= 0, got {total_iters}")
        if total_iters > 0 and scheduler is None:
            raise ValueError("a schedule with iterations needs a scheduler")
        self.scheduler = scheduler
        self.total_iters = total_iters
        self.final_value = float(final_value)

    def __call__(self, it: int) -> float:
        if it < 0:
            raise ValueError(f"iteration must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        return float(self.scheduler(it / self.total_iters))


def _composite(pieces: list[tuple[ParamScheduler, int, str]], total_iters: int) -> ParamScheduler:
    """Pieces ``(scheduler, n_iters, interval_scaling)`` run one after another over ``total_iters``."""
    pieces = [piece for piece in pieces if piece[1] > 0]
    if len(pieces) == 1 and pieces[0][2] == "rescaled":
        return pieces[0][0]
    scheduler = CompositeParamScheduler(
        schedulers=[s for s, _, _ in pieces],
        lengths=[n / total_iters for _, n, _ in pieces],
        interval_scaling=[scaling for _, _, scaling in pieces],
    )
    # fvcore switches piece when where + WHERE_EPSILON passes a boundary; its default (1e-6) would
    # switch an iteration early beyond 1e6 iterations. Half an iteration makes the switch exact.
    scheduler.WHERE_EPSILON = 0.5 / total_iters
    return scheduler


def cosine_schedule(base_value: float, final_value: float, total_iters: int, *, warmup_iters: int = 0,
                    start_warmup_value: float = 0.0, freeze_iters: int = 0) -> IterationSchedule:
    """The official ``CosineScheduler``: ``freeze_iters`` zeros, then
    ``np.linspace(start_warmup_value, base_value, warmup_iters)`` (endpoint included), then
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` for the remaining ``n`` iterations."""
    cosine_iters = total_iters - warmup_iters - freeze_iters
    if min(warmup_iters, freeze_iters, cosine_iters) < 0:
        raise ValueError(f"need 0 <= freeze_iters + warmup_iters <= total_iters; got {freeze_iters=}, "
                         f"{warmup_iters=}, {total_iters=}")
    if total_iters == 0:
        return IterationSchedule(None, 0, final_value)
    if warmup_iters == 1:
        warmup: ParamScheduler = ConstantParamScheduler(start_warmup_value)  # linspace(a, b, 1) == [a]
    else:
        # Sampled at where = i / W, this line gives linspace's a + (b - a) * i / (W - 1).
        step = (base_value - start_warmup_value) / max(warmup_iters - 1, 1)
        warmup = LinearParamScheduler(start_warmup_value, start_warmup_value + step * warmup_iters)
    pieces = [
        (ConstantParamScheduler(0.0), freeze_iters, "rescaled"),
        (warmup, warmup_iters, "rescaled"),
        (CosineParamScheduler(base_value, final_value), cosine_iters, "rescaled"),
    ]
    return IterationSchedule(_composite(pieces, total_iters), total_iters, final_value)


def zero_first_iterations(schedule: IterationSchedule, iters: int) -> IterationSchedule:
    """``schedule`` with its first ``iters`` values replaced by 0 (not shifted), as the official
    last-layer lr schedule overwrites the start of the lr schedule."""
    total = schedule.total_iters
    iters = min(max(iters, 0), total)
    if iters == 0:
        return schedule
    # "fixed" hands the global where to the original schedule, so it continues unshifted.
    pieces = [(ConstantParamScheduler(0.0), iters, "rescaled"), (schedule.scheduler, total - iters, "fixed")]
    return IterationSchedule(_composite(pieces, total), total, schedule.final_value)


class Schedules:
    """Every per-iteration hyper-parameter of a run, from ``cfg.optim``, ``cfg.teacher`` and
    ``cfg.train.epoch_length`` (official ``build_schedulers``). ``cfg.optim.lr`` must already be
    scaled for the total batch (``dinoreg.config.apply_scaling_rule``)."""

    def __init__(self, cfg: Any) -> None:
        epoch_length = int(cfg.train.epoch_length)
        optim, teacher = cfg.optim, cfg.teacher
        if not optim.lr > 0:
            raise ValueError(f"optim.lr must be > 0 (derive it with apply_scaling_rule), got {optim.lr}")
        self.total_iterations = total = int(optim.epochs) * epoch_length
        self.lr = cosine_schedule(optim.lr, optim.min_lr, total, warmup_iters=int(optim.warmup_epochs) * epoch_length,
                                  start_warmup_value=0.0)
        self.weight_decay = cosine_schedule(optim.weight_decay, optim.weight_decay_end, total)
        self.momentum = cosine_schedule(teacher.momentum_teacher, teacher.final_momentum_teacher, total)
        temp_warmup = int(teacher.warmup_teacher_temp_epochs) * epoch_length
        self.teacher_temp = cosine_schedule(teacher.teacher_temp, teacher.teacher_temp, temp_warmup,
                                            warmup_iters=temp_warmup, start_warmup_value=teacher.warmup_teacher_temp)
        self.last_layer_lr = zero_first_iterations(self.lr, int(optim.freeze_last_layer_epochs) * epoch_length)

    def values(self, it: int) -> dict[str, float]:
        """The schedules at iteration ``it`` (the keys are :data:`SCHEDULE_NAMES`; the training features add
        their own: :meth:`~dinoreg.ssl.feature.TrainingFeature.values`)."""
        return {
            "lr": self.lr(it),
            "weight_decay": self.weight_decay(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
            "last_layer_lr": self.last_layer_lr(it),
        }
