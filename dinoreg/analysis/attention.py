"""``attention``: where the [CLS] token and each register look (Darcet et al. 2023, Fig. 1, 9, 14).

The attention of one block (the last by default) is computed explicitly from that block's own weights:
the tokens go through the blocks before it, then its ``norm1`` and ``qkv`` projection, and
``softmax(q k^T * head_dim**-0.5)`` is formed here, so the backbone and its attention backend are used as
they are and nothing in the model changes. Only the query rows of [CLS] and the registers are computed.

Figure ``attention_maps.png``: a grid, one row per shown image: the image, then the head-averaged attention
of [CLS] and of each register (``reg0``, ``reg1``, ...) over the patches overlaid on it, each with its colour
bar. The maps are the patch part of each query's attention row, not renormalised: they sum to the fraction of
attention that query puts on patches.

``attention.json`` keys: ``tool``, ``weights``, ``images``, ``num_images``, ``grid`` ([H, W] patches),
``layer`` (block index, from 0), ``num_layers``, ``num_heads``, ``num_register_tokens``, ``entropy_uniform``
(``log(H*W)``, the entropy of uniform attention over the patches), and ``queries``: for each query token
(``cls``, ``reg0``, ``reg1``, ...), averaged over images and heads,

- ``entropy``: entropy (nats) of the query's attention over the patches, renormalised to sum to 1;
- ``max_attention``: the largest share of that renormalised patch attention held by a single patch;
- ``mass``: ``{"self", "cls", "registers", "patches"}``, the fractions of the query's attention on itself,
  on [CLS], on the registers (itself included for a register) and on the patches;
- ``per_head``: the same quantities per head (lists of length ``num_heads``: ``entropy``,
  ``max_attention``, ``mass_self``, ``mass_cls``, ``mass_registers``, ``mass_patches``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from dinoreg.analysis.common import AnalysisError, AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.models.vit import VisionTransformer
from dinoreg.run_dir import write_json

__all__ = ["MAPS_SHOWN", "TOOLS", "attention_statistics", "query_attention", "query_names",
           "resolve_layer", "run_attention"]

MAPS_SHOWN = 6
_STATISTICS = ("entropy", "max_attention", "mass_self", "mass_cls", "mass_registers", "mass_patches")


def resolve_layer(backbone: VisionTransformer, layer: Optional[int]) -> int:
    """``layer`` (None: the last; negative: from the end) as a block index in ``[0, depth)``."""
    depth = len(backbone.blocks)
    if layer is None:
        return depth - 1
    if not -depth <= layer < depth:
        raise AnalysisError(f"--layer {layer}: the backbone has {depth} blocks; pass 0..{depth - 1}, or -1..-{depth} "
                            "counted from the end")
    return layer % depth


@torch.no_grad()
def query_attention(backbone: VisionTransformer, images: Tensor, *, layer: int) -> Tensor:
    """Attention ``[B, heads, 1 + R, 1 + R + HW]`` of [CLS] and the ``R`` registers in block ``layer``
    (a valid index, see :func:`resolve_layer`), keys in the model's order ``[cls, registers, patches]``."""
    tokens = backbone.prepare_tokens_with_masks(images)  # [B, 1 + R + HW, D]
    ropes = backbone.positions(images)  # each block's RoPE (Nones for learned positions)
    for block, rope in zip(backbone.blocks[:layer], ropes):
        tokens = block(tokens, rope)
    return backbone.blocks[layer].attention_probs(tokens, num_queries=1 + backbone.num_register_tokens,
                                                  rope=ropes[layer])


def query_names(num_register_tokens: int) -> list[str]:
    return ["cls"] + [f"reg{i}" for i in range(num_register_tokens)]


def attention_statistics(probs: Tensor, *, num_register_tokens: int) -> dict[str, Tensor]:
    """Per image, head and query (``[B, heads, Q]`` each) from ``probs`` ``[B, heads, Q, N]`` (queries are
    [CLS] and the registers): the statistics listed in the module docstring."""
    first_patch = 1 + num_register_tokens
    patches = probs[..., first_patch:]  # [B, heads, Q, HW]
    patch_mass = patches.sum(-1)  # [B, heads, Q]
    share = patches / patch_mass.clamp_min(1e-30).unsqueeze(-1)  # each query's patch attention, summing to 1
    queries = torch.arange(probs.shape[2], device=probs.device)
    return {
        "entropy": -torch.special.xlogy(share, share).sum(-1),
        "max_attention": share.amax(-1),
        "mass_self": probs[:, :, queries, queries],
        "mass_cls": probs[..., 0],
        "mass_registers": probs[..., 1:first_patch].sum(-1),
        "mass_patches": patch_mass,
    }


def _summarise(statistics: dict[str, Tensor], names: list[str]) -> dict[str, Any]:
    """``statistics``: ``[N, heads, Q]`` per name -> the ``queries`` entry of the JSON."""
    queries = {}
    for position, name in enumerate(names):
        per_head = {key: values[:, :, position].mean(0) for key, values in statistics.items()}  # [heads]
        queries[name] = {
            "entropy": float(per_head["entropy"].mean()),
            "max_attention": float(per_head["max_attention"].mean()),
            "mass": {part: float(per_head[f"mass_{part}"].mean()) for part in ("self", "cls", "registers", "patches")},
            "per_head": {key: per_head[key].tolist() for key in _STATISTICS},
        }
    return queries


def _plot_maps(inputs: AnalysisInputs, indices: Tensor, maps: Tensor, names: list[str], layer: int, out: Path) -> None:
    """``maps``: ``[shown, Q, H, W]`` head-averaged patch attention, overlaid on the images."""
    plt = pyplot()
    shown, size = maps.shape[0], inputs.image_size
    pictures = inputs.raw_images(indices[:shown].tolist())  # [shown, S, S, 3]
    columns = 1 + len(names)
    figure, axes = plt.subplots(shown, columns, figsize=(2.6 * columns, 2.3 * shown), squeeze=False,
                             layout="constrained")
    titles = ["image", "[CLS]"] + names[1:]  # registers named as in the JSON: reg0, reg1, ...
    for row in range(shown):
        for column in range(columns):
            axis = axes[row, column]
            axis.imshow(pictures[row].numpy())
            if column:
                heat = axis.imshow(maps[row, column - 1].numpy(), cmap="inferno", alpha=0.65,
                                   extent=(0, size, size, 0), interpolation="nearest")
                figure.colorbar(heat, ax=axis, fraction=0.046, pad=0.03, label="attention")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column])
        axes[row, 0].set_ylabel(f"image {int(indices[row])}")
    figure.suptitle(f"block {layer} attention over the patches, mean over heads")
    save_figure(figure, out / "attention_maps.png")


def run_attention(inputs: AnalysisInputs, out: Path, *, layer: Optional[int] = None) -> dict[str, Any]:
    """Attention of [CLS] and the registers over the patches in block ``layer`` (default: the last)."""
    backbone, (height, width) = inputs.backbone, inputs.grid
    index = resolve_layer(backbone, layer)
    registers = backbone.num_register_tokens
    names = query_names(registers)
    collected: dict[str, list[Tensor]] = {key: [] for key in _STATISTICS}
    maps, all_indices = [], []
    for images, indices in inputs.batches("attention"):
        probs = query_attention(backbone, images, layer=index)  # [B, heads, 1 + R, N]
        for key, values in attention_statistics(probs, num_register_tokens=registers).items():
            collected[key].append(values.cpu())
        if sum(len(m) for m in maps) < MAPS_SHOWN:
            patch_part = probs[..., 1 + registers:].mean(1)  # [B, 1 + R, HW]
            maps.append(patch_part.reshape(*patch_part.shape[:2], height, width).cpu())
        all_indices.append(indices)
    if not all_indices:
        raise AnalysisError(f"--images {inputs.images}: no images to analyse")
    statistics = {key: torch.cat(values) for key, values in collected.items()}  # [N, heads, Q]
    indices = torch.cat(all_indices)
    result = {"tool": "attention", "weights": str(inputs.weights), "images": inputs.images,
              "num_images": len(indices), "grid": [height, width], "layer": index, "num_layers": len(backbone.blocks),
              "num_heads": int(statistics["entropy"].shape[1]), "num_register_tokens": registers,
              "entropy_uniform": math.log(height * width), "queries": _summarise(statistics, names)}
    out.mkdir(parents=True, exist_ok=True)
    _plot_maps(inputs, indices, torch.cat(maps)[:MAPS_SHOWN], names, index, out)
    write_json(out / "attention.json", result)
    return result


def _add_arguments(parser: Any) -> None:
    parser.add_argument("--layer", type=int, metavar="BLOCK",
                        help="the block whose attention is shown, from 0; negative counts from the end "
                             "(default: the last)")


def _summary_line(result: dict[str, Any]) -> str:
    cls = result["queries"]["cls"]
    line = (f"{result['num_images']} images, block {result['layer']}: [CLS] attention entropy {cls['entropy']:.2f} "
            f"nats over the patches (uniform {result['entropy_uniform']:.2f})")
    if result["num_register_tokens"]:
        line += f", {cls['mass']['registers']:.1%} of its attention on the registers"
    return line


TOOLS = {
    "attention": Tool(help="attention maps of [CLS] and each register over the patches (last block by default)",
                      description="The attention of the [CLS] token and of every register over the patch tokens in "
                                  "one block (default: the last), averaged over heads and overlaid on the images "
                                  "(Darcet et al. 2023, Fig. 1, 9, 14), with per-query and per-head entropy, "
                                  "peak attention and attention mass on [CLS] / registers / patches. Writes "
                                  "attention.json, attention_maps.png.",
                      run=lambda inputs, out, args: run_attention(inputs, out, layer=args.layer),
                      summary=_summary_line, add_arguments=_add_arguments),
}
