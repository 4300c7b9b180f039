"""High-norm "artifact" patch tokens (Darcet et al. 2023): ``norms`` (Fig. 3, 7, 16), ``layers`` (Fig. 4a) and
``positions`` (Fig. 10).

Norms are those of the residual stream, before the final LayerNorm (``x_prenorm``; after it every token has
about the same norm). The threshold separating outliers is given (the paper uses 150 for its ViT-L/g) or
found between the two modes of the log-norm distribution; a distribution without a clear second mode has no
outliers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from dinoreg.analysis.common import AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.metrics.tokens import patch_norms
from dinoreg.run_dir import write_json

__all__ = ["MIN_MODE_RATIO", "TOOLS", "automatic_threshold", "choose_threshold", "layer_norms", "run_layers", "run_norms",
           "run_positions"]

# Two modes count as two only when the upper one is at least this many times the lower (in norm): the paper's
# artifacts are about 10x the other tokens; a unimodal distribution split in two is far closer.
MIN_MODE_RATIO = 4.0
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
MAPS_SHOWN = 6


@torch.no_grad()
def layer_norms(inputs: AnalysisInputs) -> tuple[Tensor, Tensor]:
    """``(norms [L, N, H, W], indices [N])``: the norm of every patch token after every block, residual stream."""
    backbone, (height, width) = inputs.backbone, inputs.grid
    all_norms, all_indices = [], []
    for images, indices in inputs.batches("token norms"):
        outputs, _ = backbone.block_outputs(images)  # L x [B, 1 + R + HW, D]
        norms = patch_norms(outputs, backbone.num_register_tokens)  # [L, B, HW]
        all_norms.append(norms.reshape(len(outputs), -1, height, width).cpu())  # [L, B, H, W]
        all_indices.append(indices)
    return torch.cat(all_norms, dim=1), torch.cat(all_indices)


def automatic_threshold(norms: Tensor) -> float:
    """Otsu's threshold on log norms, kept only if the two classes' geometric means differ by at least
    ``MIN_MODE_RATIO``; ``inf`` (no outliers) otherwise."""
    values = norms.flatten().clamp_min(1e-12).log().sort().values.double()
    count = values.numel()
    if count < 2 or values[0] == values[-1]:
        return math.inf
    prefix = values.cumsum(0)
    low_count = torch.arange(1, count, dtype=torch.float64)  # split after position i: [:i+1] low, rest high
    low_mean = prefix[:-1] / low_count
    high_mean = (prefix[-1] - prefix[:-1]) / (count - low_count)
    between = low_count * (count - low_count) * (high_mean - low_mean) ** 2
    best = int(between.argmax())
    if math.exp(float(high_mean[best] - low_mean[best])) < MIN_MODE_RATIO:
        return math.inf
    return float(((values[best] + values[best + 1]) / 2).exp())


def _summary(norms: Tensor, threshold: float) -> dict[str, Any]:
    flat = norms.flatten().float()
    return {"quantiles": {str(q): float(flat.quantile(q)) for q in QUANTILES},
            "max": float(flat.max()), "outlier_fraction": float((flat > threshold).float().mean())}


def choose_threshold(norms: Tensor, given: Optional[float]) -> tuple[float, str]:
    """``(threshold, "given" | "automatic")``: ``given``, or :func:`automatic_threshold` of ``norms``."""
    return (float(given), "given") if given is not None else (automatic_threshold(norms), "automatic")


def run_norms(inputs: AnalysisInputs, out: Path, *, threshold: Optional[float] = None) -> dict[str, Any]:
    """Output patch-token norms: log histogram with the threshold, per-image norm maps, outlier fraction."""
    plt = pyplot()
    norms, indices = layer_norms(inputs)
    last = norms[-1]  # [N, H, W]
    value, source = choose_threshold(last, threshold)
    outliers = last > value  # [N, H, W]
    result = {"tool": "norms", "weights": str(inputs.weights), "images": inputs.images, "num_images": len(indices),
              "grid": list(inputs.grid), "threshold": value if math.isfinite(value) else None,
              "threshold_source": source, **_summary(last, value),
              "outliers_per_image": outliers.flatten(1).sum(1).tolist(),
              "outlier_positions": [[int(i), int(y), int(x)] for i, y, x in outliers.nonzero().tolist()][:1000]}
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(last.flatten().numpy(), bins=100, log=True, color="tab:blue")
    if math.isfinite(value):
        axis.axvline(value, color="tab:red", linestyle="--", label=f"threshold {value:.1f} ({source})")
        axis.legend()
    axis.set(xlabel="output patch-token norm", ylabel="tokens (log scale)",
             title=f"{result['outlier_fraction']:.2%} high-norm tokens, {len(indices)} images")
    save_figure(figure, out / "norms_histogram.png")
    shown = min(MAPS_SHOWN, len(indices))
    pictures = inputs.raw_images(indices[:shown].tolist())
    figure, axes = plt.subplots(2, shown, figsize=(2.2 * shown, 4.6), squeeze=False)
    for column in range(shown):
        axes[0, column].imshow(pictures[column].numpy())
        image = axes[1, column].imshow(last[column].numpy(), cmap="viridis")
        figure.colorbar(image, ax=axes[1, column], fraction=0.046, label="norm")
        for row in (0, 1):
            axes[row, column].axis("off")
    figure.suptitle("images and their output patch-token norms")
    save_figure(figure, out / "norms_maps.png")
    write_json(out / "norms.json", result)
    return result


def run_layers(inputs: AnalysisInputs, out: Path, *, threshold: Optional[float] = None) -> dict[str, Any]:
    """The norm distribution after every block, and each block's outlier fraction for one threshold (the
    output's, unless given)."""
    plt = pyplot()
    norms, indices = layer_norms(inputs)
    value, source = choose_threshold(norms[-1], threshold)
    layers = [{"layer": i, **_summary(norms[i], value)} for i in range(norms.shape[0])]
    result = {"tool": "layers", "weights": str(inputs.weights), "images": inputs.images, "num_images": len(indices),
              "threshold": value if math.isfinite(value) else None, "threshold_source": source, "layers": layers}
    figure, axis = plt.subplots(figsize=(max(5, 0.5 * len(layers)), 3.5))
    axis.boxplot([norms[i].flatten().numpy() for i in range(len(layers))], whis=(1, 99), showfliers=True,
                 flierprops={"markersize": 2})
    axis.set_yscale("log")
    axis.set(xlabel="block", ylabel="patch-token norm (log scale)", title="norms after each block")
    axis.set_xticks(range(1, len(layers) + 1), [str(i) for i in range(len(layers))])
    save_figure(figure, out / "layers.png")
    write_json(out / "layers.json", result)
    return result


def run_positions(inputs: AnalysisInputs, out: Path, *, threshold: Optional[float] = None) -> dict[str, Any]:
    """How often each grid position holds a high-norm output token."""
    plt = pyplot()
    norms, indices = layer_norms(inputs)
    value, source = choose_threshold(norms[-1], threshold)
    frequency = (norms[-1] > value).float().mean(0)  # [H, W]
    result = {"tool": "positions", "weights": str(inputs.weights), "images": inputs.images,
              "num_images": len(indices), "threshold": value if math.isfinite(value) else None,
              "threshold_source": source, "frequency": frequency.tolist()}
    figure, axis = plt.subplots(figsize=(4.5, 4))
    image = axis.imshow(frequency.numpy(), cmap="magma", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, label="fraction of images with a high-norm token")
    axis.set(xlabel="patch column", ylabel="patch row", title="where high-norm tokens appear")
    save_figure(figure, out / "positions.png")
    write_json(out / "positions.json", result)
    return result


def _add_threshold(parser: Any) -> None:
    parser.add_argument("--threshold", type=float, metavar="NORM",
                        help="high-norm threshold, e.g. 150 as the paper for ViT-L/g (default: found between the "
                             "two modes of the output norms; none when there is a single mode)")


def _summary_line(result: dict[str, Any]) -> str:
    threshold = result["threshold"]
    found = (f"threshold {threshold:.1f} ({result['threshold_source']})" if threshold is not None
             else "no high-norm mode found")
    fraction = result.get("outlier_fraction")
    return f"{result['num_images']} images, {found}" + (f", {fraction:.2%} high-norm tokens" if fraction is not None
                                                         else "")


def _run(function: Any) -> Any:
    return lambda inputs, out, args: function(inputs, out, threshold=args.threshold)


TOOLS = {
    "norms": Tool(help="histogram and per-image maps of output patch-token norms; high-norm (artifact) fraction",
                  description="Output patch-token norms (residual stream, before the final LayerNorm): a log-scale "
                              "histogram with the high-norm threshold, per-image norm maps and the outlier fraction "
                              "(Darcet et al. 2023, Fig. 3, 7, 16). Writes norms.json, norms_histogram.png, "
                              "norms_maps.png.",
                  run=_run(run_norms), summary=_summary_line, add_arguments=_add_threshold),
    "layers": Tool(help="patch-token norm distribution after every block",
                   description="The distribution of patch-token norms after every block, and each block's "
                               "high-norm fraction (Fig. 4a). Writes layers.json, layers.png.",
                   run=_run(run_layers), summary=_summary_line, add_arguments=_add_threshold),
    "positions": Tool(help="how often each grid position holds a high-norm token",
                      description="The fraction of images whose output token at each grid position is high-norm "
                                  "(Fig. 10). Writes positions.json, positions.png.",
                      run=_run(run_positions), summary=_summary_line, add_arguments=_add_threshold),
}
