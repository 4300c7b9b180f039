"""``dinoreg analyze neighbors``: artifacts appear where patches are redundant (Darcet et al. 2023, Fig. 5a).

For every patch, the mean cosine similarity of its patch embedding (the patch-embedding layer's output, before
position embeddings are added) to those of its 4 neighbours, compared between the patches whose *output*
token is high-norm and the others. The paper finds the outliers sit on patches very similar to their
neighbours: background the model can afford to recycle.

``neighbors.json``: ``tool``, ``weights``, ``images``, ``num_images``, ``grid``, ``threshold`` (null: no
high-norm mode found), ``threshold_source``, ``num_outliers``, ``num_normal``,
``outlier_similarity`` / ``normal_similarity`` (``{mean, median}``, null without outliers).
``neighbors.png``: the two similarity distributions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dinoreg.analysis.common import AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.analysis.norms import choose_threshold
from dinoreg.metrics.tokens import patch_norms
from dinoreg.run_dir import write_json

__all__ = ["TOOLS", "neighbour_similarity", "run_neighbors"]


def neighbour_similarity(embeddings: Tensor) -> Tensor:
    """``[B, H, W]``: each patch's mean cosine similarity to its (up to 4) horizontal and vertical neighbours,
    from patch embeddings ``[B, H, W, D]``; border patches average over the neighbours they have."""
    unit = F.normalize(embeddings.float(), dim=-1)
    total = torch.zeros(unit.shape[:3], device=unit.device)
    count = torch.zeros(unit.shape[1:3], device=unit.device)
    down = (unit[:, 1:] * unit[:, :-1]).sum(-1)  # [B, H-1, W]: row i with row i+1
    right = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)  # [B, H, W-1]
    total[:, :-1] += down
    total[:, 1:] += down
    total[:, :, :-1] += right
    total[:, :, 1:] += right
    count[:-1] += 1
    count[1:] += 1
    count[:, :-1] += 1
    count[:, 1:] += 1
    return total / count


@torch.no_grad()
def run_neighbors(inputs: AnalysisInputs, out: Path, *, threshold: Optional[float] = None) -> dict[str, Any]:
    backbone, (height, width) = inputs.backbone, inputs.grid
    similarities, norms = [], []
    for images, _ in inputs.batches("neighbour similarity"):
        embedded = backbone.patch_embed(images)  # [B, HW, D]: before position embeddings and any block
        similarities.append(neighbour_similarity(embedded.reshape(-1, height, width, embedded.shape[-1])).flatten().cpu())
        outputs, _ = backbone.block_outputs(images)
        norms.append(patch_norms(outputs[-1:], backbone.num_register_tokens)[0].flatten().cpu())
    similarity, norm = torch.cat(similarities), torch.cat(norms)  # [N * HW] each
    value, source = choose_threshold(norm, threshold)
    outliers = norm > value

    def stats(values: Tensor) -> Optional[dict[str, float]]:
        return {"mean": float(values.mean()), "median": float(values.median())} if values.numel() else None

    result = {"tool": "neighbors", "weights": str(inputs.weights), "images": inputs.images,
              "num_images": similarity.numel() // (height * width), "grid": [height, width],
              "threshold": value if math.isfinite(value) else None, "threshold_source": source,
              "num_outliers": int(outliers.sum()), "num_normal": int((~outliers).sum()),
              "outlier_similarity": stats(similarity[outliers]), "normal_similarity": stats(similarity[~outliers])}
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bins = torch.linspace(float(similarity.min()), float(similarity.max()) + 1e-6, 41).numpy()
    axis.hist(similarity[~outliers].numpy(), bins=bins, density=True, alpha=0.6, label="normal tokens")
    if outliers.any():
        axis.hist(similarity[outliers].numpy(), bins=bins, density=True, alpha=0.6, label="high-norm tokens")
    axis.set(xlabel="cosine similarity to the 4 neighbours (patch embedding)", ylabel="density",
             title="input redundancy of high-norm vs normal tokens")
    axis.legend()
    save_figure(figure, out / "neighbors.png")
    write_json(out / "neighbors.json", result)
    return result


def _summary(result: dict[str, Any]) -> str:
    def mean(key: str) -> str:
        return "n/a" if result[key] is None else f"{result[key]['mean']:.3f}"

    return (f"{result['num_images']} images, neighbour similarity {mean('outlier_similarity')} for "
            f"{result['num_outliers']} high-norm tokens vs {mean('normal_similarity')} for the "
            f"{result['num_normal']} others")


def _add_arguments(parser: Any) -> None:
    parser.add_argument("--threshold", type=float, metavar="NORM",
                        help="high-norm threshold on the output tokens (default: found as by `analyze norms`)")


TOOLS = {
    "neighbors": Tool(help="cosine similarity of each patch to its 4 neighbours: high-norm vs normal tokens",
                      description="How similar each patch's embedding (before position embeddings) is to its 4 "
                                  "neighbours, for patches whose output token is high-norm versus the others "
                                  "(Darcet et al. 2023, Fig. 5a). Writes neighbors.json, neighbors.png.",
                      run=lambda inputs, out, args: run_neighbors(inputs, out, threshold=args.threshold),
                      summary=_summary, add_arguments=_add_arguments),
}
