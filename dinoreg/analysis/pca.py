"""``pca``: the first principal components of the output patch features as colours (Darcet et al. 2023, Fig. 15;
the DINOv2 visualisation).

One PCA is fitted on the last layer's normalised patch features (``x_norm_patchtokens``) of all analysed
images together, from the exact covariance (float64 eigendecomposition of the centred features). Components 1-3
become red, green and blue, each min-max scaled over the whole dataset, so colours compare across images.
The components' signs are fixed: the first is oriented so that patches on the image border (mostly background)
score lower on average than the others; the second and third so that their largest loading is positive.

With ``--foreground-threshold T`` (in [0, 1]), as in DINOv2: patches whose first component, min-max scaled over
the dataset, exceeds ``T`` are foreground; a second PCA is fitted on the foreground patches alone and shown as
colours there, the background black.

Figures: ``pca_maps.png`` (rows: images; their components 1-3 as RGB; with a threshold also the scaled first
component with its colour bar and the foreground's own PCA as RGB) and ``pca_variance.png`` (explained variance
ratio per component). All features are held in memory: ``num_images * H * W * D`` floats.

``pca.json`` keys: ``tool``, ``weights``, ``images``, ``num_images``, ``grid`` ([H, W] patches), ``feature_dim``,
``num_patches`` (all images together), ``explained_variance_ratio`` (of the first ``NUM_REPORTED`` components,
fraction of the total variance), ``cumulative_explained_variance_ratio``, and ``foreground``: null without a
threshold, else ``{"threshold", "fraction"`` (of all patches), ``"fraction_per_image"``,
``"explained_variance_ratio"`` (of the foreground PCA)``}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from dinoreg.analysis.common import AnalysisError, AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.run_dir import write_json

__all__ = ["NUM_REPORTED", "TOOLS", "PrincipalComponents", "min_max", "orient_first_component", "patch_features",
           "principal_components", "run_pca"]

NUM_REPORTED = 10
MAPS_SHOWN = 6


class PrincipalComponents(NamedTuple):
    mean: Tensor  # [D]
    components: Tensor  # [k, D], orthonormal rows, by decreasing variance
    explained_variance_ratio: Tensor  # [k], each component's share of the total variance

    def project(self, features: Tensor) -> Tensor:
        """``features`` ``[M, D]`` -> scores ``[M, k]``."""
        return (features.double() - self.mean) @ self.components.T


def principal_components(features: Tensor, *, num_components: int) -> PrincipalComponents:
    """Exact PCA of ``features`` ``[M, D]`` (float64 covariance); signs make each component's largest loading
    positive, so the result is deterministic."""
    count, dim = features.shape
    if count < 2:
        raise ValueError(f"PCA needs at least 2 feature vectors, got {count}")
    num_components = min(num_components, dim)
    samples = features.double()
    mean = samples.mean(0)  # [D]
    centred = samples - mean
    covariance = centred.T @ centred / (count - 1)  # [D, D]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp_min(0)
    components = eigenvectors.flip(1).T[:num_components]  # [k, D]
    largest = components.abs().argmax(1)
    components = components * components.gather(1, largest[:, None]).sign()
    total = eigenvalues.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return PrincipalComponents(mean=mean, components=components,
                               explained_variance_ratio=eigenvalues[:num_components] / total)


def orient_first_component(pca: PrincipalComponents, scores: Tensor, *, grid: tuple[int, int]) -> tuple[
        PrincipalComponents, Tensor]:
    """Flip component 1 (and its scores ``[N * H * W, k]``) so that border patches score lower on average than
    interior ones: objects sit mostly inside the frame, so foreground is high. Grids without interior keep it."""
    height, width = grid
    if height < 3 or width < 3:
        return pca, scores
    first = scores[:, 0].reshape(-1, height, width)  # [N, H, W]
    interior = torch.zeros(height, width, dtype=torch.bool)
    interior[1:-1, 1:-1] = True
    if first[:, ~interior].mean() <= first[:, interior].mean():
        return pca, scores
    flip = torch.ones(scores.shape[1], dtype=scores.dtype)
    flip[0] = -1
    return pca._replace(components=pca.components * flip[:, None]), scores * flip


def min_max(values: Tensor) -> Tensor:
    """Scale each column of ``values`` ``[M, k]`` to [0, 1] over the rows (a constant column becomes 0)."""
    low, high = values.amin(0), values.amax(0)
    return (values - low) / (high - low).clamp_min(1e-12)


@torch.no_grad()
def patch_features(inputs: AnalysisInputs) -> tuple[Tensor, Tensor]:
    """``(features [N, HW, D] float32 on the CPU, indices [N])``: the normalised output patch tokens."""
    all_features, all_indices = [], []
    for images, indices in inputs.batches("patch features"):
        output = inputs.backbone.forward_features(images)
        all_features.append(output["x_norm_patchtokens"].float().cpu())  # [B, HW, D]
        all_indices.append(indices)
    if not all_indices:
        raise AnalysisError(f"--images {inputs.images}: no images to analyse")
    return torch.cat(all_features), torch.cat(all_indices)


def _plot_maps(inputs: AnalysisInputs, indices: Tensor, rows: list[tuple[str, Tensor, Optional[str]]],
               out: Path) -> None:
    """``rows``: (label, maps ``[shown, H, W]`` scalar or ``[shown, H, W, 3]`` RGB, colour-bar label or None)."""
    plt = pyplot()
    shown, size = len(indices), inputs.image_size
    pictures = inputs.raw_images(indices.tolist())
    rows = [("image", pictures, None)] + rows
    figure, axes = plt.subplots(len(rows), shown, figsize=(2.3 * shown, 2.2 * len(rows)), squeeze=False,
                             layout="constrained")
    for row, (label, maps, colour_label) in enumerate(rows):
        for column in range(shown):
            axis = axes[row, column]
            extent = None if row == 0 else (0, size, size, 0)
            image = axis.imshow(maps[column].numpy(), cmap="viridis", interpolation="nearest", extent=extent,
                                vmin=0, vmax=1)
            if colour_label:
                figure.colorbar(image, ax=axis, fraction=0.046, pad=0.03, label=colour_label)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"image {int(indices[column])}")
        axes[row, 0].set_ylabel(label)
    figure.suptitle("output patch features: principal components 1-3 as red, green, blue")
    save_figure(figure, out / "pca_maps.png")


def _plot_variance(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    series = [("all patches", result["explained_variance_ratio"])]
    if result["foreground"]:
        series.append(("foreground patches", result["foreground"]["explained_variance_ratio"]))
    width = 0.8 / len(series)
    for offset, (label, ratios) in enumerate(series):
        positions = [i + 1 + (offset - (len(series) - 1) / 2) * width for i in range(len(ratios))]
        axis.bar(positions, ratios, width=width, label=label)
    axis.set(xlabel="principal component", ylabel="explained variance ratio",
             title=f"PCA of output patch features, {result['num_images']} images")
    axis.set_xticks(range(1, len(result["explained_variance_ratio"]) + 1))
    axis.legend()
    save_figure(figure, out / "pca_variance.png")


def run_pca(inputs: AnalysisInputs, out: Path, *, foreground_threshold: Optional[float] = None) -> dict[str, Any]:
    """PCA of the output patch features of all images; components 1-3 as RGB (optionally foreground only)."""
    if foreground_threshold is not None and not 0.0 <= foreground_threshold < 1.0:
        raise AnalysisError(f"--foreground-threshold {foreground_threshold}: the first component is min-max scaled "
                            "to [0, 1]; pass a threshold in [0, 1), e.g. 0.5")
    features, indices = patch_features(inputs)  # [N, HW, D]
    count, (height, width) = len(indices), inputs.grid
    flat = features.flatten(0, 1)  # [N * HW, D]
    if flat.shape[0] <= 3:
        raise AnalysisError(f"only {flat.shape[0]} patches: use more images (--max-images) or a larger --img-size")
    pca = principal_components(flat, num_components=NUM_REPORTED)
    pca, scores = orient_first_component(pca, pca.project(flat), grid=(height, width))  # scores [N * HW, k]
    rgb = min_max(scores[:, :3]).float()  # [N * HW, 3]
    ratios = pca.explained_variance_ratio.tolist()
    result = {"tool": "pca", "weights": str(inputs.weights), "images": inputs.images, "num_images": count,
              "grid": [height, width], "feature_dim": flat.shape[1], "num_patches": flat.shape[0],
              "explained_variance_ratio": ratios,
              "cumulative_explained_variance_ratio": torch.tensor(ratios).cumsum(0).tolist(), "foreground": None}
    shown = min(MAPS_SHOWN, count)
    rows = [("components 1-3 (RGB)", rgb.reshape(count, height, width, 3)[:shown], None)]
    if foreground_threshold is not None:
        first = min_max(scores[:, :1])[:, 0].float()  # [N * HW]
        foreground = first > foreground_threshold
        if int(foreground.sum()) <= 3:
            raise AnalysisError(f"--foreground-threshold {foreground_threshold} leaves {int(foreground.sum())} "
                                "foreground patches, too few for a PCA; lower the threshold")
        second = principal_components(flat[foreground], num_components=NUM_REPORTED)
        foreground_rgb = torch.zeros_like(rgb)
        foreground_rgb[foreground] = min_max(second.project(flat[foreground])[:, :3]).float()
        per_image = foreground.reshape(count, -1).float().mean(1)
        result["foreground"] = {"threshold": foreground_threshold, "fraction": float(foreground.float().mean()),
                                "fraction_per_image": per_image.tolist(),
                                "explained_variance_ratio": second.explained_variance_ratio.tolist()}
        rows += [("component 1, scaled", first.reshape(count, height, width)[:shown], "component 1 (min-max)"),
                 ("foreground PCA (RGB)", foreground_rgb.reshape(count, height, width, 3)[:shown], None)]
    out.mkdir(parents=True, exist_ok=True)
    _plot_maps(inputs, indices[:shown], rows, out)
    _plot_variance(result, out)
    write_json(out / "pca.json", result)
    return result


def _add_arguments(parser: Any) -> None:
    parser.add_argument("--foreground-threshold", type=float, metavar="T",
                        help="keep patches whose first component, min-max scaled to [0, 1] over the dataset, exceeds "
                             "T (foreground) and show a second PCA fitted on them, as DINOv2 does (default: no mask)")


def _summary_line(result: dict[str, Any]) -> str:
    ratios = result["explained_variance_ratio"][:3]
    line = (f"{result['num_images']} images, components 1-3 explain "
            + ", ".join(f"{r:.1%}" for r in ratios) + " of the patch-feature variance")
    if result["foreground"]:
        line += f"; {result['foreground']['fraction']:.1%} of patches foreground"
    return line


TOOLS = {
    "pca": Tool(help="first three principal components of the output patch features as RGB maps",
                description="PCA of the last layer's normalised patch features over all analysed images; components "
                            "1-3 shown as red, green, blue per image (Darcet et al. 2023, Fig. 15), optionally on the "
                            "foreground only (--foreground-threshold, as in DINOv2). Writes pca.json, pca_maps.png, "
                            "pca_variance.png.",
                run=lambda inputs, out, args: run_pca(inputs, out, foreground_threshold=args.foreground_threshold),
                summary=_summary_line, add_arguments=_add_arguments),
}
