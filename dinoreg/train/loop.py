"""``train(cfg)``: build -> iterate -> log -> evaluate -> save. One process, CPU or one GPU."""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from dinoreg.config import apply_scaling_rule, save_config
from dinoreg.data import (MultiCropDataset, MultiCropGeometric, Photometric, SyntheticShapes, build_dataset,
                          build_eval_loader, build_loader, collate_multicrop)
from dinoreg.eval.knn import extract_features, knn_accuracy
from dinoreg.models.weights import save_backbone
from dinoreg.ssl.masking import MaskingGenerator, sample_masks
from dinoreg.ssl.meta_arch import SSLMetaArch
from dinoreg.train.logging import TrainingLogger
from dinoreg.train.optim import Schedules, apply_optim_schedule, build_optimizer, build_param_groups, clip_grad_norms

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


def _device_and_autocast(cfg: DictConfig) -> tuple[torch.device, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    # Master weights, optimizer state and losses stay fp32; only the forward computes in bf16.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    return device, autocast


def _batches(cfg: DictConfig) -> Iterator[dict[str, Any]]:
    dataset = build_dataset(cfg.train.dataset_path, split="train")
    geometric = MultiCropGeometric(cfg.crops.global_crops_size, cfg.crops.local_crops_size,
                                   cfg.crops.local_crops_number, global_crops_scale=tuple(cfg.crops.global_crops_scale),
                                   local_crops_scale=tuple(cfg.crops.local_crops_scale))
    masks = BatchMasks(cfg)
    loader = build_loader(MultiCropDataset(dataset, geometric, seed=cfg.train.seed),
                          batch_size=cfg.train.batch_size_per_gpu, num_workers=cfg.train.num_workers,
                          seed=cfg.train.seed, rank=0, world_size=1, start=0,
                          collate_fn=functools.partial(collate_multicrop, mask_fn=masks))
    return iter(loader)


class KnnEvaluator:
    """kNN top-1 of a backbone's cls token on the synthetic dataset (bank: train split, queries: held out)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        ev = cfg.evaluation
        size, workers = cfg.crops.global_crops_size, min(cfg.train.num_workers, 2)
        self.bank = build_eval_loader(SyntheticShapes("train", size=ev.knn_train_images, seed=cfg.train.seed),
                                      image_size=size, resize_size=size, batch_size=256, num_workers=workers)
        self.queries = build_eval_loader(SyntheticShapes("val", size=ev.knn_eval_images, seed=cfg.train.seed),
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


def _check_finite(iteration: int, metrics: dict[str, torch.Tensor]) -> None:
    bad = {name: value.item() for name, value in metrics.items() if not math.isfinite(value.item())}
    if bad:
        terms = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise NonFiniteLossError(
            f"iteration {iteration}: non-finite loss ({terms}); stopping without saving this state. "
            "Lower optim.base_lr or raise optim.warmup_epochs, and check the data.")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg`` to the end; returns the last logged metrics (``knn_top1`` included)."""
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    device, autocast = _device_and_autocast(cfg)
    apply_scaling_rule(cfg, world_size=1)
    save_config(cfg, output_dir / "config.yaml")

    batches = _batches(cfg)  # a bad dataset path fails here, before any model is built
    model = SSLMetaArch(cfg).to(device).train()
    optimizer = build_optimizer(build_param_groups(model.student, layerwise_decay=cfg.optim.layerwise_decay,
                                                   patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult),
                                betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    schedules = Schedules(cfg)
    photometric = Photometric(cfg.crops.blur_prob_global1, cfg.crops.blur_prob_global2, cfg.crops.blur_prob_local,
                              cfg.crops.solarization_prob_global2).to(device)
    evaluate = KnnEvaluator(cfg, device) if cfg.evaluation.knn_enabled else None
    total = schedules.total_iterations
    logger = TrainingLogger(output_dir, total_iterations=total, print_every=cfg.train.log_every)
    try:
        if evaluate:
            logger.log(0, evaluate(model.teacher_backbone, autocast), step_done=False)
        step_end, bad_files = time.perf_counter(), 0
        for it in range(total):
            values = schedules.values(it)
            apply_optim_schedule(optimizer, lr=values["lr"], weight_decay=values["weight_decay"],
                                 last_layer_lr=values["last_layer_lr"])
            batch = next(batches)
            while batch["batch_size"] < 2:  # every (or all but one) image of the batch was unreadable
                bad_files += len(batch["bad_files"])
                logger.warn(f"iteration {it}: skipped a batch of unreadable images: {batch['bad_files']}")
                batch = next(batches)
            data_wait = time.perf_counter() - step_end
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            batch["global_crops"], batch["local_crops"] = photometric(batch["global_crops"], batch["local_crops"])

            with autocast:
                loss, metrics = model.forward_loss(batch, teacher_temp=values["teacher_temp"])
            _check_finite(it, metrics)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms = clip_grad_norms(model.student, cfg.optim.clip_grad)
            optimizer.step()
            model.update_teacher(values["momentum"])

            if batch.get("bad_files"):
                bad_files += len(batch["bad_files"])
                logger.warn(f"iteration {it}: skipped unreadable images: {', '.join(map(str, batch['bad_files']))}")
            now = time.perf_counter()
            n_images = batch["labels"].shape[0]
            schedule_row = {"lr": values["lr"], "wd": values["weight_decay"], "momentum": values["momentum"],
                            "teacher_temp": values["teacher_temp"], "last_layer_lr": values["last_layer_lr"]}
            logger.log(it, {**metrics, **schedule_row, "grad_norm": grad_norms["backbone"],
                            **{f"grad_norm_{name}": norm for name, norm in grad_norms.items()},
                            "images_per_sec": n_images / (now - step_end), "data_wait": data_wait,
                            "bad_files": bad_files})
            if evaluate and ((it + 1) % cfg.evaluation.eval_period_iterations == 0 or it + 1 == total):
                logger.log(it, evaluate(model.teacher_backbone, autocast), step_done=False)
            step_end = time.perf_counter()
        save_backbone(model.teacher_backbone, output_dir / BACKBONE_FILE)
    finally:
        logger.close()
    return logger.latest
