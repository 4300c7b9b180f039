"""Peak memory of the prototype heads and losses alone (``dinoreg bench heads``): one forward and backward through
the student and teacher heads, centering or Sinkhorn-Knopp and the DINO and iBOT cross-entropies, with the
backbones replaced by stand-ins that emit tokens of the right shapes (a distillation teacher's too: its heads are
measured, not its backbone). The memory planner
(:mod:`dinoreg.tools.planner`) extends two such measurements linearly in the batch."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dinoreg.config import load_config
from dinoreg.data import TrainingBatch
from dinoreg.distributed import detect_environment, process_device
from dinoreg.ssl.meta_arch import SSLMetaArch
from dinoreg.tools.memory import release_freed_memory, reset_resident_peak, resident_bytes
from dinoreg.train.build import BatchMasks, build_ssl_model, precision


class _TokenStandIn(torch.nn.Module):
    """A backbone's outputs at no cost: fixed random tokens (per crop size) plus one trainable offset, so that the
    heads and losses are measured alone, with gradients flowing through them."""

    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.offset = torch.nn.Parameter(torch.zeros(embed_dim))

    def _tokens(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        generator = torch.Generator(device=images.device).manual_seed(images.shape[-1])
        tokens = torch.randn(images.shape[0], 1 + patches, self.embed_dim, generator=generator,
                             device=images.device) + self.offset
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}

    def forward(self, x: Any, masks: Any = None, is_training: bool = True) -> Any:
        return [self._tokens(images) for images in x] if isinstance(x, (list, tuple)) else self._tokens(x)


def _heads_step(model: SSLMetaArch, batch: TrainingBatch, autocast: Any) -> None:
    with autocast:
        loss, _ = model.forward_loss(batch, teacher_temp=0.07)
    loss.backward()
    model.student.zero_grad(set_to_none=True)


def benchmark_heads(config: str = "vitl14_reg4", *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Peak memory of one forward + backward through the prototype heads and losses alone (student and teacher
    heads, centering or Sinkhorn-Knopp, the DINO and iBOT cross-entropies), at the recipe's per-device batch and
    its iBOT masks; the backbones are replaced by stand-ins that emit fixed tokens of the right shapes.

    On CUDA: max allocated minus allocated before the step. On CPU (Linux): the step's resident-set high-water mark
    (``/proc/self/clear_refs``) minus the resident set before it, with glibc's mmap threshold fixed at 64 KiB so
    that freed tensors leave the resident set at once, and the heap's free pages released before the step (so
    that memory an earlier computation freed counts when reused); a warm-up step runs first."""
    cfg = load_config(config, [*overrides, "student.depth=1"])  # the heads alone: the backbone is replaced
    device = process_device(detect_environment())
    bf16, autocast = precision(cfg, device, distributed=False)
    model = build_ssl_model(cfg, load_pretrained=False)
    embed_dim, patch = model.student["backbone"].embed_dim, cfg.student.patch_size
    model.student["backbone"] = _TokenStandIn(embed_dim, patch)
    model.teacher["backbone"] = _TokenStandIn(embed_dim, patch).requires_grad_(False)
    target = model.target_teacher
    if target is not model.teacher:  # a feature's frozen teacher (distillation, of either family): its stand-in
        # gives its own width on the student's patch grid, the grid its targets are scored on
        target["backbone"] = _TokenStandIn(target["backbone"].embed_dim, patch).requires_grad_(False)
    model = model.to(device).train()
    batch_size, local = cfg.train.batch_size_per_gpu, cfg.crops.local_crops_number
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    masks = BatchMasks(cfg)(2 * batch_size, 0)
    batch = TrainingBatch(global_crops=torch.zeros(2 * batch_size, 3, g, g),
                          local_crops=torch.zeros(local * batch_size, 3, s, s), n_global_crops=2,
                          n_local_crops=local).with_masks(masks).to(device)
    _heads_step(model, batch, autocast)  # warm-up: lazy initialisations, allocator state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _heads_step(model, batch, autocast)
        torch.cuda.synchronize(device)
        kind, peak = "cuda_max_allocated", torch.cuda.max_memory_allocated(device) - before
    else:
        release_freed_memory()
        _heads_step(model, batch, autocast)
        release_freed_memory()
        before = resident_bytes()
        reset_resident_peak()
        _heads_step(model, batch, autocast)
        kind, peak = "peak_rss", resident_bytes("VmHWM:") - before
    dino_k = cfg.dino.head_n_prototypes
    ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else dino_k
    masked = int(batch.mask_indices.shape[0])
    cls_rows = 2 * batch_size + local * batch_size
    # one fp32 [rows, K] buffer over every head's rows: the unit the peak is easiest to read in
    buffer = 4 * (cls_rows * dino_k + masked * ibot_k)
    return {"config": config, "overrides": list(overrides), "device": str(device), "dtype": "bfloat16" if bf16 else "float32",
            "torch": torch.__version__, "batch_size": batch_size, "cls_rows": cls_rows, "masked_patch_rows": masked,
            "dino_prototypes": dino_k, "ibot_prototypes": ibot_k, "separate_ibot_head": bool(cfg.ibot.separate_head),
            "centering": cfg.train.centering, "peak_memory_kind": kind, "peak_memory_bytes": peak,
            "fp32_logits_bytes": buffer, "peak_in_fp32_logits": peak / buffer}


def format_heads_report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"{result['config']}: heads and losses alone at batch {result['batch_size']} on {result['device']}, "
        f"{result['dtype']}, {result['centering']}",
        f"  rows            {result['cls_rows']} cls tokens x {result['dino_prototypes']} prototypes, "
        f"{result['masked_patch_rows']} masked patches x {result['ibot_prototypes']} prototypes "
        f"({'separate' if result['separate_ibot_head'] else 'shared'} iBOT head)",
        f"  peak memory     {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result['peak_memory_kind']}) = "
        f"{result['peak_in_fp32_logits']:.2f} x the fp32 logits of those rows ({result['fp32_logits_bytes'] / 2**20:.0f} MiB)",
    ])
