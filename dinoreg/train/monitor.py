"""The live artifact monitor: watch high-norm "artifact" tokens appear in the teacher while it trains.

Darcet et al. (2023) saw them appear after about a third of training, in the middle layers, in large models.
Every ``monitor.period`` iterations the teacher encodes a fixed probe batch and the loop logs, per block
``bNN``, to TensorBoard and ``metrics.jsonl``:

* ``monitor/high_norm_rel/bNN``: fraction of patch tokens above ``relative_threshold`` x the block's median
  norm; ``monitor/high_norm_abs/bNN``: above ``absolute_threshold``;
* ``monitor/norm_p50/bNN``, ``monitor/norm_p99/bNN``, ``monitor/norm_max/bNN``: patch-token norm quantiles
  (residual stream, before the final norm);
* ``monitor/cls_to_registers``: the last block's attention mass from the cls token to the registers (0
  without registers), averaged over heads and images;
* ``monitor/seconds``: what the measurement cost (``dinoreg bench train`` turns it into an overhead).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from dinoreg.data import IndexedView, build_dataset, build_eval_loader
from dinoreg.metrics.tokens import patch_norms

__all__ = ["ArtifactMonitor", "artifact_metrics"]


def artifact_metrics(block_outputs: list[Tensor], last_attention: Tensor, *, num_register_tokens: int,
                     relative_threshold: float, absolute_threshold: float) -> dict[str, float]:
    """The monitor's figures from the block outputs ``L x [B, 1 + R + HW, D]`` and the last block's attention
    ``[B, heads, Q, N]`` (only the cls query, ``Q`` = 0, is read)."""
    norms = patch_norms(block_outputs, num_register_tokens).flatten(1)  # [L, B * HW]
    metrics: dict[str, float] = {}
    for block, values in enumerate(norms):
        median = values.median()
        tag = f"b{block:02d}"
        metrics[f"monitor/high_norm_rel/{tag}"] = (values > relative_threshold * median).float().mean().item()
        metrics[f"monitor/high_norm_abs/{tag}"] = (values > absolute_threshold).float().mean().item()
        metrics[f"monitor/norm_p50/{tag}"] = median.item()
        metrics[f"monitor/norm_p99/{tag}"] = values.quantile(0.99).item()
        metrics[f"monitor/norm_max/{tag}"] = values.max().item()
    cls_row = last_attention[:, :, 0].float()  # [B, heads, N]: the cls token's attention over all tokens
    metrics["monitor/cls_to_registers"] = cls_row[..., 1:1 + num_register_tokens].sum(-1).mean().item()
    return metrics


class ArtifactMonitor:
    """A fixed probe batch (the first ``monitor.images`` images of the dataset's val split, or of the dataset,
    resized to the global crop size) and the measurement. Runs on every rank (the teacher may be sharded)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        size, count = cfg.crops.global_crops_size, cfg.monitor.images
        dataset = build_dataset(cfg.train.dataset_path, split="val")
        probe = IndexedView(dataset, range(min(count, len(dataset))))
        loader = build_eval_loader(probe, image_size=size, resize_size=size, batch_size=count, num_workers=0)
        self.images = next(iter(loader))[0].to(device)  # [n, 3, S, S]; fewer if some files do not decode
        self.cfg = cfg.monitor

    @torch.no_grad()
    def __call__(self, backbone: Any, autocast: Any) -> dict[str, float]:
        started = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        last = len(backbone.blocks) - 1
        with autocast:
            outputs, attention = backbone.block_outputs(self.images, attention_of=(last,), num_queries=1)
        backbone.train(was_training)
        metrics = artifact_metrics(outputs, attention[last], num_register_tokens=backbone.num_register_tokens,
                                   relative_threshold=self.cfg.relative_threshold,
                                   absolute_threshold=self.cfg.absolute_threshold)
        return {**metrics, "monitor/seconds": time.perf_counter() - started}  # its own cost, for the overhead
