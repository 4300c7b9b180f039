"""What high-norm ("outlier") output tokens hold, by linear probes (Darcet et al. 2023, Fig. 5b and Table 1):
``probe``.

The outliers are the output patch tokens whose norm (residual stream, before the final LayerNorm, as in
:mod:`dinoreg.analysis.norms`) exceeds ``--threshold`` (default: found between the two modes of the norms; none
without a second mode). The probes read the tokens *after* the final norm (``x_norm_patchtokens``,
``x_norm_clstoken``), as a downstream user gets them:

* position: a linear classifier token -> its grid position (H*W classes); top-1 accuracy and the mean Euclidean
  distance, in patches, between the predicted and the true position;
* reconstruction: a linear regression token -> the pixels of its input patch (``patch_size**2 * 3`` values, the
  model's input, i.e. normalised by the ImageNet mean and std); mean squared error;
* classification (Table 1): a linear classifier on the images' labels (``dataset.targets``) from the cls token,
  from the image's highest-norm token (an outlier) and from one random normal token of the same image.

Position and reconstruction compare every outlier token with as many normal tokens, drawn at random from the same
images (each image gives as many normal tokens as it has outliers); a model without outliers is probed on
``NORMAL_PER_IMAGE_WITHOUT_OUTLIERS`` normal tokens per image, and its outlier rows are skipped (null). The
images are split once into fit and held-out images (``--heldout-fraction``, per class where there are labels,
:func:`dinoreg.eval.linear.heldout_split`); every probe is fitted on the fit images' tokens and scored on the
held-out images' tokens. Classification uses the images that hold an outlier (all images when none does), so
that its three rows are scored on the same images.

Every probe is an ``nn.Linear`` from N(0, 0.01) weights and zero bias, trained by Adam (constant ``--lr``) on
minibatches of ``--probe-batch-size`` tokens for ``--epochs`` epochs, seeded: raw features, no standardisation
(standardising would blow up the residual variation of nearly constant tokens into unit-scale features).

``probe.json`` keys:
  tool, weights, images, num_images, grid, patch_size, num_register_tokens
  threshold (null: no outliers), threshold_source ("given" or "automatic"), num_outliers,
  num_images_with_outliers
  split: {heldout_fraction, fit_images, heldout_images, per_class (stratified by label), seed}
  training: {optimizer, lr, epochs, batch_size, init}
  normal_per_image: how many normal tokens each image gives to position and reconstruction (null: as many as
    its outliers)
  position: {outlier, normal}, each null (skipped) or {top1, mean_distance, fit_tokens, heldout_tokens, chance}
  reconstruction: {outlier, normal}, each null or the held-out MSE
  reconstruction_baseline: {outlier, normal}: the held-out MSE of predicting the fit tokens' mean pixels
  classification: {cls, outlier, normal} top-1 accuracies (each null when skipped), or null without labels
  classification_note: why classification is null, else null
  classification_images: {fit, heldout, num_classes} or null
  skipped: [{"item": "position.outlier", "reason": ...}, ...]: every null row above and why
Figure ``probe.png``: grouped bars (outlier, normal, cls) for position top-1, position distance, reconstruction
MSE and classification top-1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoreg.analysis.common import AnalysisError, AnalysisInputs, Tool, pyplot, save_figure
from dinoreg.analysis.norms import choose_threshold, layer_norms
from dinoreg.eval.linear import heldout_split
from dinoreg.run_dir import write_json

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_HELDOUT_FRACTION", "DEFAULT_LR", "DEFAULT_PROBE_BATCH_SIZE",
           "NORMAL_PER_IMAGE_WITHOUT_OUTLIERS", "TOOLS", "fit_linear", "patchify", "position_scores", "run_probe",
           "select_tokens"]

DEFAULT_EPOCHS = 100
DEFAULT_LR = 1e-3
DEFAULT_PROBE_BATCH_SIZE = 256
DEFAULT_HELDOUT_FRACTION = 0.25
NORMAL_PER_IMAGE_WITHOUT_OUTLIERS = 8
GROUPS = ("outlier", "normal")


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, 3, S, S]`` -> ``[B, HW, 3 * p * p]``: each patch's pixels, patches in the tokens' (row-major) order."""
    batch, channels, height, width = images.shape
    rows, columns = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, columns, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, channels * patch_size * patch_size)


def select_tokens(outliers: Tensor, norms: Tensor, *, normal_per_image: Optional[int], seed: int
                  ) -> dict[str, Tensor]:
    """Which tokens the probes read, from ``outliers`` ``[N, HW]`` bool and ``norms`` ``[N, HW]``.

    Returns ``outlier`` and ``normal`` ``[N, HW]`` bool masks (position and reconstruction: every outlier, and per
    image ``normal_per_image`` random normal tokens, or as many as the image's outliers when None) and
    ``top_outlier``, ``one_normal`` ``[N]`` long (classification: the image's highest-norm token when it is an
    outlier, one random normal token; -1 where there is none).
    """
    generator = torch.Generator().manual_seed(seed)
    normal = torch.zeros_like(outliers)
    one_normal = torch.full((outliers.shape[0],), -1, dtype=torch.long)
    for image in range(outliers.shape[0]):
        candidates = (~outliers[image]).nonzero().flatten()  # [M] positions of the normal tokens
        shuffled = candidates[torch.randperm(candidates.numel(), generator=generator)]
        wanted = int(outliers[image].sum()) if normal_per_image is None else normal_per_image
        normal[image, shuffled[:wanted]] = True
        if shuffled.numel():
            one_normal[image] = shuffled[0]
    top = norms.argmax(dim=1)  # [N]
    has_outlier = outliers.any(dim=1)
    return {"outlier": outliers.clone(), "normal": normal, "one_normal": one_normal,
            "top_outlier": torch.where(has_outlier, top, torch.full_like(top, -1))}


@torch.no_grad()
def _gather(inputs: AnalysisInputs, selection: dict[str, Tensor], indices: Tensor) -> dict[str, Any]:
    """The second pass: the selected output tokens (after the final norm) and their pixels, on the CPU."""
    backbone = inputs.backbone
    first_patch = 1 + backbone.num_register_tokens
    groups: dict[str, dict[str, list[Tensor]]] = {g: {"tokens": [], "pixels": [], "positions": [], "rows": []}
                                                  for g in GROUPS}
    single: dict[str, list[Tensor]] = {"cls": [], "top_outlier": [], "one_normal": []}
    offset = 0
    for images, batch_indices in inputs.batches("probe features"):
        rows = torch.arange(offset, offset + len(batch_indices))
        if not torch.equal(batch_indices, indices[rows]):
            raise RuntimeError("the images came in another order than in the norm pass; the loader must not shuffle")
        offset += len(batch_indices)
        outputs, _ = backbone.block_outputs(images)
        normed = backbone.final_norm(outputs[-1]).float().cpu()  # [B, 1 + R + HW, D]
        patches = normed[:, first_patch:]  # [B, HW, D]: x_norm_patchtokens
        pixels = patchify(images.float().cpu(), backbone.patch_size)  # [B, HW, 3 p p]
        for group in GROUPS:
            mask = selection[group][rows]  # [B, HW] bool
            where = mask.nonzero()  # [k, 2]: (image in batch, position), row-major
            groups[group]["tokens"].append(patches[mask])
            groups[group]["pixels"].append(pixels[mask])
            groups[group]["positions"].append(where[:, 1])
            groups[group]["rows"].append(rows[where[:, 0]])
        single["cls"].append(normed[:, 0])
        for name in ("top_outlier", "one_normal"):
            position = selection[name][rows].clamp_min(0)  # [B]; -1 rows are masked out later
            single[name].append(patches[torch.arange(len(rows)), position])
    gathered: dict[str, Any] = {g: {key: torch.cat(parts) for key, parts in groups[g].items()} for g in GROUPS}
    gathered.update({name: torch.cat(parts) for name, parts in single.items()})  # [N, D] each
    return gathered


def fit_linear(features: Tensor, targets: Tensor, *, out_dim: int, classification: bool, epochs: int, lr: float,
               batch_size: int, seed: int) -> nn.Linear:
    """A linear probe ``features`` ``[n, D]`` -> ``targets`` (``[n]`` class ids, cross-entropy; or ``[n, out_dim]``
    values, MSE), trained by Adam on seeded minibatches, on ``features``' device."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(features.shape[1], out_dim)
    nn.init.normal_(layer.weight, mean=0.0, std=0.01, generator=generator)
    nn.init.zeros_(layer.bias)
    layer.to(features.device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    loss_function = F.cross_entropy if classification else F.mse_loss
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(features.shape[0], generator=generator).split(batch_size):
                batch = batch.to(features.device)
                loss = loss_function(layer(features[batch]), targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return layer.eval()


def position_scores(predicted: Tensor, true: Tensor, *, width: int) -> dict[str, float]:
    """Top-1 accuracy and mean Euclidean distance (in patches) of predicted vs true row-major positions ``[n]``."""
    rows = (predicted // width - true // width).double()
    columns = (predicted % width - true % width).double()
    return {"top1": float((predicted == true).double().mean()),
            "mean_distance": float((rows.square() + columns.square()).sqrt().mean())}


class _Probes:
    """Fits and scores the probes with one training setting and one image split."""

    def __init__(self, *, heldout: Tensor, device: torch.device, epochs: int, lr: float, batch_size: int,
                 seed: int) -> None:
        self.heldout, self.device, self.seed = heldout, device, seed  # heldout: [N] bool per image
        self.training = {"epochs": epochs, "lr": lr, "batch_size": batch_size}
        self.skipped: list[dict[str, str]] = []

    def split(self, item: str, rows: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Fit and held-out masks ``[n]`` of tokens from images ``rows``; None (and a skip note) when one is empty."""
        held = self.heldout[rows]
        if not rows.numel():
            self.skip(item, "there are no such tokens (no normal token: every output token is above --threshold)")
        elif held.all() or not held.any():
            self.skip(item, f"all {len(rows)} such tokens lie in the {'held-out' if held.all() else 'fit'} images; "
                            "raise --max-images or change --heldout-fraction")
        else:
            return ~held, held
        return None

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": item, "reason": reason})

    def fit(self, features: Tensor, targets: Tensor, *, out_dim: int, classification: bool) -> nn.Linear:
        return fit_linear(features.to(self.device), targets.to(self.device), out_dim=out_dim,
                          classification=classification, seed=self.seed, **self.training)

    def position(self, group: str, data: dict[str, Tensor], grid: tuple[int, int]) -> Optional[dict[str, Any]]:
        masks = self.split(f"position.{group}", data["rows"])
        if masks is None:
            return None
        fit, held = masks
        layer = self.fit(data["tokens"][fit], data["positions"][fit], out_dim=grid[0] * grid[1], classification=True)
        with torch.no_grad():
            predicted = layer(data["tokens"][held].to(self.device)).argmax(dim=-1).cpu()
        return {**position_scores(predicted, data["positions"][held], width=grid[1]), "fit_tokens": int(fit.sum()),
                "heldout_tokens": int(held.sum()), "chance": 1.0 / (grid[0] * grid[1])}

    def reconstruction(self, group: str, data: dict[str, Tensor]) -> tuple[Optional[float], Optional[float]]:
        """``(MSE, MSE of predicting the fit mean)`` on held-out tokens."""
        masks = self.split(f"reconstruction.{group}", data["rows"])
        if masks is None:
            return None, None
        fit, held = masks
        pixels = data["pixels"]
        layer = self.fit(data["tokens"][fit], pixels[fit], out_dim=pixels.shape[1], classification=False)
        with torch.no_grad():
            predicted = layer(data["tokens"][held].to(self.device)).cpu()
        baseline = (pixels[fit].mean(dim=0) - pixels[held]).square().mean()
        return float((predicted - pixels[held]).square().mean()), float(baseline)

    def classification(self, item: str, features: Tensor, labels: Tensor, rows: Tensor) -> Optional[float]:
        masks = self.split(f"classification.{item}", rows)
        if masks is None:
            return None
        fit, held = masks
        layer = self.fit(features[rows][fit], labels[rows][fit], out_dim=int(labels.max()) + 1, classification=True)
        with torch.no_grad():
            predicted = layer(features[rows][held].to(self.device)).argmax(dim=-1).cpu()
        return float((predicted == labels[rows][held]).double().mean())


def _labels(inputs: AnalysisInputs, indices: Tensor) -> tuple[Optional[Tensor], Optional[str]]:
    labels, note = inputs.labels(indices)
    if labels is None:
        return None, note
    if labels.unique().numel() < 2:
        return None, "the images hold a single class; classification needs at least 2 (raise --max-images)"
    return labels, None


def _split_images(labels: Optional[Tensor], *, count: int, fraction: float, seed: int) -> tuple[Tensor, Tensor, bool]:
    """``(fit image rows, held-out image rows, per_class)``: per class where there are labels, unless that holds
    nothing out (every class has a single image); then, like unlabelled images, over all images at once."""
    if labels is not None:
        fit, heldout = heldout_split(labels, fraction=fraction, seed=seed)
        if heldout.numel():
            return fit, heldout, True
    fit, heldout = heldout_split(torch.zeros(count, dtype=torch.long), fraction=fraction, seed=seed)
    return fit, heldout, False


def _classification(probes: _Probes, data: dict[str, Any], selection: dict[str, Tensor], labels: Tensor, *,
                    has_outliers: bool) -> tuple[dict[str, Optional[float]], dict[str, int]]:
    """Table 1: image labels from the cls token, the top outlier and one normal token, all scored on the images
    that hold an outlier (every image when none does)."""
    heldout = probes.heldout
    rows = (selection["top_outlier"] >= 0).nonzero().flatten() if has_outliers else torch.arange(len(labels))  # [M]
    scores = {"cls": probes.classification("cls", data["cls"], labels, rows), "outlier": None}
    if has_outliers:
        scores["outlier"] = probes.classification("outlier", data["top_outlier"], labels, rows)
    else:
        probes.skip("classification.outlier", "the model has no outlier tokens")
    with_normal = rows[selection["one_normal"][rows] >= 0]
    scores["normal"] = probes.classification("normal", data["one_normal"], labels, with_normal)
    return scores, {"fit": int((~heldout[rows]).sum()), "heldout": int(heldout[rows].sum()),
                    "num_classes": int(labels[rows].unique().numel())}


def run_probe(inputs: AnalysisInputs, out: Path, *, threshold: Optional[float] = None, epochs: int = DEFAULT_EPOCHS,
              lr: float = DEFAULT_LR, batch_size: int = DEFAULT_PROBE_BATCH_SIZE,
              heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0) -> dict[str, Any]:
    """Position, reconstruction and classification probes on outlier vs normal (vs cls) output tokens."""
    if not 0.0 < heldout_fraction < 1.0:
        raise AnalysisError(f"--heldout-fraction {heldout_fraction}: must lie strictly between 0 and 1, e.g. 0.25")
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise AnalysisError(f"--epochs {epochs}, --lr {lr}, --probe-batch-size {batch_size}: all must be positive")
    norms, indices = layer_norms(inputs)
    last = norms[-1].flatten(1)  # [N, HW]: output norms before the final LayerNorm
    count = len(indices)
    if count < 2:
        raise AnalysisError(f"only {count} image: the probes need fit and held-out images; raise --max-images")
    value, source = choose_threshold(last, threshold)
    outliers = last > value  # [N, HW]
    num_outliers = int(outliers.sum())
    normal_per_image = None if num_outliers else NORMAL_PER_IMAGE_WITHOUT_OUTLIERS
    selection = select_tokens(outliers, last, normal_per_image=normal_per_image, seed=seed)
    data = _gather(inputs, selection, indices)
    labels, note = _labels(inputs, indices)
    fit_images, heldout_images, per_class = _split_images(labels, count=count, fraction=heldout_fraction, seed=seed)
    heldout = torch.zeros(count, dtype=torch.bool)
    heldout[heldout_images] = True
    probes = _Probes(heldout=heldout, device=inputs.device, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    if not num_outliers:
        why = (f"no output token's norm exceeds the threshold {value:.4g} ({source})" if math.isfinite(value)
               else "the output norms have no second (high-norm) mode: the model has no outlier tokens")
        for item in ("position.outlier", "reconstruction.outlier"):
            probes.skip(item, why)
    probed = GROUPS if num_outliers else ("normal",)
    position = {g: probes.position(g, data[g], inputs.grid) if g in probed else None for g in GROUPS}
    scores = {g: probes.reconstruction(g, data[g]) if g in probed else (None, None) for g in GROUPS}
    reconstruction, baseline = ({g: scores[g][part] for g in GROUPS} for part in (0, 1))
    classification, images_used = None, None
    if labels is None:
        probes.skip("classification", note)
    else:
        classification, images_used = _classification(probes, data, selection, labels, has_outliers=num_outliers > 0)
    result = {
        "tool": "probe", "weights": str(inputs.weights), "images": inputs.images, "num_images": count,
        "grid": list(inputs.grid), "patch_size": inputs.backbone.patch_size,
        "num_register_tokens": inputs.backbone.num_register_tokens,
        "threshold": value if math.isfinite(value) else None, "threshold_source": source,
        "num_outliers": num_outliers, "num_images_with_outliers": int(outliers.any(dim=1).sum()),
        "split": {"heldout_fraction": heldout_fraction, "fit_images": len(fit_images),
                  "heldout_images": len(heldout_images), "per_class": per_class, "seed": seed},
        "training": {"optimizer": "adam", **probes.training, "init": "weights N(0, 0.01), bias 0"},
        "normal_per_image": normal_per_image, "position": position, "reconstruction": reconstruction,
        "reconstruction_baseline": baseline, "classification": classification, "classification_note": note,
        "classification_images": images_used, "skipped": probes.skipped,
    }
    _figure(out / "probe.png", result)
    write_json(out / "probe.json", result)
    return result


def _figure(path: Path, result: dict[str, Any]) -> None:
    plt = pyplot()
    colours = {"outlier": "tab:red", "normal": "tab:blue", "cls": "tab:gray"}
    position, images = result["position"], result["classification_images"]
    classification = result["classification"] or {"cls": None, "outlier": None, "normal": None}
    grid_chance = 1.0 / (result["grid"][0] * result["grid"][1])
    panels = [  # (title, y label, values per token kind, reference line (label, value per token kind))
        ("position", "held-out top-1 accuracy", {g: (position[g] or {}).get("top1") for g in GROUPS},
         ("chance", {g: grid_chance for g in GROUPS})),
        ("position", "mean distance to the true position (patches)",
         {g: (position[g] or {}).get("mean_distance") for g in GROUPS}, None),
        ("pixel reconstruction", "held-out MSE (normalised pixels)", result["reconstruction"],
         ("predicting the mean", result["reconstruction_baseline"])),
        ("image classification", "held-out top-1 accuracy", classification,
         ("chance", {name: 1.0 / images["num_classes"] for name in classification}) if images else None),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6))
    for axis, (title, ylabel, values, reference) in zip(axes, panels):
        names = list(values)
        for slot, name in enumerate(names):
            value = values[name]
            if value is None:
                axis.text(slot, 0, "n/a", ha="center", va="bottom")
                continue
            axis.bar(slot, value, color=colours[name])
            axis.text(slot, value, f"{value:.3g}", ha="center", va="bottom", fontsize=8)
        if reference is not None:
            label, levels = reference
            for slot, name in enumerate(names):
                if values[name] is not None and levels.get(name) is not None:
                    axis.plot([slot - 0.4, slot + 0.4], [levels[name]] * 2, color="black", linestyle="--", label=label)
                    label = None  # one legend entry
            if label is None:
                axis.legend(fontsize=8, loc="upper right")
        axis.set_xticks(range(len(names)), names)
        axis.set_xlim(-0.6, len(names) - 0.4)
        axis.set(xlabel="probed token", ylabel=ylabel, title=title)
        shown = [v for v in values.values() if v is not None] + (
            [v for v in reference[1].values() if v is not None] if reference else [])
        top = 1.0 if ylabel.endswith("accuracy") else max(shown, default=0.0)
        axis.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # headroom for the value labels and the legend
    figure.suptitle(f"linear probes on output tokens: {result['num_outliers']} high-norm tokens in "
                    f"{result['num_images']} images")
    figure.tight_layout()
    save_figure(figure, path)


def _add_arguments(parser: Any) -> None:
    parser.add_argument("--threshold", type=float, metavar="NORM",
                        help="high-norm threshold on output norms before the final LayerNorm, e.g. 150 as the paper "
                             "for ViT-L/g (default: found between the two modes of the norms; none with one mode)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help="training epochs of every linear probe (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--probe-batch-size", type=int, default=DEFAULT_PROBE_BATCH_SIZE,
                        help="tokens per probe training step (default: %(default)s)")
    parser.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                        help="fraction of the images (per class where labelled) held out for scoring "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the normal tokens drawn and the probes' training (default: "
                             "%(default)s)")


def _format(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _summary(result: dict[str, Any]) -> str:
    line = f"{result['num_images']} images, {result['num_outliers']} high-norm tokens"
    position, reconstruction = result["position"], result["reconstruction"]
    line += ("; position top-1 outlier {} / normal {}; reconstruction MSE outlier {} / normal {}".format(
        _format((position["outlier"] or {}).get("top1"), ".1%"), _format((position["normal"] or {}).get("top1"), ".1%"),
        _format(reconstruction["outlier"], ".4g"), _format(reconstruction["normal"], ".4g")))
    classification = result["classification"]
    if classification is None:
        return line + "; no classification (no labels)"
    return line + "; classification top-1 cls {} / outlier {} / normal {}".format(
        *(_format(classification[name], ".1%") for name in ("cls", "outlier", "normal")))


TOOLS = {
    "probe": Tool(
        help="linear probes: position, pixels and image class from high-norm vs normal output tokens (and cls)",
        description="What high-norm (outlier) output tokens hold (Darcet et al. 2023, Fig. 5b, Table 1): linear "
                    "probes on the output tokens after the final norm predict each token's grid position and its "
                    "input patch's pixels, for the outliers and as many random normal tokens, and the image's label "
                    "from the cls token, the highest-norm token and a random normal token; scored on held-out "
                    "images. Writes probe.json, probe.png.",
        run=lambda inputs, out, args: run_probe(inputs, out, threshold=args.threshold, epochs=args.epochs, lr=args.lr,
                                                batch_size=args.probe_batch_size,
                                                heldout_fraction=args.heldout_fraction, seed=args.seed),
        summary=_summary, add_arguments=_add_arguments),
}
