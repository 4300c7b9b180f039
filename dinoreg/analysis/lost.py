"""`dinoreg analyze lost`: LOST unsupervised object discovery (Siméoni et al. 2021), scored by CorLoc as in the
registers paper's Table 3 (Darcet et al. 2023).

Per image, on the patch features ``f`` ``[HW, D]`` (by default the keys of the last block's attention, heads
concatenated, as LOST; cls and register tokens dropped):

1. similarity ``A = f f^T`` ``[HW, HW]``;
2. degree ``d_p`` = number of *other* patches ``q`` with ``A[p, q] > 0`` (the diagonal is not counted);
3. seed = the patch of lowest degree (ties: the first in row-major order): an object covers fewer patches than
   the background, so its patches correlate positively with fewer others;
4. expansion: among the ``k_patches`` lowest-degree patches (the seed included), keep those with
   ``A[seed, q] > 0``;
5. mask: patches whose summed similarity to the kept patches is positive;
6. box: the bounding box of the mask's 4-connected component containing the seed, in pixels of the analysed
   image (patch box x patch size). A seed outside the mask only happens for an all-zero seed feature; the box is
   then the seed patch itself (the reference implementation raises there).

CorLoc is the fraction of images whose box has IoU >= 0.5 with at least one ground-truth box. Ground truth comes
from the dataset's ``boxes(i)`` (the synthetic dataset's objects, ``(x0, y0, x1, y1)`` with x1/y1 exclusive),
rescaled from the dataset's image size to the analysed one; a folder of images has none: the boxes are reported
and CorLoc is null.

``lost.json`` keys: ``tool``, ``weights``, ``images``, ``num_images``, ``grid`` ([H, W] patches), ``patch_size``,
``image_size`` (pixels, the boxes' frame), ``features``, ``k_patches`` (as used, clipped to the patch count),
``ground_truth`` ("dataset boxes" or null), ``corloc`` (fraction in [0, 1], or null without ground truth),
``num_correct`` (or null), ``note`` (one line on what was computed), ``per_image``: a list of ``{"index"``
(dataset index), ``"box"`` ([x0, y0, x1, y1] pixels, x1/y1 exclusive), ``"seed"`` ([row, column] patch),
``"seed_degree"``, ``"mask_patches"`` (patches in the seed's component), ``"gt_boxes"`` (pixels, or null),
``"iou"`` (best IoU with a ground-truth box, or null), ``"correct"`` (iou >= 0.5, or null)``}``.
Figures: ``lost.png`` (images with the predicted box, ground-truth boxes and the seed; degree maps below) and,
with ground truth, ``lost_iou.png`` (histogram of the best IoU per image).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from dinoreg.analysis.common import AnalysisError, AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.argtypes import positive_int
from dinoreg.models.vit import VisionTransformer
from dinoreg.run_dir import write_json

__all__ = ["CORLOC_IOU", "FEATURES", "TOOLS", "LostResult", "box_iou", "connected_component", "lost",
           "patch_features", "run_lost"]

FEATURES = ("keys", "queries", "values", "tokens")
CORLOC_IOU = 0.5  # CorLoc's criterion (LOST, and the object-discovery literature before it)
DEFAULT_K_PATCHES = 100  # LOST's default
MAPS_SHOWN = 6
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), x1/y1 exclusive


@torch.no_grad()
def patch_features(backbone: VisionTransformer, images: Tensor, *, features: str = "keys") -> Tensor:
    """``images [B, 3, S, S]`` -> patch features ``[B, HW, D]`` (registers and cls dropped).

    ``keys``/``queries``/``values``: the last block's attention inputs, heads concatenated (LOST's choice is
    keys); ``tokens``: the output patch tokens after the final norm (``x_norm_patchtokens``). For a RoPE backbone the
    blocks before the last run with their RoPE, and the keys / queries are the projection's, before the rotation:
    LOST compares patches with each other by content, and the rotation would weigh every pair by their offset.
    """
    if features not in FEATURES:
        raise AnalysisError(f"--features {features!r} is unknown; choose one of {', '.join(FEATURES)}")
    first_patch = 1 + backbone.num_register_tokens
    if features == "tokens":
        return backbone.forward_features(images)["x_norm_patchtokens"]
    tokens = backbone.prepare_tokens_with_masks(images)  # [B, 1 + R + HW, D]
    for block, rope in zip(backbone.blocks[:-1], backbone.positions(images)):  # RoPE backbones: each block's rope
        tokens = block(tokens, rope)
    last = backbone.blocks[-1]
    # The qkv output is laid out [3, heads, head_dim] (see Attention._split_heads): chunking in 3 concatenates heads.
    qkv = last.attn.qkv(last.norm1(tokens))  # [B, N, 3D]
    query, key, value = qkv.chunk(3, dim=-1)  # 3 x [B, N, D]
    chosen = {"keys": key, "queries": query, "values": value}[features]
    return chosen[:, first_patch:]


def connected_component(mask: Tensor, start: tuple[int, int]) -> Tensor:
    """The 4-connected component of ``mask [H, W]`` (bool) containing ``start`` (row, column), as ``[H, W]``
    bool; empty when ``start`` is not in the mask."""
    inside = mask.bool().cpu().tolist()
    height, width = len(inside), len(inside[0])
    component = torch.zeros(height, width, dtype=torch.bool)
    if not inside[start[0]][start[1]]:
        return component
    seen = {start}
    queue = deque([start])
    while queue:
        row, column = queue.popleft()
        component[row, column] = True
        for next_row, next_column in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
            if (0 <= next_row < height and 0 <= next_column < width and inside[next_row][next_column]
                    and (next_row, next_column) not in seen):
                seen.add((next_row, next_column))
                queue.append((next_row, next_column))
    return component


@dataclass(frozen=True)
class LostResult:
    seed: tuple[int, int]  # (row, column) on the patch grid
    degree: Tensor  # [H, W] number of positively correlated other patches
    mask: Tensor  # [H, W] bool: summed similarity to the expanded seed set is positive
    component: Tensor  # [H, W] bool: the mask's component containing the seed (the seed alone if none)
    patch_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in patches, x1/y1 exclusive

    def box(self, patch_size: int) -> Box:
        """The box in pixels of the analysed image."""
        return tuple(float(value * patch_size) for value in self.patch_box)  # type: ignore[return-value]


def lost(features: Tensor, *, grid: tuple[int, int], k_patches: int = DEFAULT_K_PATCHES) -> LostResult:
    """LOST on one image's patch features ``[HW, D]`` laid out row-major on ``grid`` (H, W)."""
    height, width = grid
    if features.shape[0] != height * width:
        raise ValueError(f"{features.shape[0]} patch features do not fill a {height}x{width} grid")
    features = features.float()
    similarity = features @ features.T  # [HW, HW]
    positive = similarity > 0
    positive.fill_diagonal_(False)
    degree = positive.sum(dim=1)  # [HW]
    order = torch.sort(degree, stable=True).indices  # lowest degree first; ties keep row-major order
    seed = int(order[0])
    candidates = order[:max(1, min(k_patches, height * width))]
    similar = candidates[similarity[seed, candidates] > 0]  # includes the seed unless its feature is zero
    mask = (similarity[similar].sum(dim=0) > 0).reshape(height, width).cpu()
    seed_position = (seed // width, seed % width)
    component = connected_component(mask, seed_position)
    if not component.any():  # all-zero seed feature: nothing correlates with it
        component[seed_position] = True
    rows = component.any(dim=1).nonzero().flatten()
    columns = component.any(dim=0).nonzero().flatten()
    patch_box = (int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1)
    return LostResult(seed=seed_position, degree=degree.reshape(height, width).cpu(), mask=mask,
                      component=component, patch_box=patch_box)


def box_iou(box: Sequence[float], other: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (x1/y1 exclusive); 0 for empty boxes."""
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    intersection = max(width, 0.0) * max(height, 0.0)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - intersection
    return float(intersection / union) if union > 0 else 0.0


def ground_truth_boxes(dataset: Any, index: int, *, image_size: int) -> Optional[list[Box]]:
    """The dataset's boxes for image ``index`` in pixels of the analysed ``image_size``, or None when the
    dataset has no boxes (an image folder)."""
    if not callable(getattr(dataset, "boxes", None)) or not getattr(dataset, "image_size", None):
        return None
    scale = image_size / dataset.image_size  # square images, resized whole (no crop)
    return [tuple(float(value * scale) for value in box) for box in dataset.boxes(index)]  # type: ignore[misc]


def _figure(inputs: AnalysisInputs, out: Path, records: list[dict[str, Any]], degrees: list[Tensor]) -> None:
    plt = pyplot()
    from matplotlib.patches import Rectangle  # noqa: PLC0415 (start-up: matplotlib)

    shown = min(MAPS_SHOWN, len(records))
    pictures = inputs.raw_images([record["index"] for record in records[:shown]])
    patch = inputs.backbone.patch_size
    figure, axes = plt.subplots(2, shown, figsize=(3.4 * shown, 6.4), squeeze=False,
                                 layout="constrained")
    for column, record in enumerate(records[:shown]):
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(pictures[column].numpy(), extent=(0, inputs.image_size, inputs.image_size, 0))
        for box in record["gt_boxes"] or []:
            top.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, edgecolor="lime",
                                    linewidth=1.5, linestyle="--", label="ground truth"))
        x0, y0, x1, y1 = record["box"]
        top.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=2,
                                label="LOST box"))
        row, col = record["seed"]
        top.add_patch(Rectangle((col * patch, row * patch), patch, patch, color="yellow", alpha=0.6, label="seed"))
        iou = "" if record["iou"] is None else f", IoU {record['iou']:.2f}"
        top.set(title=f"image {record['index']}{iou}", xlabel="x (pixels)", ylabel="y (pixels)")
        image = bottom.imshow(degrees[column].numpy(), cmap="viridis")
        bottom.plot([col], [row], marker="x", color="red", markersize=10, mew=2)
        figure.colorbar(image, ax=bottom, fraction=0.046, label="degree")
        bottom.set(xlabel="patch column", ylabel="patch row", title="degree map, seed x")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    figure.legend(unique.values(), unique.keys(), loc="upper center", ncol=len(unique), bbox_to_anchor=(0.5, 1.06))
    save_figure(figure, out / "lost.png")
    ious = [record["iou"] for record in records if record["iou"] is not None]
    if ious:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.hist(ious, bins=20, range=(0, 1), color="tab:blue")
        axis.axvline(CORLOC_IOU, color="tab:red", linestyle="--", label=f"CorLoc threshold {CORLOC_IOU}")
        axis.set(xlabel="best IoU with a ground-truth box", ylabel="images", title="LOST boxes")
        axis.legend()
        save_figure(figure, out / "lost_iou.png")


def run_lost(inputs: AnalysisInputs, out: Path, *, features: str = "keys",
             k_patches: int = DEFAULT_K_PATCHES) -> dict[str, Any]:
    """LOST boxes for every image, CorLoc against the dataset's boxes when it has them."""
    if k_patches < 1:
        raise AnalysisError(f"--k-patches must be a positive number of patches, got {k_patches}")
    height, width = inputs.grid
    patch = inputs.backbone.patch_size
    records, degrees = [], []
    for images, indices in inputs.batches("LOST"):
        batch_features = patch_features(inputs.backbone, images, features=features)  # [B, HW, D]
        for image_features, index in zip(batch_features, indices.tolist()):
            found = lost(image_features, grid=(height, width), k_patches=k_patches)
            box = found.box(patch)
            truth = ground_truth_boxes(inputs.dataset, index, image_size=inputs.image_size)
            iou = max((box_iou(box, other) for other in truth), default=0.0) if truth is not None else None
            records.append({"index": index, "box": list(box), "seed": list(found.seed),
                            "seed_degree": int(found.degree[found.seed]),
                            "mask_patches": int(found.component.sum()),
                            "gt_boxes": None if truth is None else [list(other) for other in truth],
                            "iou": iou, "correct": None if iou is None else iou >= CORLOC_IOU})
            if len(degrees) < MAPS_SHOWN:
                degrees.append(found.degree)
    if not records:
        raise AnalysisError(f"--images {inputs.images} holds no images")
    scored = [record for record in records if record["correct"] is not None]
    has_truth = len(scored) == len(records)
    correct = sum(record["correct"] for record in scored)
    note = (f"CorLoc: fraction of images whose LOST box has IoU >= {CORLOC_IOU} with a ground-truth box"
            if has_truth else "the images have no ground-truth boxes: LOST boxes only, CorLoc not computed")
    result = {"tool": "lost", "weights": str(inputs.weights), "images": inputs.images, "num_images": len(records),
              "grid": [height, width], "patch_size": patch, "image_size": inputs.image_size, "features": features,
              "k_patches": min(k_patches, height * width), "ground_truth": "dataset boxes" if has_truth else None,
              "corloc": correct / len(records) if has_truth else None,
              "num_correct": correct if has_truth else None, "note": note, "per_image": records}
    _figure(inputs, out, records, degrees)
    write_json(out / "lost.json", result)
    return result


def _summary(result: dict[str, Any]) -> str:
    head = f"{result['num_images']} images, {result['features']}, k={result['k_patches']}"
    if result["corloc"] is None:
        return f"{head}: boxes only (the images have no ground-truth boxes, CorLoc not computed)"
    return f"{head}: CorLoc {result['corloc']:.1%} ({result['num_correct']}/{result['num_images']})"


def _add_arguments(parser: Any) -> None:
    parser.add_argument("--features", choices=FEATURES, default="keys",
                        help="patch features: the last block's attention keys (LOST's choice), queries or values "
                             "(heads concatenated), or the output tokens after the final norm (default: %(default)s)")
    parser.add_argument("--k-patches", type=positive_int, default=DEFAULT_K_PATCHES, metavar="K",
                        help="seed expansion looks at the K lowest-degree patches, clipped to the number of patches "
                             "(default: %(default)s, as LOST)")


TOOLS = {
    "lost": Tool(help="LOST unsupervised object discovery: one box per image, CorLoc against ground-truth boxes",
                 description="LOST (Siméoni et al. 2021) on the last block's attention keys: the lowest-degree "
                             "patch seeds an object, its positively correlated low-degree patches expand it, and "
                             "the box bounds the seed's connected component. CorLoc (IoU >= 0.5 with a ground-truth "
                             "box) when the images have boxes (the synthetic dataset), as in Table 3 of Darcet et "
                             "al. 2023. Writes lost.json, lost.png and, with ground truth, lost_iou.png.",
                 run=lambda inputs, out, args: run_lost(inputs, out, features=args.features,
                                                        k_patches=args.k_patches),
                 summary=_summary, add_arguments=_add_arguments),
}
