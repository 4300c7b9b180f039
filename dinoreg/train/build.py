"""What the training loop builds from the config: the model and its optimizer, the batches, the on-device
augmentation, the precision. The config is read here, at set-up; the pieces built receive plain arguments.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dinoreg.config import build_backbone_from_config
from dinoreg.data import MultiCropDataset, MultiCropGeometric, Photometric, build_loader, collate_multicrop
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.initialisation import InitStep
from dinoreg.ssl.feature import TrainingFeature
from dinoreg.ssl.masking import MaskingGenerator, sample_masks
from dinoreg.ssl.meta_arch import HeadSpec, LossWeights, SSLMetaArch
from dinoreg.train.checkpoint_reader import CheckpointReader, open_checkpoint
from dinoreg.train.features import build_features
from dinoreg.train.optim import build_optimizer, build_param_groups
from dinoreg.train.parallel import TargetedStep, copy_state_into, materialise, shard_ssl_model
from dinoreg.train.initial_weights import carry_optimizer_state, copy_initial, initial_tensors, phase_tensors

__all__ = ["BatchMasks", "build_model_and_optimizer", "build_photometric", "build_ssl_model", "construct_ssl_model",
           "initialisation_steps",
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
                    bottleneck_dim=section.head_bottleneck_dim, nlayers=section.head_nlayers,
                    weight_norm=section.head_weight_norm)


def build_ssl_model(cfg: DictConfig, *, load_pretrained: bool = True) -> SSLMetaArch:
    """Student and teacher of ``cfg`` on the CPU, unsharded, with the training features it turns on
    (:mod:`dinoreg.train.features`): built on the meta device and given its values by :func:`_build_on_meta`, as
    every training run's model is. ``load_pretrained``: start from ``student.pretrained_weights``, ``train.init_from``
    or ``phase.start_from`` (:mod:`dinoreg.train.initial_weights`; off when a checkpoint will be loaded: it holds every
    weight). Under ``torch.device("meta")``: the uninitialised model (:func:`construct_ssl_model`), nothing drawn;
    the features' frozen models read their files."""
    if torch.get_default_device().type == "meta":
        return construct_ssl_model(cfg)
    return _build_on_meta(cfg, torch.device("cpu"), load_pretrained=load_pretrained, initialise_on="cpu",
                          phase=_phase_source(cfg) if load_pretrained else None)


def _phase_source(cfg: DictConfig) -> Optional[CheckpointReader]:
    """The checkpoint ``phase.start_from`` names, opened (verified) once for the model state and the moments."""
    return open_checkpoint(cfg.phase.start_from, key="phase.start_from") if cfg.phase.start_from else None


def construct_ssl_model(cfg: DictConfig) -> SSLMetaArch:
    """The model as its constructors make it: each draws its initial values in construction order, unless a
    ``torch.device("meta")`` context defers them, for :func:`initialisation_steps` to replay. Training never uses
    these draws (it always starts on the meta device); they are the reference the replay must equal
    (``tests/train/test_meta_start.py``). The features' frozen models read from files get those values in
    :func:`_build_on_meta`."""
    student = build_backbone_from_config(cfg, stochastic_depth=True)
    teacher = build_backbone_from_config(cfg, stochastic_depth=False)
    features = build_features(cfg)
    return SSLMetaArch(student, teacher, dino_head=_head_spec(cfg.dino),
                       ibot_head=_head_spec(cfg.ibot) if cfg.ibot.separate_head else None,
                       loss_weights=LossWeights(dino=cfg.dino.loss_weight, koleo=cfg.dino.koleo_loss_weight,
                                                ibot=cfg.ibot.loss_weight),
                       centering=cfg.train.centering, pack_crops=cfg.train.pack_crops,
                       chunk_elements=cfg.train.loss_chunk_elements, features=features)


def initialisation_steps(model: SSLMetaArch) -> list[TargetedStep]:
    """What :func:`construct_ssl_model` sets and draws, in its order, as steps for
    :func:`dinoreg.train.parallel.materialise`: the student backbone (its values also go to the teacher, which
    starts as its copy), the teacher backbone (drawn, then overwritten by that copy), the heads (student and
    teacher), the losses' centres. A feature's frozen model of ``teacher_copies``
    starts as the teacher's copy too (its own draws, forked off the generator, leave no trace). ``model``: an
    unsharded template on the meta device."""
    names = {id(module): name for name, module in model.named_modules()}
    copies_to = ("teacher", *model.teacher_copies)

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


def _build_on_meta(cfg: DictConfig, device: torch.device, *, load_pretrained: bool, initialise_on: torch.device | str,
                   phase: Optional[CheckpointReader], arrange: Callable[[SSLMetaArch], None] = lambda model: None
                   ) -> SSLMetaArch:
    """The one build: the model on the meta device, ``arrange``d there (compiled, FSDP2-sharded: no rank ever holds
    the whole unsharded model), put on ``device`` and materialised module by module on ``initialise_on`` with the
    constructors' values (:func:`initialisation_steps`), then the values read from files (the features' frozen
    models, the start: :mod:`dinoreg.train.initial_weights`; ``phase``: the checkpoint a phase continues)."""
    with torch.device("meta"):
        model = construct_ssl_model(cfg)
    # taken over before the template is copied: a teacher's tensors read from its file are held once, until set
    from_files = [(name, tensors) for feature in model.features for name, tensors in feature.frozen_tensors().items()]
    template = copy.deepcopy(model)  # stays unsharded
    start = initial_tensors(cfg, template) if load_pretrained else {}  # a misfit fails before any work
    phase_state = phase_tensors(phase, template) if phase is not None else {}
    steps = initialisation_steps(template)
    for name, tensors in from_files:  # after the copies of the student: these values win
        steps += loading_steps(getattr(template, name), tensors, prefix=name)
    arrange(model)
    model.to_empty(device=device)
    materialise(model, steps, device=initialise_on)
    copy_initial(model, start)
    copy_state_into(model, phase_state)
    return model


def _prepare_for_training(cfg: DictConfig, model: SSLMetaArch, device: torch.device) -> None:
    model.student["backbone"].set_checkpointing(cfg.train.activation_checkpointing)  # the teacher has no backward
    if cfg.train.compile == "blocks" or (cfg.train.compile == "auto" and device.type == "cuda"):
        model.student["backbone"].compile_blocks()
        model.teacher["backbone"].compile_blocks()
        for name in (name for feature in model.features for name in feature.compiled):  # they run every step
            getattr(model, name)["backbone"].compile_blocks()


def build_model_and_optimizer(cfg: DictConfig, env: DistributedEnvironment, device: torch.device, *,
                              bf16: bool = False, load_pretrained: bool = True,
                              phase_source: Optional[CheckpointReader] = None
                              ) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    """The model on ``device`` in training mode, started on the meta device (:func:`_build_on_meta`; FSDP2-sharded
    there when ``env`` runs under a process group; its values drawn on the CPU, or on ``device`` with
    ``train.initialisation=device``), and its AdamW over the student's parameter groups. ``phase_source``: the
    checkpoint ``phase.start_from`` names, already opened (:func:`~dinoreg.train.resolve.resolve_run_config`);
    None: opened here."""
    def arrange(model: SSLMetaArch) -> None:
        _prepare_for_training(cfg, model, device)
        if env.distributed:  # before the optimizer is built: it must hold the sharded parameters
            shard_ssl_model(model, mode=cfg.train.sharding, device=device, world_size=env.world_size, bf16=bf16)

    phase = (phase_source or _phase_source(cfg)) if load_pretrained else None
    model = _build_on_meta(cfg, device, load_pretrained=load_pretrained, arrange=arrange, phase=phase,
                           initialise_on=device if cfg.train.initialisation == "device" else "cpu").train()
    optimizer = build_optimizer(build_param_groups(model.student, layerwise_decay=cfg.optim.layerwise_decay,
                                                   patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult),
                                betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                                implementation=cfg.optim.adamw_implementation, device=device)
    if phase is not None and cfg.phase.optimizer == "carry":
        carry_optimizer_state(phase, model, optimizer)
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


def training_batches(cfg: DictConfig, dataset: Any, env: DistributedEnvironment, *, position: int,
                     features: Sequence[TrainingFeature] = (), pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """This rank's multi-crop batches (uint8, with iBOT masks) from global stream position ``position``
    (``iterations * global batch``), cut at the sizes the ``features`` ask for
    (:meth:`~dinoreg.ssl.feature.TrainingFeature.worker_crops`); ``pin_memory`` (for a CUDA device) lets the copies
    to it overlap."""
    loader = build_loader(MultiCropDataset(dataset, multicrop_geometric(cfg, features), seed=cfg.train.seed),
                          batch_size=cfg.train.batch_size_per_gpu, num_workers=cfg.train.num_workers,
                          seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, start=position,
                          order=cfg.train.sampler_order,
                          collate_fn=functools.partial(collate_multicrop, mask_fn=BatchMasks(cfg)),
                          pin_memory=pin_memory)
    return iter(loader)


def multicrop_geometric(cfg: DictConfig, features: Sequence[TrainingFeature] = ()) -> MultiCropGeometric:
    """The workers' geometric multi-crop of ``cfg``, at the sizes the ``features`` ask for
    (:meth:`~dinoreg.ssl.feature.TrainingFeature.worker_crops`)."""
    crops = cfg.crops
    global_size, extra = crops.global_crops_size, None
    for feature in features:
        global_size, asked = feature.worker_crops(global_size)
        extra = asked or extra
    return MultiCropGeometric(global_size, crops.local_crops_size, crops.local_crops_number,
                              global_crops_scale=tuple(crops.global_crops_scale),
                              local_crops_scale=tuple(crops.local_crops_scale), undistorted_crops_size=extra)


def build_photometric(cfg: DictConfig, device: torch.device) -> Photometric:
    """Colour jitter, blur, solarisation and normalisation, applied to whole batches on ``device``."""
    crops = cfg.crops
    return Photometric(crops.blur_prob_global1, crops.blur_prob_global2, crops.blur_prob_local,
                       crops.solarization_prob_global2, color_jitter=tuple(crops.color_jitter)).to(device)
