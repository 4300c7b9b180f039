"""What the training loop builds from the config: the model and its optimizer, the batches, the on-device
augmentation, the precision. The config is read here, at set-up; the pieces built receive plain arguments.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinoreg.config import build_backbone_from_config
from dinoreg.data import MultiCropDataset, MultiCropGeometric, Photometric, build_loader, collate_multicrop
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models import DinoVisionTransformer
from dinoreg.models.head import head_spec_of
from dinoreg.models.initialisation import InitStep
from dinoreg.ssl.gram import GramSpec
from dinoreg.ssl.masking import MaskingGenerator, sample_masks
from dinoreg.ssl.meta_arch import HeadSpec, LossWeights, SSLMetaArch
from dinoreg.train.optim import build_optimizer, build_param_groups
from dinoreg.train.parallel import TargetedStep, copy_state_into, materialise, shard_ssl_model
from dinoreg.train.start import (carry_optimizer_state, check_heads, copy_start, fitted_backbone, phase_checkpoint,
                                 phase_tensors, read_weights, start_tensors)

__all__ = ["BatchMasks", "build_model_and_optimizer", "build_photometric", "build_ssl_model", "initialisation_steps",
           "precision", "seed_everything", "training_batches"]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def precision(cfg: DictConfig, device: torch.device, *, distributed: bool) -> tuple[bool, Any]:
    """``(bf16, autocast)``. Master weights, optimizer state and losses stay fp32; only the forward computes in
    bf16 (under FSDP the mixed-precision policy does this, so the autocast is then a no-op)."""
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not distributed \
        else contextlib.nullcontext()
    return bf16, autocast


def _head_spec(section: Any) -> HeadSpec:
    return HeadSpec(n_prototypes=section.head_n_prototypes, hidden_dim=section.head_hidden_dim,
                    bottleneck_dim=section.head_bottleneck_dim, nlayers=section.head_nlayers)


def build_ssl_model(cfg: DictConfig, *, load_pretrained: bool = True) -> SSLMetaArch:
    """Student and teacher of ``cfg``. ``load_pretrained``: start from ``student.pretrained_weights`` or
    ``train.init_from`` (:mod:`dinoreg.train.start`; off when a checkpoint will be loaded: it holds every weight).
    Under ``torch.device("meta")`` nothing is initialised or loaded: see :func:`initialisation_steps`."""
    model, frozen_tensors = _build(cfg, read_gram_ckpt=load_pretrained)
    if not model.student["backbone"].cls_token.is_meta:
        if model.distillation_teacher is not None:  # on the meta device: its values come from its file, never a draw
            model.distillation_teacher.to_empty(device="cpu")
        for name, tensors in frozen_tensors.items():
            copy_state_into(getattr(model, name), tensors)
        if load_pretrained:
            copy_start(model, start_tensors(cfg, model))
            if cfg.phase.start_from:
                copy_state_into(model, phase_tensors(cfg, model))
    return model


def _build(cfg: DictConfig, *, read_gram_ckpt: bool = True) -> tuple[SSLMetaArch, dict[str, dict[str, Tensor]]]:
    """The model, uninitialised where a device context says so, and the tensors its frozen models (the
    distillation teacher, a Gram teacher from ``gram.ckpt`` unless ``read_gram_ckpt`` is off: a resume takes it
    from its checkpoint) read from files, by the model's attribute name."""
    student = build_backbone_from_config(cfg, stochastic_depth=True)
    teacher = build_backbone_from_config(cfg, stochastic_depth=False)
    frozen, frozen_tensors = distillation_teacher(cfg) if cfg.distillation.enabled else (None, {})
    frozen_tensors = {"distillation_teacher": frozen_tensors} if frozen is not None else {}
    gram, gram_backbone = gram_spec(cfg), None
    if gram is not None and not gram.ema_teacher:
        with torch.random.fork_rng(devices=[]):  # a copy of the teacher: its own draws must not shift the heads'
            gram_backbone = build_backbone_from_config(cfg, stochastic_depth=False)
        if cfg.gram.ckpt and read_gram_ckpt:
            weights = read_weights(cfg.gram.ckpt, key="gram.ckpt")
            frozen_tensors["gram_teacher"] = {f"backbone.{k}": v for k, v in fitted_backbone(
                gram_backbone, weights.backbone, key="gram.ckpt").items()}
    model = SSLMetaArch(student, teacher, dino_head=_head_spec(cfg.dino),
                        ibot_head=_head_spec(cfg.ibot) if cfg.ibot.separate_head else None,
                        loss_weights=LossWeights(dino=cfg.dino.loss_weight, koleo=cfg.dino.koleo_loss_weight,
                                                 ibot=cfg.ibot.loss_weight),
                        centering=cfg.train.centering, pack_crops=cfg.train.pack_crops,
                        chunk_elements=cfg.train.loss_chunk_elements, distillation_teacher=frozen,
                        mask_student=cfg.distillation.mask_student, gram=gram, gram_teacher_backbone=gram_backbone)
    return model, frozen_tensors


def gram_spec(cfg: DictConfig) -> GramSpec | None:
    """``cfg.gram`` as the model's :class:`~dinoreg.ssl.gram.GramSpec` (None without Gram anchoring)."""
    gram = cfg.gram
    if not gram.use_loss:
        return None
    return GramSpec(normalized=gram.normalized, img_level=gram.img_level, remove_neg=gram.remove_neg,
                    remove_only_teacher_neg=gram.remove_only_teacher_neg, tokens_used=gram.tokens_used,
                    resize_method=gram.global_teacher_resize_method, resize_antialias=gram.global_teacher_resize_antialias,
                    ema_teacher=gram.ema_teacher, compute_stats=gram.compute_stats)


def distillation_teacher(cfg: DictConfig) -> tuple[nn.ModuleDict, dict[str, Tensor]]:
    """The frozen teacher of ``distillation.teacher`` on the meta device (its architecture and head sizes from the
    file; built for the global crop size, ``pos_embed`` resampled once) and its tensors, checked to fit it."""
    weights = read_weights(cfg.distillation.teacher, key="distillation.teacher")
    arch = {**weights.arch, "img_size": cfg.crops.global_crops_size, "attn_backend": cfg.student.attention_backend,
            "attn_backend_required": cfg.student.attention_backend_required}
    with torch.device("meta"):
        backbone = DinoVisionTransformer(**arch)
        heads = {name: HeadSpec(**{k: v for k, v in spec.items() if k != "in_dim"}).build(backbone.embed_dim)
                 for name, spec in ((name, head_spec_of(head)) for name, head in weights.heads.items())}
    check_heads(weights, heads, key="distillation.teacher")
    tensors = {f"backbone.{k}": v for k, v in fitted_backbone(backbone, weights.backbone, key="distillation.teacher").items()}
    tensors.update({f"{name}.{k}": v for name, head in weights.heads.items() for k, v in head.items()})
    return nn.ModuleDict({"backbone": backbone, **heads}), tensors


def initialisation_steps(model: SSLMetaArch) -> list[TargetedStep]:
    """What :func:`build_ssl_model` sets and draws, in its order, as steps for
    :func:`dinoreg.train.parallel.materialise`: the student backbone (its values also go to the teacher, which
    starts as its copy), the teacher backbone (drawn, then overwritten by that copy), the heads (student and
    teacher), the losses' centres. A Gram teacher starts as the teacher's copy too (its own draws, forked off the
    generator, leave no trace). ``model``: an unsharded template on the meta device."""
    names = {id(module): name for name, module in model.named_modules()}
    copies_to = ("teacher", "gram_teacher") if model.gram_teacher is not None else ("teacher",)

    def targeted(steps: list[InitStep], *, copies: bool) -> list[TargetedStep]:
        out = []
        for module, initialise in steps:
            name = names[id(module)]
            rest = name[len("student"):]
            twins = [twin + rest for twin in copies_to if twin + rest in names.values()] if copies else []
            out.append((module, initialise, (name, *twins) if copies else ()))
        return out

    heads = [head for name, head in model.student.items() if name != "backbone"]  # dino_head, then ibot_head
    return [*targeted(model.student["backbone"].initialisation_steps(), copies=True),
            *targeted(model.teacher["backbone"].initialisation_steps(), copies=False),
            *(step for head in heads for step in targeted(head.initialisation_steps(), copies=True)),
            *((loss, type(loss).reset_parameters, (names[id(loss)],)) for loss in (model.dino_loss, model.ibot_patch_loss))]


def loading_steps(modules: nn.Module, tensors: dict[str, Tensor], *, prefix: str) -> list[TargetedStep]:
    """Steps that set each module of ``modules`` (a meta-device template) from ``tensors`` (by its state keys), for
    :func:`dinoreg.train.parallel.materialise` (``prefix``: where ``modules`` sits in the model)."""
    def load(name: str) -> Callable[[nn.Module], None]:
        def initialise(module: nn.Module) -> None:
            for own, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                value.copy_(tensors[f"{name}.{own}" if name else own])
        return initialise
    return [(module, load(name), (f"{prefix}.{name}" if name else prefix,)) for name, module in modules.named_modules()
            if next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]), None) is not None]


def _build_sharded(cfg: DictConfig, env: DistributedEnvironment, device: torch.device, *, bf16: bool,
                   load_pretrained: bool) -> SSLMetaArch:
    """Built on the meta device, sharded there, then materialised shard by shard with the values a one-process
    build has (:func:`initialisation_steps`), so no rank ever holds the whole unsharded model."""
    with torch.device("meta"):
        model, frozen_tensors = _build(cfg, read_gram_ckpt=load_pretrained)
    template = copy.deepcopy(model)  # stays unsharded
    start = start_tensors(cfg, template) if load_pretrained else {}  # a misfit fails before any work
    phase = phase_tensors(cfg, template) if load_pretrained and cfg.phase.start_from else {}
    steps = initialisation_steps(template)
    for name, tensors in frozen_tensors.items():  # after the copies of the student: these values win
        steps += loading_steps(getattr(template, name), tensors, prefix=name)
    _prepare_for_training(cfg, model, device)
    shard_ssl_model(model, mode=cfg.train.sharding, device=device, world_size=env.world_size, bf16=bf16)
    model.to_empty(device=device)
    materialise(model, steps, device=device if cfg.train.initialisation == "device" else "cpu")
    copy_start(model, start)
    copy_state_into(model, phase)
    return model.train()


def _prepare_for_training(cfg: DictConfig, model: SSLMetaArch, device: torch.device) -> None:
    model.student["backbone"].set_checkpointing(cfg.train.activation_checkpointing)  # the teacher has no backward
    if cfg.train.compile == "blocks" or (cfg.train.compile == "auto" and device.type == "cuda"):
        model.student["backbone"].compile_blocks()
        model.teacher["backbone"].compile_blocks()
        if model.gram_teacher is not None:  # it runs every step, at its own (often larger) crop size
            model.gram_teacher["backbone"].compile_blocks()


def build_model_and_optimizer(cfg: DictConfig, env: DistributedEnvironment, device: torch.device, *,
                              bf16: bool = False, load_pretrained: bool = True
                              ) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    """The model on ``device`` in training mode (FSDP2-sharded when ``env`` runs under a process group, then started
    on the meta device: see :func:`_build_sharded`; first drawn on the CPU, or on ``device`` with
    ``train.initialisation=device``) and its AdamW over the student's parameter groups. A phase's
    ``phase.start_from`` run is resolved here, once, to the checkpoint it starts from (then saved in config.yaml)."""
    if load_pretrained and cfg.phase.start_from:
        cfg.phase.start_from = str(phase_checkpoint(cfg))
    if env.distributed:  # shard before building the optimizer: it must hold the sharded parameters
        model = _build_sharded(cfg, env, device, bf16=bf16, load_pretrained=load_pretrained)
    else:
        with torch.device(device) if cfg.train.initialisation == "device" else contextlib.nullcontext():
            model = build_ssl_model(cfg, load_pretrained=load_pretrained)
        model = model.to(device).train()
        _prepare_for_training(cfg, model, device)
    optimizer = build_optimizer(build_param_groups(model.student, layerwise_decay=cfg.optim.layerwise_decay,
                                                   patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult),
                                betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                                implementation=cfg.optim.adamw_implementation, device=device)
    if load_pretrained and cfg.phase.start_from and cfg.phase.optimizer == "carry":
        carry_optimizer_state(cfg, model, optimizer)
    return model, optimizer


class BatchMasks:
    """iBOT masks for one batch, drawn in the collate (worker) from an RNG seeded by the batch's first
    stream position, so a resumed run draws the same masks whatever the number of workers."""

    def __init__(self, cfg: DictConfig) -> None:
        side = cfg.crops.global_crops_size // cfg.student.patch_size
        self.grid = (side, side)
        self.generator = MaskingGenerator(self.grid, max_num_patches=0.5 * side * side)
        self.ratio = tuple(cfg.ibot.mask_ratio_min_max)
        self.probability = cfg.ibot.mask_sample_probability
        self.seed = cfg.train.seed

    def __call__(self, n_images: int, seed_position: int) -> dict[str, Any]:
        rng = random.Random(f"masks-{self.seed}-{seed_position}")
        return sample_masks(n_images, self.grid, self.ratio, self.probability, rng=rng, generator=self.generator)


def training_batches(cfg: DictConfig, dataset: Any, env: DistributedEnvironment, *,
                     start: int, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """This rank's multi-crop batches (uint8, with iBOT masks) from global stream position ``start``
    (``iterations * global batch``); ``pin_memory`` (for a CUDA device) lets the copies to it overlap."""
    crops = cfg.crops
    gram_size, undistorted = gram_crops(cfg)
    # a Gram teacher's distorted crops at a larger size: the workers cut the global crops at that size, the device
    # distorts them there and resizes them down for the student (augment_on_device)
    global_size = gram_size if gram_size and not undistorted else crops.global_crops_size
    geometric = MultiCropGeometric(global_size, crops.local_crops_size, crops.local_crops_number,
                                   global_crops_scale=tuple(crops.global_crops_scale),
                                   local_crops_scale=tuple(crops.local_crops_scale),
                                   gram_crops_size=gram_size if undistorted else None)
    loader = build_loader(MultiCropDataset(dataset, geometric, seed=cfg.train.seed),
                          batch_size=cfg.train.batch_size_per_gpu, num_workers=cfg.train.num_workers,
                          seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, start=start,
                          collate_fn=functools.partial(collate_multicrop, mask_fn=BatchMasks(cfg)),
                          pin_memory=pin_memory)
    return iter(loader)


def gram_crops(cfg: DictConfig) -> tuple[int | None, bool]:
    """``(size, undistorted)`` of a Gram teacher's own crops, as DINOv3 makes them: the same boxes and flips as the
    global crops, at ``crops.gram_teacher_crops_size``, without distortions (``crops.gram_teacher_no_distortions``)
    or with the global crops' own, applied at that size before the student's crops are resized down. Size None:
    the Gram teacher sees the student's global crops (no Gram teacher of its own, or no size and distortions)."""
    gram, crops = cfg.gram, cfg.crops
    if not gram.use_loss or gram.ema_teacher:
        return None, False
    if crops.gram_teacher_no_distortions:
        return crops.gram_teacher_crops_size or crops.global_crops_size, True
    return crops.gram_teacher_crops_size, False


def build_photometric(cfg: DictConfig, device: torch.device) -> Photometric:
    """Colour jitter, blur, solarisation and normalisation, applied to whole batches on ``device``."""
    crops = cfg.crops
    return Photometric(crops.blur_prob_global1, crops.blur_prob_global2, crops.blur_prob_local,
                       crops.solarization_prob_global2, color_jitter=tuple(crops.color_jitter)).to(device)
