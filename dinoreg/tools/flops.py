"""FLOPs of a training step, counted on the model built on the meta device (``dinoreg bench flops``, the FLOPs
that ``dinoreg bench train`` divides by its step time).

FLOPs here are real ones (2 per multiply-add), counted by torch's ``FlopCounterMode`` on the model built on the
meta device (nothing allocated), once per crop size and once per head, with layer norms counted as fvcore counts
them (5 multiply-adds per element): the same total as fvcore's trace, which ``tests/test_bench.py`` checks. A step
is the student's forward and backward (twice the forward) on every crop and the target teacher's forward on the
global crops, heads included; element-wise work (softmaxes, the losses) is not counted, nor are the savings of
stochastic depth (the FLOPs are the full model's, so MFU is a lower bound by up to the drop rate).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from dinoreg.config import load_config
from dinoreg.train.build import build_ssl_model

# what training_step_flops returns, and what `bench train --flops` reads
FLOP_KEYS = ("student_forward_flops", "teacher_forward_flops", "step_flops", "masked_patches_expected")


def _layer_norm_flops(input_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """fvcore's count of a layer norm (5 multiply-adds per element), in FLOPs: 10 per element."""
    return 10 * math.prod(input_shape)


def forward_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of ``module(*inputs)`` under torch's ``FlopCounterMode``: matmuls, convolutions and
    attention (on the meta device, attention is counted through its matmuls), plus layer norms as fvcore counts
    them; element-wise work is free. Runs on the meta device when module and inputs are there: nothing is
    allocated or computed."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.native_layer_norm: _layer_norm_flops}) \
            as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


def training_step_flops(cfg: DictConfig) -> dict[str, float]:
    """FLOPs of one training step of one device at ``cfg``'s per-device batch (see the module docstring): the
    student's forward, the target teacher's forward (the EMA teacher, or the frozen teacher when distilling) and
    the step (student forward x 3 + teacher forward). The masked patches that go through the iBOT head are their
    expected number (every patch of the global crops when a distilled student is not masked). Counted on the
    model built on the meta device, in a second or two for ViT-g: fixed by the config, whatever the device."""
    with torch.device("meta"):
        model = build_ssl_model(cfg, load_pretrained=False)
    batch = cfg.train.batch_size_per_gpu
    global_images, local_images = 2 * batch, cfg.crops.local_crops_number * batch
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    patches = (g // cfg.student.patch_size) ** 2
    masked = (global_images * patches if model.ibot_all_patches else
              global_images * cfg.ibot.mask_sample_probability * statistics.fmean(cfg.ibot.mask_ratio_min_max) * patches)
    masked = masked if model.do_ibot else 0.0

    def per_image(backbone: torch.nn.Module, size: int) -> int:
        return forward_flops(backbone.eval(), torch.zeros(1, 3, size, size, device="meta"))

    def heads(models: torch.nn.ModuleDict) -> tuple[int, int]:
        tokens = torch.zeros(1, models["backbone"].embed_dim, device="meta")
        dino = forward_flops(models["dino_head"], tokens)
        return dino, forward_flops(models["ibot_head"], tokens) if "ibot_head" in models else dino

    student, target = model.student, model.target_teacher
    dino, ibot = heads(student)
    student_flops = (per_image(student["backbone"], g) * global_images + dino * (global_images + local_images)
                     + ibot * masked + (per_image(student["backbone"], s) * local_images if local_images else 0))
    teacher_dino, teacher_ibot = heads(target)
    teacher_flops = per_image(target["backbone"], g) * global_images + teacher_dino * global_images + teacher_ibot * masked
    return {"student_forward_flops": float(student_flops), "teacher_forward_flops": float(teacher_flops),
            "step_flops": float(3 * student_flops + teacher_flops), "masked_patches_expected": masked}


def count_step_flops(config: str = "tiny_cpu", *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``dinoreg bench flops``: :func:`training_step_flops` of a recipe, with the batch it is for."""
    cfg = load_config(config, list(overrides))
    return {"config": config, "overrides": list(overrides), "batch_size": cfg.train.batch_size_per_gpu,
            **training_step_flops(cfg)}


def format_flops_report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"{result['config']}: one training step at batch {result['batch_size']} per device",
        f"  student forward  {result['student_forward_flops'] / 1e12:.3f} TFLOP",
        f"  teacher forward  {result['teacher_forward_flops'] / 1e12:.3f} TFLOP",
        f"  step             {result['step_flops'] / 1e12:.3f} TFLOP (student forward x 3 + teacher forward; "
        f"{result['masked_patches_expected']:.0f} masked patches expected)",
    ])
