"""Gradient striping through the positional-embedding resize (Darcet et al. 2023, Fig. 11): ``antialias``.

A model trained on several crop sizes resizes its learned positional embedding (a square grid of
``source x source`` vectors) to each crop's grid. The gradient of the training loss reaches the learned grid
through that resize. Bicubic downsampling without antialiasing reads only the 4 taps nearest to each output
position, so whole source rows and columns get no (or a negative) share of the gradient: the learned embedding
is trained in stripes. With antialiasing the kernel is stretched over the downsampling factor and every source
row gets a similar share.

The tool pushes the gradient of ``loss = sum of the resized embedding's entries`` back through
:func:`dinoreg.models.pos_embed.resample_patch_pos_embed` (offset 0, as the registers models), once with and
once without antialiasing. The resize is linear and acts on every channel alike, so the gradient is the same in
every channel and does not depend on the embedding's values: one number per source position. The striping score
is the coefficient of variation (std / mean) of the per-row (and per-column) sums of that gradient: about 0.96
without and 0.08 with antialiasing for 16 -> 7 (the released models' local crops).

No images are needed; the shared ``--images`` option is accepted and ignored. A RoPE backbone (DINOv3's family) has
no learned positional embedding and resizes nothing for other crop sizes: the tool refuses it in one line.

``antialias.json`` keys:
  tool, weights, embed_dim: the backbone's width
  source_grid, target_grid: ``[rows, columns]`` of the learned and of the resized grid
  model_interpolation: ``{"antialias", "offset"}``, how the backbone itself resizes its embedding
  loss: what was backpropagated
  with_antialias, without_antialias: each ``{"striping_rows", "striping_columns"`` (coefficients of variation),
      ``"row_sums", "column_sums"`` (gradient summed over each source row / column), ``"gradient"`` (the
      ``[source, source]`` gradient, signed: without antialiasing some rows get a negative share)``}``
Figure ``antialias.png``: both gradients as images with colour bars, and their per-row sums.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from dinoreg.analysis.common import AnalysisError, AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.argtypes import positive_int
from dinoreg.models.pos_embed import resample_patch_pos_embed, resample_pos_embed
from dinoreg.run_dir import write_json

__all__ = ["LOCAL_CROP_RATIO", "TOOLS", "default_target_grid", "resize_gradient", "run_antialias", "striping"]

# DINOv2's local crops are 98 px against 224 px global crops: a 7x7 grid for a 16x16 one (patch 14).
LOCAL_CROP_RATIO = 7 / 16
LOSS = "sum of the resized embedding's entries"


def default_target_grid(source: int) -> int:
    """The local-crop grid of a model whose learned grid is ``source`` (16 -> 7, 37 -> 16)."""
    return max(1, round(source * LOCAL_CROP_RATIO))


def resize_gradient(source_embedding: Tensor, target: int, *, antialias: bool) -> Tensor:
    """``[S, S]``: d(sum of the resized entries) / d(source embedding) at each source position.

    ``source_embedding`` is ``[1, S*S, D]``; the gradient is the same in every channel (the resize is linear and
    per channel), so its channel mean is that common value."""
    leaf = source_embedding.detach().float().clone().requires_grad_(True)  # [1, S*S, D]
    resample_patch_pos_embed(leaf, (target, target), antialias=antialias, offset=0.0).sum().backward()
    side = math.isqrt(leaf.shape[1])
    return leaf.grad[0].mean(dim=-1).reshape(side, side)  # [S, S]


def striping(gradient: Tensor) -> dict[str, Any]:
    """Coefficient of variation (unbiased std / mean) of the per-row and per-column sums of ``gradient``
    ``[S, S]``: 0 when every row gets the same share of the gradient."""
    rows, columns = gradient.sum(dim=1).double(), gradient.sum(dim=0).double()  # [S], [S]

    def variation(sums: Tensor) -> float:
        return float(sums.std() / sums.mean()) if sums.numel() > 1 else 0.0

    return {"striping_rows": variation(rows), "striping_columns": variation(columns),
            "row_sums": rows.tolist(), "column_sums": columns.tolist(), "gradient": gradient.double().tolist()}


def _source_embedding(inputs: AnalysisInputs, source: Optional[int]) -> Tensor:
    """The backbone's patch positional embedding ``[1, S*S, D]`` on the ``source`` grid (its own grid by
    default; otherwise resized the way the backbone resizes it)."""
    backbone = inputs.backbone
    if backbone.pos_embed_type != "learned":
        raise AnalysisError(f"{inputs.weights} is a RoPE backbone (DINOv3 family): it has no learned "
                            "positional embedding to resample (RoPE rotates queries and keys by each patch's "
                            "coordinates at any grid), so there is no gradient striping to show; use a "
                            "learned-position (DINOv2-family) backbone")
    pos_embed = backbone.pos_embed.detach().float().cpu()  # [1, 1 + M*M, D]
    own = math.isqrt(pos_embed.shape[1] - 1)
    if source is None or source == own:
        return pos_embed[:, 1:]
    resized = resample_pos_embed(pos_embed, (source, source), antialias=backbone.interpolate_antialias,
                                 offset=backbone.interpolate_offset)
    return resized[:, 1:]


def run_antialias(inputs: AnalysisInputs, out: Path, *, source_grid: Optional[int] = None,
                  target_grid: Optional[int] = None) -> dict[str, Any]:
    """Gradient per source position through the resize with and without antialiasing, and its striping."""
    for option, value in (("--source-grid", source_grid), ("--target-grid", target_grid)):
        if value is not None and value < 1:
            raise AnalysisError(f"{option} {value}: a grid needs at least 1 patch per side; pass a positive integer")
    embedding = _source_embedding(inputs, source_grid)  # [1, S*S, D]
    source = math.isqrt(embedding.shape[1])
    target = target_grid or default_target_grid(source)
    gradients = {setting: resize_gradient(embedding, target, antialias=setting) for setting in (True, False)}
    scores = {setting: striping(gradient) for setting, gradient in gradients.items()}
    backbone = inputs.backbone
    result = {"tool": "antialias", "weights": str(inputs.weights), "embed_dim": int(embedding.shape[-1]),
              "source_grid": [source, source], "target_grid": [target, target],
              "model_interpolation": {"antialias": bool(backbone.interpolate_antialias),
                                      "offset": float(backbone.interpolate_offset)},
              "loss": LOSS, "with_antialias": scores[True], "without_antialias": scores[False]}
    _figure(out / "antialias.png", gradients, scores, source=source, target=target)
    write_json(out / "antialias.json", result)
    return result


def _figure(path: Path, gradients: dict[bool, Tensor], scores: dict[bool, dict[str, Any]], *, source: int,
            target: int) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    for axis, setting in zip(axes[:2], (False, True)):
        gradient = gradients[setting].numpy()
        bound = float(abs(gradient).max()) or 1.0  # diverging scale centred on 0: negative shares show
        image = axis.imshow(gradient, cmap="RdBu_r", vmin=-bound, vmax=bound)
        figure.colorbar(image, ax=axis, label="gradient (same in every channel)")
        name = "with" if setting else "without"
        axis.set(xlabel="source column", ylabel="source row",
                 title=f"{name} antialiasing: striping {scores[setting]['striping_rows']:.2f}")
    rows = range(source)
    for setting, colour in ((False, "tab:red"), (True, "tab:blue")):
        axes[2].plot(rows, scores[setting]["row_sums"], marker="o", markersize=3, color=colour,
                     label=("with" if setting else "without") + " antialiasing")
    axes[2].axhline(0.0, color="grey", linewidth=0.5)
    axes[2].set(xlabel="source row", ylabel="gradient summed over the row", title="per-row gradient")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    axes[2].legend()
    figure.suptitle(f"gradient of sum(resized) reaching a {source}x{source} positional embedding "
                    f"through a bicubic resize to {target}x{target}")
    save_figure(figure, path)


def _add_arguments(parser: Any) -> None:
    parser.add_argument("--source-grid", type=positive_int, metavar="PATCHES",
                        help="side of the learned grid, e.g. 37 as the released models (518 px / 14) (default: the "
                             "backbone's own pos_embed grid)")
    parser.add_argument("--target-grid", type=positive_int, metavar="PATCHES",
                        help="side of the resized grid (default: the local-crop grid, 7/16 of the source: 16 -> 7)")


def _summary(result: dict[str, Any]) -> str:
    source, target = result["source_grid"][0], result["target_grid"][0]
    return (f"{source}x{source} -> {target}x{target}: striping {result['without_antialias']['striping_rows']:.2f} "
            f"without antialiasing, {result['with_antialias']['striping_rows']:.2f} with it")


TOOLS = {
    "antialias": Tool(
        help="gradient striping of the positional embedding through its resize, with and without antialiasing",
        description="Backpropagate sum(resized positional embedding) through the bicubic resize from the learned "
                    "grid to a smaller one, with and without antialiasing, and show the gradient each learned "
                    "position receives and its striping (coefficient of variation of per-row sums; Darcet et al. "
                    "2023, Fig. 11). Uses no images (--images is ignored). Writes antialias.json, antialias.png.",
        run=lambda inputs, out, args: run_antialias(inputs, out, source_grid=args.source_grid,
                                                    target_grid=args.target_grid),
        summary=_summary, add_arguments=_add_arguments),
}
