"""How much the cls output relies on the register tokens rather than on the patches: ``disconnect``.

Two measurements on the same images:

* attention mass: at every block, how the cls token's attention splits between itself, the registers and the
  patches. The attention is recomputed explicitly inside this tool from the block's own ``norm1`` and ``qkv``
  weights (``softmax(q k^T * head_dim**-0.5)``), whatever attention backend the model runs with, and averaged
  over heads and images; the three masses of a block sum to 1.
* ablation: the blocks are run one by one and, from block ``from_layer`` on, the register slice of the token
  tensor is overwritten before every block by zeros (``zero``) or by the registers' mean over the analysed images
  at that block's input (``mean``, from a first, unablated pass). The change of the final cls feature
  (``x_norm_clstoken``) is the mean cosine similarity to the unablated one, and the kNN top-1 accuracy (k = 20,
  T = 0.07) with and without ablation, where the images have labels (``dataset.targets``): the analysed images
  are split into a memory bank and queries, each class's images alternately (its first one in the bank).

The model is never modified: the ablated forward is this module's own loop over ``backbone.blocks``.

``disconnect.json`` keys:
  tool, weights, images, num_images, grid, num_register_tokens
  layers: one ``{"layer", "cls_to_cls", "cls_to_registers", "cls_to_patches"}`` per block (attention mass)
  ablation: ``"zero"`` or ``"mean"``; from_layer: the first ablated block; ablated: whether it was run
  note: why the ablation was not run (a model without registers), else null
  cosine_similarity: mean cosine of ablated and unablated cls features (null when not ablated)
  knn: ``{"k", "temperature", "bank_size", "query_size", "labels"}`` or null without labels; knn_note: why null
  knn_top1_unablated, knn_top1_ablated: top-1 accuracies in [0, 1] (null without labels / ablation)
Figure ``disconnect.png``: the cls attention masses per block as stacked bars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dinoreg.analysis.common import AnalysisError, AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.metrics.knn import knn_classify
from dinoreg.models.vit import VisionTransformer
from dinoreg.run_dir import write_json

__all__ = ["ABLATIONS", "KNN_K", "KNN_TEMPERATURE", "TOOLS", "ablated_cls", "bank_split", "cls_attention_masses",
           "run_disconnect"]

ABLATIONS = ("zero", "mean")
KNN_K, KNN_TEMPERATURE = 20, 0.07
MASS_NAMES = ("cls_to_cls", "cls_to_registers", "cls_to_patches")


def cls_attention_masses(probs: Tensor, num_register_tokens: int) -> Tensor:
    """``[B, 3]``: the cls query's attention ``probs`` ``[B, heads, 1, N]`` summed over itself, the registers
    and the patches, averaged over heads."""
    row = probs[:, :, 0].mean(dim=1)  # [B, N]
    first_patch = 1 + num_register_tokens
    return torch.stack([row[:, 0], row[:, 1:first_patch].sum(dim=-1), row[:, first_patch:].sum(dim=-1)], dim=-1)


@torch.no_grad()
def _reference_pass(inputs: AnalysisInputs) -> dict[str, Tensor]:
    """The unablated pass: per-block cls attention masses and register sums, and the output cls features."""
    backbone = inputs.backbone
    registers = backbone.num_register_tokens
    depth, dim = len(backbone.blocks), backbone.embed_dim
    mass_sum = torch.zeros(depth, 3, dtype=torch.float64)
    register_sum = torch.zeros(depth, registers, dim, dtype=torch.float64)  # float64: the mean of equal values is exact
    cls_features, indices = [], []
    for images, batch_indices in inputs.batches("attention masses"):
        tokens = backbone.prepare_tokens_with_masks(images)  # [B, 1 + R + HW, D]
        for layer, (block, rope) in enumerate(zip(backbone.blocks, backbone.positions(images))):
            probs = block.attention_probs(tokens, num_queries=1, rope=rope)  # [B, heads, 1, N]
            mass_sum[layer] += cls_attention_masses(probs, registers).double().sum(dim=0).cpu()
            register_sum[layer] += tokens[:, 1:1 + registers].double().sum(dim=0).cpu()
            tokens = block(tokens, rope)
        cls_features.append(backbone.final_norm(tokens)[:, 0].float().cpu())  # [B, D]: x_norm_clstoken
        indices.append(batch_indices)
    count = sum(len(i) for i in indices)
    return {"masses": mass_sum / count, "register_means": register_sum / count, "cls": torch.cat(cls_features),
            "indices": torch.cat(indices)}


def ablated_cls(backbone: VisionTransformer, images: Tensor, *, from_layer: int,
                replacements: Tensor) -> Tensor:
    """``x_norm_clstoken`` ``[B, D]`` when the register tokens are overwritten by ``replacements[layer]``
    (``[depth, R, D]``) at the input of every block from ``from_layer`` on."""
    first_patch = 1 + backbone.num_register_tokens
    tokens = backbone.prepare_tokens_with_masks(images)  # [B, 1 + R + HW, D]
    for layer, (block, rope) in enumerate(zip(backbone.blocks, backbone.positions(images))):
        if layer >= from_layer:
            tokens = tokens.clone()  # autograd may have saved the previous output: never overwrite it in place
            tokens[:, 1:first_patch] = replacements[layer].to(tokens)
        tokens = block(tokens, rope)
    return backbone.final_norm(tokens)[:, 0]


def _labels(inputs: AnalysisInputs, indices: Tensor) -> tuple[Optional[Tensor], Optional[str]]:
    labels, note = inputs.labels(indices)
    if labels is None:
        return None, note
    if bank_split(labels).all():
        return None, "kNN needs a class with at least 2 images (one in the bank, one query); raise --max-images"
    return labels, None


def bank_split(labels: Tensor) -> Tensor:
    """``[N]`` bool, True for the memory bank: each class's images alternate between bank and queries (its first
    image in the bank), so that both halves hold every class (a plain alternation would separate the even and odd
    classes of a dataset whose labels cycle)."""
    seen: dict[int, int] = {}
    in_bank = []
    for label in labels.tolist():
        in_bank.append(seen.get(label, 0) % 2 == 0)
        seen[label] = seen.get(label, 0) + 1
    return torch.tensor(in_bank, dtype=torch.bool)


def _knn_top1(features: Tensor, labels: Tensor, bank: Tensor) -> float:
    features = F.normalize(features.float(), dim=-1)  # [N, D]
    row = knn_classify(features[bank], labels[bank], features[~bank], labels[~bank], ks=(KNN_K,),
                       temperature=KNN_TEMPERATURE)[0]
    return row["top1"]


def run_disconnect(inputs: AnalysisInputs, out: Path, *, ablation: str = "zero",
                   from_layer: Optional[int] = None) -> dict[str, Any]:
    """Per-block cls attention masses, and the effect on the cls output of ablating the registers."""
    backbone = inputs.backbone
    depth, registers = len(backbone.blocks), backbone.num_register_tokens
    if ablation not in ABLATIONS:
        raise AnalysisError(f"--ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
    from_layer = depth // 2 if from_layer is None else from_layer
    if not 0 <= from_layer < depth:
        raise AnalysisError(f"--from-layer {from_layer}: the backbone has blocks 0 to {depth - 1}; pick one of them")
    reference = _reference_pass(inputs)
    masses = reference["masses"]  # [depth, 3]
    labels, knn_note = _labels(inputs, reference["indices"])
    bank = None if labels is None else bank_split(labels)  # [N] bool
    result: dict[str, Any] = {
        "tool": "disconnect", "weights": str(inputs.weights), "images": inputs.images,
        "num_images": len(reference["indices"]), "grid": list(inputs.grid), "num_register_tokens": registers,
        "layers": [{"layer": layer, **dict(zip(MASS_NAMES, masses[layer].tolist()))} for layer in range(depth)],
        "ablation": ablation, "from_layer": from_layer, "ablated": registers > 0,
        "note": None if registers else "the model has no register tokens: there is nothing to ablate, and the cls "
                                       "token's attention to registers is 0 by construction",
        "cosine_similarity": None,
        "knn": None if labels is None else {"k": KNN_K, "temperature": KNN_TEMPERATURE,
                                            "bank_size": int(bank.sum()), "query_size": int((~bank).sum()),
                                            "labels": "dataset.targets"},
        "knn_note": knn_note,
        "knn_top1_unablated": None if labels is None else _knn_top1(reference["cls"], labels, bank),
        "knn_top1_ablated": None,
    }
    if registers:
        replacements = reference["register_means"] if ablation == "mean" else torch.zeros_like(
            reference["register_means"])  # [depth, R, D]
        with torch.no_grad():
            ablated = torch.cat([ablated_cls(backbone, images, from_layer=from_layer, replacements=replacements)
                                 .float().cpu() for images, _ in inputs.batches(f"{ablation} ablation")])
        result["cosine_similarity"] = float(F.cosine_similarity(ablated.double(), reference["cls"].double(),
                                                                dim=-1).mean())
        if labels is not None:
            result["knn_top1_ablated"] = _knn_top1(ablated, labels, bank)
    _figure(out / "disconnect.png", masses, registers=registers)
    write_json(out / "disconnect.json", result)
    return result


def _figure(path: Path, masses: Tensor, *, registers: int) -> None:
    plt = pyplot()
    depth = masses.shape[0]
    figure, axis = plt.subplots(figsize=(max(5.0, 0.45 * depth), 3.8))
    bottom = torch.zeros(depth, dtype=torch.float64)
    labels = ("cls itself", f"{registers} registers", "patches")
    for column, (label, colour) in enumerate(zip(labels, ("tab:gray", "tab:red", "tab:blue"))):
        axis.bar(range(depth), masses[:, column].numpy(), bottom=bottom.numpy(), color=colour, label=label)
        bottom += masses[:, column]
    axis.set(xlabel="block", ylabel="cls attention mass (mean over heads, images)", ylim=(0, 1),
             title="where the cls token attends")
    axis.set_xticks(range(depth), [str(i) for i in range(depth)])
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(figure, path)


def _add_arguments(parser: Any) -> None:
    parser.add_argument("--ablation", choices=ABLATIONS, default="zero",
                        help="replace the registers by zeros or by their mean over the images at each block's input "
                             "(default: %(default)s)")
    parser.add_argument("--from-layer", type=int, metavar="BLOCK",
                        help="first block whose input registers are replaced (default: the middle block, depth // 2)")


def _summary(result: dict[str, Any]) -> str:
    last = result["layers"][-1]
    line = f"{result['num_images']} images, last block cls -> registers {last['cls_to_registers']:.1%}"
    if not result["ablated"]:
        return line + ", no registers to ablate"
    line += (f"; {result['ablation']} ablation from block {result['from_layer']}: cls cosine "
             f"{result['cosine_similarity']:.4f}")
    if result["knn_top1_ablated"] is not None:
        line += f", kNN top-1 {result['knn_top1_unablated']:.1%} -> {result['knn_top1_ablated']:.1%}"
    return line


TOOLS = {
    "disconnect": Tool(
        help="cls attention to itself / registers / patches per block, and the cls output with registers ablated",
        description="How much the cls output depends on the registers: the cls token's attention mass on itself, "
                    "the registers and the patches at every block (explicit softmax from the block's weights), and "
                    "the change of the output cls feature (cosine similarity, kNN top-1 where the images have "
                    "labels) when the registers are replaced by zeros or their mean from --from-layer on. Writes "
                    "disconnect.json, disconnect.png.",
        run=lambda inputs, out, args: run_disconnect(inputs, out, ablation=args.ablation, from_layer=args.from_layer),
        summary=_summary, add_arguments=_add_arguments),
}
