"""``train(cfg)``: build -> resume -> iterate -> log -> evaluate -> checkpoint.

One process (CPU or one GPU), or several under torchrun / srun with FSDP2-sharded student and teacher.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from dinoreg.config import apply_scaling_rule, save_config
from dinoreg.data import (MultiCropDataset, MultiCropGeometric, Photometric, SyntheticShapes, build_dataset,
                          build_eval_loader, build_loader, collate_multicrop)
from dinoreg.eval.knn import extract_features, knn_accuracy
from dinoreg.models import build_backbone
from dinoreg.models.weights import save_backbone
from dinoreg.ssl.masking import MaskingGenerator, sample_masks
from dinoreg.ssl.meta_arch import SSLMetaArch, backbone_kwargs
from dinoreg.train.checkpoint import (CHECKPOINT_DIR, CheckpointError,
                                      config_differences, load_checkpoint, newest_intact_checkpoint, read_meta,
                                      remove_incomplete, save_checkpoint)
from dinoreg.train.distributed import (DistributedEnvironment, all_reduce_mean, barrier, broadcast_flag,
                                       detect_environment, init_distributed, shutdown_distributed)
from dinoreg.train.logging import TrainingLogger
from dinoreg.train.optim import Schedules, apply_optim_schedule, build_optimizer, build_param_groups, clip_grad_norms
from dinoreg.train.monitor import ArtifactMonitor
from dinoreg.train.parallel import shard_ssl_model
from dinoreg.train.signals import EXIT_CODE_SAVED_ON_SIGNAL, SignalWatcher, StoppedOnSignal

BACKBONE_FILE = "teacher_backbone.safetensors"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; training stops before that state is saved anywhere."""


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


def _device_and_autocast(cfg: DictConfig, env: DistributedEnvironment) -> tuple[torch.device, bool, Any]:
    """``(device, bf16, autocast)``: one GPU per process (``cuda:<local rank>``) when there are GPUs."""
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    # Master weights, optimizer state and losses stay fp32; only the forward computes in bf16 (under FSDP
    # the mixed-precision policy does this, so no autocast there).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not env.distributed \
        else contextlib.nullcontext()
    return device, bf16, autocast


def _batches(cfg: DictConfig, dataset: Any, env: DistributedEnvironment, start: int) -> Iterator[dict[str, Any]]:
    """This rank's batches from global stream position ``start`` (``iterations * global batch``)."""
    geometric = MultiCropGeometric(cfg.crops.global_crops_size, cfg.crops.local_crops_size,
                                   cfg.crops.local_crops_number, global_crops_scale=tuple(cfg.crops.global_crops_scale),
                                   local_crops_scale=tuple(cfg.crops.local_crops_scale))
    masks = BatchMasks(cfg)
    loader = build_loader(MultiCropDataset(dataset, geometric, seed=cfg.train.seed),
                          batch_size=cfg.train.batch_size_per_gpu, num_workers=cfg.train.num_workers,
                          seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, start=start,
                          collate_fn=functools.partial(collate_multicrop, mask_fn=masks))
    return iter(loader)


def _synthetic_split(cfg: DictConfig, split: str, size: int) -> SyntheticShapes:
    """``size`` images of the synthetic ``split``, with the training dataset's options when it is synthetic."""
    spec = str(cfg.train.dataset_path)
    options = build_dataset(spec if spec.startswith("synthetic") else "synthetic", split=split)
    return SyntheticShapes(split, size=size, image_size=options.image_size, seed=options.seed,
                           objects=options.objects)


class KnnEvaluator:
    """kNN top-1 of a backbone's cls token on the synthetic dataset (bank: train split, queries: held out)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        ev = cfg.evaluation
        size, workers = cfg.crops.global_crops_size, min(cfg.train.num_workers, 2)
        self.bank = build_eval_loader(_synthetic_split(cfg, "train", ev.knn_train_images),
                                      image_size=size, resize_size=size, batch_size=256, num_workers=workers)
        self.queries = build_eval_loader(_synthetic_split(cfg, "val", ev.knn_eval_images),
                                         image_size=size, resize_size=size, batch_size=256, num_workers=workers)
        self.k, self.temperature, self.device = ev.knn_k, ev.knn_temperature, device

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, autocast: Any) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        with autocast:
            bank = extract_features(backbone, self.bank, self.device)
            queries = extract_features(backbone, self.queries, self.device)
        backbone.train(was_training)
        return knn_accuracy(*bank, *queries, k=self.k, temperature=self.temperature)


def _check_finite(iteration: int, metrics: dict[str, float]) -> None:
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if bad:
        terms = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise NonFiniteLossError(
            f"iteration {iteration}: non-finite loss ({terms}); stopping without saving this state. "
            "Lower optim.base_lr or raise optim.warmup_epochs, and check the data.")


def train_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
               values: dict[str, float], *, iteration: int, clip_grad: float,
               autocast: Any = contextlib.nullcontext()) -> tuple[dict[str, float], dict[str, float]]:
    """One optimisation step on this rank's augmented ``batch`` with the schedule ``values`` of ``iteration``.

    Returns the loss terms averaged over ranks and the pre-clip gradient norms per sub-model. Raises
    :class:`NonFiniteLossError` (on every rank alike) before any parameter changes when a term is not finite.
    """
    apply_optim_schedule(optimizer, lr=values["lr"], weight_decay=values["weight_decay"],
                         last_layer_lr=values["last_layer_lr"])
    with autocast:
        loss, metrics = model.forward_loss(batch, teacher_temp=values["teacher_temp"])
    metrics = all_reduce_mean(metrics)  # means over ranks: the same on every rank
    _check_finite(iteration, metrics)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norms = clip_grad_norms(model.student, clip_grad)
    optimizer.step()
    model.update_teacher(values["momentum"])
    return metrics, grad_norms


def prepare_output_dir(output_dir: str | Path, *, resume: bool, force: bool) -> None:
    """Refuse to start fresh over an existing run unless ``force`` (which deletes its checkpoints and logs,
    on the main process only: the others wait for it in the process-group rendezvous)."""
    output_dir = Path(output_dir)
    if resume or not output_dir.exists():
        return
    previous = [output_dir / name for name in (CHECKPOINT_DIR, "metrics.jsonl", "tensorboard", BACKBONE_FILE)]
    previous = [path for path in previous if path.exists()]
    if previous and not force:
        raise ValueError(f"--no-resume: {output_dir} already holds a run ({', '.join(p.name for p in previous)}); "
                         "pass --force to delete it and start fresh, or choose another --output-dir")
    if detect_environment().is_main:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def train(cfg: DictConfig, *, resume: bool = True, allow_config_change: bool = False) -> dict[str, float]:
    """Train ``cfg`` to the end, resuming from the newest checkpoint in ``train.output_dir`` when ``resume``.

    Works as one process, under torchrun and under srun (see :mod:`dinoreg.train.distributed`). Returns the
    last logged metrics (``knn_top1`` included); raises :class:`StoppedOnSignal` after a save on signal.
    """
    env = detect_environment()
    device, bf16, autocast = _device_and_autocast(cfg, env)
    init_distributed(env, device)
    try:
        return _train(cfg, env, device, bf16, autocast, resume=resume, allow_config_change=allow_config_change)
    finally:
        shutdown_distributed()


def _resume_point(cfg: DictConfig, output_dir: Path, world_size: int, allow_config_change: bool,
                  logger_warn: Any) -> Optional[Path]:
    """The checkpoint to resume from (None: start fresh), after checking that the config still fits it."""
    checkpoint = newest_intact_checkpoint(output_dir, warn=logger_warn)
    if checkpoint is None:
        return None
    saved = OmegaConf.load(checkpoint / "config.yaml")
    breaking, benign = config_differences(saved, cfg)
    # Another number of processes with the same global batch (per-device batch scaled) is a benign change.
    saved_global = saved.train.batch_size_per_gpu * read_meta(checkpoint)["world_size"]
    if saved_global == cfg.train.batch_size_per_gpu * world_size:
        moved = [line for line in breaking if line.startswith("train.batch_size_per_gpu:")]
        breaking, benign = [line for line in breaking if line not in moved], benign + moved
    if breaking and not allow_config_change:
        raise CheckpointError(
            f"the config differs from the one {checkpoint} was saved with, in keys that change the model or the "
            "data order:\n  " + "\n  ".join(breaking) +
            "\nResume with the saved values, or pass --allow-config-change to resume anyway.")
    for line in breaking + benign:
        logger_warn(f"config changed since {checkpoint.name}: {line}")
    return checkpoint


def _build_model_and_optimizer(cfg: DictConfig, env: DistributedEnvironment, device: torch.device, bf16: bool, *,
                               load_pretrained: bool) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    model = SSLMetaArch(cfg, load_pretrained=load_pretrained).to(device).train()
    if env.distributed:  # shard before building the optimizer: it must hold the sharded parameters
        shard_ssl_model(model, mode=cfg.train.sharding, device=device, world_size=env.world_size, bf16=bf16)
    optimizer = build_optimizer(build_param_groups(model.student, layerwise_decay=cfg.optim.layerwise_decay,
                                                   patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult),
                                betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    return model, optimizer


def _rank_printer(env: DistributedEnvironment, all_ranks: bool) -> Any:
    """print on rank 0; on the other ranks only with ``train.log_all_ranks``, prefixed by the rank."""
    def warn(message: str) -> None:
        if env.is_main:
            print(message, flush=True)
        elif all_ranks:
            print(f"[rank {env.rank}] {message}", flush=True)
    return warn


def _train(cfg: DictConfig, env: DistributedEnvironment, device: torch.device, bf16: bool, autocast: Any, *,
           resume: bool, allow_config_change: bool) -> dict[str, float]:
    output_dir = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    apply_scaling_rule(cfg, world_size=env.world_size)
    global_batch = cfg.train.batch_size_per_gpu * env.world_size
    schedules = Schedules(cfg)
    total = schedules.total_iterations
    dataset = build_dataset(cfg.train.dataset_path, split="train")  # a bad path fails here, before any model

    warn = _rank_printer(env, cfg.train.log_all_ranks)
    start, position = 0, 0
    checkpoint = _resume_point(cfg, output_dir, env.world_size, allow_config_change, warn) if resume else None
    # a resumed run takes every weight from its checkpoint: student.pretrained_weights need not exist any more
    model, optimizer = _build_model_and_optimizer(cfg, env, device, bf16, load_pretrained=checkpoint is None)
    if checkpoint is not None:
        meta = load_checkpoint(checkpoint, model=model, optimizer=optimizer)
        start, position = meta["iteration"], meta["stream_position"]
        if not meta["rng_restored"]:
            warn(f"{checkpoint.name} was saved by {meta['world_size']} processes and this run has {env.world_size}: "
                 "the augmentation RNG streams restart (the data order still continues exactly)")
        warn(f"resumed from {checkpoint} (iteration {start})")
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        remove_incomplete(output_dir)
    barrier()

    batches = _batches(cfg, dataset, env, start=position)
    photometric = Photometric(cfg.crops.blur_prob_global1, cfg.crops.blur_prob_global2, cfg.crops.blur_prob_local,
                              cfg.crops.solarization_prob_global2, color_jitter=tuple(cfg.crops.color_jitter)).to(device)
    evaluate = KnnEvaluator(cfg, device) if cfg.evaluation.knn_enabled else None
    monitor = ArtifactMonitor(cfg, device) if cfg.monitor.period else None
    logger = TrainingLogger(output_dir, total_iterations=total, start_iteration=start, enabled=env.is_main,
                            print_every=cfg.train.log_every)
    signals = SignalWatcher(cfg.checkpoint.save_on_signals)
    report = logger.warn if env.is_main else warn  # logger.warn keeps the progress bar intact

    def save(iterations_done: int) -> Path:
        model.dino_loss.apply_center_update()  # fold the deferred centre update into the saved state
        model.ibot_patch_loss.apply_center_update()
        return save_checkpoint(output_dir, iteration=iterations_done, model=model, optimizer=optimizer,
                               stream_position=position, cfg=cfg, keep_last=cfg.checkpoint.keep_last,
                               keep_every=cfg.checkpoint.keep_every)

    try:
        if evaluate and start == 0:
            logger.log(0, evaluate(model.teacher_backbone, autocast), step_done=False)
        if monitor and start == 0:
            logger.log(0, monitor(model.teacher_backbone, autocast), step_done=False)
        step_end, bad_files = time.perf_counter(), 0
        for it in range(start, total):
            values = schedules.values(it)
            batch = next(batches)
            position += global_batch
            # every (or all but one) image of a batch unreadable on some rank: all ranks skip it together
            while broadcast_flag(batch["batch_size"] < 2):
                bad_files += len(batch["bad_files"])
                report(f"iteration {it}: skipped a batch with unreadable images: {batch['bad_files']}")
                batch, position = next(batches), position + global_batch
            data_wait = time.perf_counter() - step_end
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            batch["global_crops"], batch["local_crops"] = photometric(batch["global_crops"], batch["local_crops"])

            metrics, grad_norms = train_step(model, optimizer, batch, values, iteration=it,
                                             clip_grad=cfg.optim.clip_grad, autocast=autocast)

            if batch.get("bad_files"):
                bad_files += len(batch["bad_files"])
                report(f"iteration {it}: skipped unreadable images: {', '.join(map(str, batch['bad_files']))}")
            now = time.perf_counter()
            schedule_row = {"lr": values["lr"], "wd": values["weight_decay"], "momentum": values["momentum"],
                            "teacher_temp": values["teacher_temp"], "last_layer_lr": values["last_layer_lr"]}
            logger.log(it, {**metrics, **schedule_row, "grad_norm": grad_norms["backbone"],
                            **{f"grad_norm_{name}": norm for name, norm in grad_norms.items()},
                            "images_per_sec": global_batch / (now - step_end), "data_wait": data_wait,
                            "bad_files": bad_files})
            if evaluate and ((it + 1) % cfg.evaluation.eval_period_iterations == 0 or it + 1 == total):
                logger.log(it, evaluate(model.teacher_backbone, autocast), step_done=False)
            if monitor and ((it + 1) % cfg.monitor.period == 0 or it + 1 == total):
                logger.log(it, monitor(model.teacher_backbone, autocast), step_done=False)
            if signals.should_stop():
                path = save(it + 1)
                logger.write(f"{signals.received}: saved {path}; exiting with "
                             f"code {EXIT_CODE_SAVED_ON_SIGNAL} so the job can be requeued")
                raise StoppedOnSignal(signals.received, path)
            period = cfg.checkpoint.period
            if it + 1 == total or (period and (it + 1) % period == 0):
                save(it + 1)
            step_end = time.perf_counter()
        teacher = _teacher_backbone_for_export(model, env.is_main)
        if teacher is not None:
            save_backbone(teacher, output_dir / BACKBONE_FILE)
    finally:
        signals.close()
        logger.close()
    return logger.latest


def _teacher_backbone_for_export(model: SSLMetaArch, is_main: bool) -> Optional[torch.nn.Module]:
    """The teacher backbone with whole tensors on the main process (a collective under FSDP)."""
    backbone = model.teacher_backbone
    if not any(isinstance(p, DTensor) for p in backbone.parameters()):
        return backbone
    state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    cfg = model.cfg
    plain = build_backbone(cfg.student.arch, **backbone_kwargs(cfg.student, img_size=cfg.crops.global_crops_size,
                                                               with_drop_path=False))
    plain.load_state_dict(state, strict=True)
    return plain
