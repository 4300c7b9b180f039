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

And to TensorBoard only: ``monitor/maps``, a picture of the first probe images with their output patch-token
norm maps and the last block's attention maps of [CLS] and the registers (what ``dinoreg analyze norms`` and
``attention`` draw), and ``monitor/patch_norms``, the histogram of the output patch-token norms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib import colormaps  # no pyplot: nothing opens a display
from omegaconf import DictConfig
from torch import Tensor

from dinoreg.data import IMAGENET_MEAN, IMAGENET_STD, DatasetError, IndexedView, build_dataset, build_eval_loader
from dinoreg.metrics.tokens import patch_norms

__all__ = ["ArtifactMonitor", "MonitorReading", "artifact_metrics", "maps_picture"]

MAPS_SHOWN = 4  # probe images in the picture
REGISTER_MAPS = 4  # registers whose attention maps are shown (the first ones)


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


def _coloured(maps: Tensor, colormap: str, size: int) -> Tensor:
    """``[n, h, w]`` -> ``[n, 3, size, size]`` in ``[0, 1]``: each map scaled to its own range, coloured, and
    enlarged without smoothing (one square per patch)."""
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    scaled = ((maps - low) / (high - low).clamp_min(1e-12)).numpy()
    rgb = torch.from_numpy(colormaps[colormap](scaled)[..., :3]).float().permute(0, 3, 1, 2)
    return F.interpolate(rgb, size=(size, size), mode="nearest")


def maps_picture(images: Tensor, norms: Tensor, attention: Tensor, *, num_register_tokens: int) -> Tensor:
    """``[3, rows * S, columns * S]``: one row per image (the first ``MAPS_SHOWN``): the image, its output
    patch-token norm map (viridis), and the head-averaged attention of [CLS] and the first ``REGISTER_MAPS``
    registers over the patches in the last block (inferno). ``images``: normalised ``[B, 3, S, S]``; ``norms``:
    ``[B, HW]``; ``attention``: ``[B, heads, Q, 1 + R + HW]`` with at least [CLS] and those registers as queries."""
    shown, size = min(MAPS_SHOWN, images.shape[0]), images.shape[-1]
    grid = math.isqrt(norms.shape[-1])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    columns = [(images[:shown].float().cpu() * std + mean).clamp(0, 1),
               _coloured(norms[:shown].float().cpu().view(shown, grid, grid), "viridis", size)]
    queries = min(attention.shape[2], 1 + min(num_register_tokens, REGISTER_MAPS))
    patches = attention[:shown, :, :queries, 1 + num_register_tokens:].float().mean(1).cpu()  # [shown, Q, HW]
    columns += [_coloured(patches[:, query].view(shown, grid, grid), "inferno", size) for query in range(queries)]
    rows = torch.cat(columns, dim=-1)  # [shown, 3, S, columns * S]
    return torch.cat(list(rows), dim=-2)  # [3, shown * S, columns * S]


@dataclass
class MonitorReading:
    """One measurement: the figures for ``metrics.jsonl`` and TensorBoard, and what only TensorBoard shows."""

    metrics: dict[str, float]
    picture: Tensor  # see maps_picture
    norms: Tensor  # [B * HW]: every output patch-token norm of the probe batch


class ArtifactMonitor:
    """A fixed probe batch (the first ``monitor.images`` images of the dataset's val split, or of the dataset,
    resized to the global crop size) and the measurement. Runs on every rank (the teacher may be sharded)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        size, count = cfg.crops.global_crops_size, cfg.monitor.images
        dataset = build_dataset(cfg.train.dataset_path, split="val")
        probe = IndexedView(dataset, range(min(count, len(dataset))))
        loader = build_eval_loader(probe, image_size=size, resize_size=size, batch_size=count, num_workers=0)
        self.images = next(iter(loader))[0].to(device)  # [n, 3, S, S]; fewer if some files do not decode
        if not len(self.images):
            raise DatasetError(f"none of the first {len(probe)} images of {cfg.train.dataset_path} (the artifact "
                               "monitor's probe batch) could be decoded; check the dataset's files (or turn the "
                               "monitor off with monitor.period=0)")
        self.cfg = cfg.monitor

    @torch.no_grad()
    def __call__(self, backbone: Any, autocast: Any) -> MonitorReading:
        started = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        last, registers = len(backbone.blocks) - 1, backbone.num_register_tokens
        with autocast:
            outputs, attention = backbone.block_outputs(self.images, attention_of=(last,),
                                                        num_queries=1 + min(registers, REGISTER_MAPS))
        backbone.train(was_training)
        metrics = artifact_metrics(outputs, attention[last], num_register_tokens=registers,
                                   relative_threshold=self.cfg.relative_threshold,
                                   absolute_threshold=self.cfg.absolute_threshold)
        norms = patch_norms(outputs[-1:], registers)[0]  # [B, HW]
        picture = maps_picture(self.images, norms, attention[last], num_register_tokens=registers)
        metrics["monitor/seconds"] = time.perf_counter() - started  # its own cost, for the overhead
        return MonitorReading(metrics=metrics, picture=picture, norms=norms.flatten().cpu())
