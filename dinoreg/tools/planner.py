"""How much memory a training run needs per GPU, and the largest per-GPU batch that fits, before submitting it
(``dinoreg bench memory``).

The plan adds, per GPU:

- **states**, counted exactly on the model built on the meta device (no weights allocated): fp32 master
  parameters of student and teacher, the student's fp32 gradients and AdamW's two fp32 moments, each divided by
  the number of GPUs under ``full_shard`` / ``shard_grad_op`` (replicated under ``no_shard`` or on one GPU);
- **frozen models** of the training features (a distillation teacher with its heads, of either family, e.g. a
  DINOv3 RoPE ``vitl16``; the Gram teacher): their fp32 parameters, sharded as the teacher's, and in bf16 runs two
  of their blocks and their largest head in bf16 (all-gathered in flight, or autocast's casts on one GPU). Their
  forward pass runs before the student's, under ``no_grad``: its activations are gone before the student's peak;
- **bf16 compute copies** (bf16 runs): with FSDP2, the all-gathered bf16 parameters in flight (two blocks and the
  largest head under ``full_shard``; the whole student between forward and backward under ``shard_grad_op`` and
  ``no_shard``);
  on one GPU, autocast's cached bf16 copy of the student's weights;
- **activations**, measured: one block's saved activations per image of each crop size, by a real forward on
  the CPU at the model's width in the run's precision and activation checkpointing mode (the resident set
  after a 2-block forward minus after a 1-block forward), times the depth, plus the block being differentiated
  (gradients of about its activations' size; with checkpointing also its recomputed activations), times the
  crops of a batch;
- **heads and losses**, measured with :func:`dinoreg.tools.heads.benchmark_heads` in the run's precision at two small
  batches and extended linearly in the batch (the rows grow with it), less the heads' gradients (counted in the
  states);
- a fixed **reserve** (CUDA context, NCCL buffers, allocator fragmentation): an assumption, ``reserve_gib``.

Everything that grows with the batch is linear in it, so the largest batch that fits is a division. The
measurements read this process's resident set: plan in a fresh process (as ``dinoreg bench memory`` does), not
after other large computations whose freed heap would blur them.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from dinoreg.config import build_backbone_from_config, load_config
from dinoreg.tools.heads import benchmark_heads
from dinoreg.tools.memory import release_freed_memory, resident_bytes
from dinoreg.train.build import build_ssl_model

__all__ = ["plan_memory", "format_memory_plan"]

GIB = 2**30


def _forward_bytes(cfg: DictConfig, depth: int, images: int, size: int, bf16: bool, mode: str) -> int:
    """Resident bytes that a training forward of ``images`` crops of ``size`` px through a ``depth``-block
    student keeps for its backward pass (its saved activations and outputs)."""
    cfg = copy.deepcopy(cfg)
    cfg.student.depth = depth
    backbone = build_backbone_from_config(cfg, stochastic_depth=False).train()
    backbone.set_checkpointing(mode)
    crops = torch.randn(images, 3, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        release_freed_memory()
        before = resident_bytes()
        out = backbone([crops], is_training=True)[0]
        held = resident_bytes() - before
    del out
    return held


def _per_image_block_bytes(cfg: DictConfig, size: int, bf16: bool, mode: str) -> float:
    """One block's activations per image of ``size`` px: a 2-block forward minus a 1-block one, after a
    warm-up, over enough images for 2048 tokens (so that every tensor is large and measured page-exactly)."""
    tokens = 1 + cfg.student.num_register_tokens + (size // cfg.student.patch_size) ** 2
    images = max(4, math.ceil(2048 / tokens))
    _forward_bytes(cfg, 1, images, size, bf16, mode)  # warm-up: lazy initialisations, allocator state
    one, two = (_forward_bytes(cfg, depth, images, size, bf16, mode) for depth in (1, 2))
    return max(two - one, 0) / images


def plan_memory(config: str, *, gpus: int = 1, batch: int | None = None, gpu_memory_gib: float = 80.0,
                activation_checkpointing: str | None = None, reserve_gib: float = 2.0,
                overrides: Sequence[str] = (), bf16: bool | None = None) -> dict[str, Any]:
    """The per-GPU plan of ``config`` on ``gpus`` GPUs at the per-GPU ``batch`` (default: the recipe's), and the
    largest per-GPU batch that fits in ``gpu_memory_gib``. ``bf16``: the run's precision (default: bf16, as on
    GPUs; False plans an fp32 run, the CPU's)."""
    extra = [f"train.activation_checkpointing={activation_checkpointing}"] if activation_checkpointing else []
    cfg = load_config(config, [*overrides, *extra])
    batch = batch or cfg.train.batch_size_per_gpu
    bf16 = (cfg.train.precision != "fp32") if bf16 is None else bf16
    with torch.device("meta"):
        model = build_ssl_model(cfg, load_pretrained=False)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    student, teacher = count(model.student), count(model.teacher)
    heads = {name: count(module) for name, module in model.student.items() if name != "backbone"}
    block = count(model.student["backbone"].blocks[0])
    frozen = {name: count(getattr(model, name)) for name in model.frozen_names}
    frozen_in_flight = sum(2 * count(getattr(model, name)["backbone"].blocks[0])
                           + max((count(head) for key, head in getattr(model, name).items() if key != "backbone"),
                                 default=0) for name in model.frozen_names)
    shards = gpus if gpus > 1 and cfg.train.sharding != "no_shard" else 1
    states = {"master_parameters": 4 * (student + teacher) / shards, "gradients": 4 * student / shards,
              "adamw": 8 * student / shards, "frozen_models": 4 * sum(frozen.values()) / shards}
    if not bf16:
        states["bf16_compute_copies"] = 0.0
    elif gpus > 1 and cfg.train.sharding in ("shard_grad_op", "no_shard"):  # kept from forward to backward
        states["bf16_compute_copies"] = 2.0 * student
    elif gpus > 1:
        states["bf16_compute_copies"] = 2.0 * (2 * block + max(heads.values()))
    else:
        states["bf16_compute_copies"] = 2.0 * student
    states["bf16_compute_copies"] += 2.0 * frozen_in_flight if bf16 else 0.0

    mode = cfg.train.activation_checkpointing
    depth, local = len(model.student["backbone"].blocks), cfg.crops.local_crops_number
    sizes = {"global": cfg.crops.global_crops_size, "local": cfg.crops.local_crops_size}
    crops_per_image = {"global": 2, "local": local}
    per_image = {name: _per_image_block_bytes(cfg, size, bf16, mode) for name, size in sizes.items()}
    unsaved = per_image if mode == "none" else {
        name: _per_image_block_bytes(cfg, size, bf16, "none") for name, size in sizes.items()}
    # At the start of the backward pass every block's saved activations are held, and the block being
    # differentiated adds gradients of about its full activations' size (with checkpointing, also its
    # recomputed activations): one more block's worth without checkpointing, two of the unsaved kind with it.
    extra_blocks = 1 if mode == "none" else 2
    by_crops = {name: crops_per_image[name] * (depth * per_image[name] + extra_blocks * unsaved[name])
                for name in sizes}
    activations_per_batch_image = sum(by_crops.values())

    precision_override = ["train.precision=bf16" if bf16 else "train.precision=fp32"]
    small = [benchmark_heads(config, overrides=[*overrides, *precision_override, f"train.batch_size_per_gpu={b}"])
             for b in (2, 4)]
    head_grads = 4 * sum(heads.values())
    heads_slope = (small[1]["peak_memory_bytes"] - small[0]["peak_memory_bytes"]) / 2
    heads_fixed = max(small[0]["peak_memory_bytes"] - 2 * heads_slope - head_grads, 0.0)

    def total(b: int) -> float:
        return sum(states.values()) + b * activations_per_batch_image + heads_fixed + b * heads_slope \
            + reserve_gib * GIB

    fixed = total(0)
    per_batch_image = activations_per_batch_image + heads_slope
    budget = gpu_memory_gib * GIB
    largest = math.floor((budget - fixed) / per_batch_image) if budget > fixed else 0
    return {
        "config": config, "overrides": list(overrides), "gpus": gpus, "sharding": cfg.train.sharding,
        "precision": "bf16" if bf16 else "fp32", "activation_checkpointing": mode, "batch_size": batch,
        "student_parameters": student, "teacher_parameters": teacher, "depth": depth,
        "student_family": model.student["backbone"].pos_embed_type, "frozen_parameters": frozen,
        "frozen_families": {name: getattr(model, name)["backbone"].pos_embed_type for name in model.frozen_names},
        "states_bytes": states,
        "activation_bytes_per_image_per_block": per_image,
        "activations_bytes": batch * activations_per_batch_image,
        "activations_bytes_by_crops": {name: batch * value for name, value in by_crops.items()},
        "heads_and_losses_bytes": heads_fixed + batch * heads_slope,
        "reserve_bytes": reserve_gib * GIB, "total_bytes": total(batch),
        "fixed_bytes": fixed, "bytes_per_batch_image": per_batch_image,
        "gpu_memory_gib": gpu_memory_gib, "largest_batch_that_fits": largest,
        "fits": total(batch) <= budget,
    }


def format_memory_plan(plan: dict[str, Any]) -> str:
    gib = lambda value: f"{value / GIB:8.2f} GiB"  # noqa: E731
    states = plan["states_bytes"]
    frozen = ", ".join(f"{name} {count / 1e6:.0f} M, {'RoPE' if plan['frozen_families'][name] == 'rope' else 'learned'}"
                       for name, count in plan["frozen_parameters"].items())
    lines = [
        f"{plan['config']}: per GPU on {plan['gpus']} GPU(s), {plan['sharding']}, {plan['precision']}, activation "
        f"checkpointing {plan['activation_checkpointing']}, batch {plan['batch_size']} per GPU "
        f"({plan['student_parameters'] / 1e6:.0f} M student + {plan['teacher_parameters'] / 1e6:.0f} M teacher "
        f"parameters, {'RoPE' if plan['student_family'] == 'rope' else 'learned-position'} backbone)",
        f"  parameters, fp32 masters    {gib(states['master_parameters'])}",
        f"  parameters, bf16 copies     {gib(states['bf16_compute_copies'])}",
        f"  gradients, fp32             {gib(states['gradients'])}",
        f"  AdamW moments, fp32         {gib(states['adamw'])}",
        *([f"  frozen models, fp32         {gib(states['frozen_models'])} ({frozen})"] if frozen else []),
        f"  activations, global crops   {gib(plan['activations_bytes_by_crops']['global'])}",
        f"  activations, local crops    {gib(plan['activations_bytes_by_crops']['local'])}",
        f"  heads and losses            {gib(plan['heads_and_losses_bytes'])}",
        f"  reserve (assumed)           {gib(plan['reserve_bytes'])}",
        f"  total                       {gib(plan['total_bytes'])} of {plan['gpu_memory_gib']:g} GiB: "
        f"{'fits' if plan['fits'] else 'does NOT fit'}",
        f"  largest per-GPU batch that fits {plan['gpu_memory_gib']:g} GiB: {plan['largest_batch_that_fits']}",
    ]
    return "\n".join(lines)

