"""`dinoreg analyze probe` (Fig. 5b, Table 1) on backbones whose answers are known by construction: planted high-norm
tokens at fixed positions, a backbone whose normal tokens hold their position and pixels linearly while its outliers
are (nearly) constant, and a model without outliers."""

import json
import math

import pytest
import torch
from PIL import Image

from dinoreg.analysis.probe import patchify, position_scores, select_tokens
from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.models.weights import save_backbone

KEYS = {"tool", "weights", "images", "num_images", "grid", "patch_size", "num_register_tokens", "threshold",
        "threshold_source", "num_outliers", "num_images_with_outliers", "split", "training", "normal_per_image",
        "position", "reconstruction", "reconstruction_baseline", "classification", "classification_note",
        "classification_images", "skipped"}
PLANTED = [(0, 0), (2, 3)]  # grid positions (row, column) of a 4x4 grid, as tests/analysis/test_norms.py


def planted_backbone(tmp_path, planted):
    """tests/analysis/test_norms.py's model: a huge vector in the embeddings of the planted positions."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, num_register_tokens=4, init_values=1.0,
                           interpolate_antialias=True, interpolate_offset=0.0)
    with torch.no_grad():
        for row, column in planted:
            model.pos_embed[0, 1 + 4 * row + column] += 300.0 * torch.nn.functional.normalize(torch.randn(192), dim=0)
    path = tmp_path / ("planted.safetensors" if planted else "clean.safetensors")
    save_backbone(model, path)
    return path


def linear_backbone(tmp_path):
    """Identity blocks (zero layer scale) on 4x4 patches of 16x16 images, 192 dims: dims 0-47 hold the patch's
    48 pixels, dims 48-63 a one-hot position of height 100, and the right half of the grid (8 positions) gets a
    distinct 1e5-norm vector in dims 64-191. The final LayerNorm divides a normal token by ~100/sqrt(192) (its
    weight undoes that), so normal tokens are about (pixels, position) up to centering: both linear. An outlier is
    divided by ~1e5/sqrt(192): its pixels shrink to ~1e-3 of a normal token's next to a constant of norm ~100."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=4, img_size=16, depth=1, num_register_tokens=0, init_values=1.0,
                           interpolate_antialias=True, interpolate_offset=0.0)
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.zero_()
            block.ls2.gamma.zero_()
        weight = torch.zeros(192, 48)
        weight[:48] = torch.eye(48)
        model.patch_embed.proj.weight.copy_(weight.view(192, 3, 4, 4))
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.zero_()
        for position in range(16):
            model.pos_embed[0, 1 + position, 48 + position] = 100.0
            if position % 4 >= 2:
                model.pos_embed[0, 1 + position, 64:] = 1e5 * torch.nn.functional.normalize(torch.randn(128), dim=0)
        model.norm.weight.fill_(100.0 / math.sqrt(192))
        model.norm.bias.zero_()
    path = tmp_path / "linear.safetensors"
    save_backbone(model, path)
    return path


def probe(weights, out, *extra, images="synthetic:size=80,image_size=32", max_images=16):
    assert main(["analyze", "probe", "--weights", str(weights), "--images", images, "--max-images", str(max_images),
                 "--batch-size", "8", "--out", str(out), *extra]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert set(result) == KEYS and (out / "probe.png").stat().st_size > 0
    return result


def test_planted_outliers_are_found_and_their_position_is_perfectly_predicted(tmp_path):
    # 20 epochs, not the default 100: the two fixed outlier positions are learnt exactly from 5 on (measured)
    result = probe(planted_backbone(tmp_path, PLANTED), tmp_path / "planted", "--epochs", "20")
    assert result["num_images"] == 16 and result["threshold_source"] == "automatic" and result["threshold"] > 0
    assert result["num_outliers"] == 2 * 16 and result["num_images_with_outliers"] == 16
    assert result["normal_per_image"] is None and result["skipped"] == []
    assert result["split"]["fit_images"] + result["split"]["heldout_images"] == 16 and result["split"]["per_class"]
    outlier = result["position"]["outlier"]
    assert outlier["top1"] == 1.0 and outlier["mean_distance"] == 0.0  # two fixed, distinct positions
    assert outlier["fit_tokens"] + outlier["heldout_tokens"] == 32
    assert result["position"]["normal"]["fit_tokens"] + result["position"]["normal"]["heldout_tokens"] == 32
    assert set(result["reconstruction"]) == {"outlier", "normal"}
    assert all(value > 0 for value in result["reconstruction"].values())
    classification = result["classification"]
    assert set(classification) == {"cls", "outlier", "normal"}
    assert all(0.0 <= value <= 1.0 for value in classification.values())
    assert result["classification_images"]["num_classes"] == 8 and result["classification_note"] is None


def test_linear_normal_tokens_hold_position_and_pixels_constant_outliers_do_not(tmp_path):
    # 32 images (24 fit): 192 fit normal tokens for a probe of ~64 informative dims; a longer, larger-step Adam
    # than the defaults, which are for many more tokens
    result = probe(linear_backbone(tmp_path), tmp_path / "linear", "--lr", "0.03", "--epochs", "150",
                   images="synthetic:size=160,image_size=16", max_images=32)
    assert result["grid"] == [4, 4] and result["num_outliers"] == 8 * 32  # the right half of every image
    position, reconstruction = result["position"], result["reconstruction"]
    assert position["outlier"]["top1"] == 1.0 and position["normal"]["top1"] == 1.0  # measured 1.0 and 1.0
    assert position["normal"]["mean_distance"] == 0.0
    baseline = result["reconstruction_baseline"]
    # measured: normal 0.0162, outlier 1.005, with baselines (predicting the mean) 0.897 and 1.019
    assert reconstruction["normal"] < 0.05 * baseline["normal"]
    assert reconstruction["outlier"] > 0.8 * baseline["outlier"]
    assert reconstruction["outlier"] > 20 * reconstruction["normal"]


def test_a_model_without_outliers_and_images_without_labels(tmp_path):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(8):  # images directly in the folder: label -1
        pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    result = probe(planted_backbone(tmp_path, []), tmp_path / "clean", "--epochs", "10", images=str(folder))
    assert result["threshold"] is None and result["num_outliers"] == 0 and result["normal_per_image"] == 8
    assert result["position"]["outlier"] is None and result["reconstruction"]["outlier"] is None
    assert result["position"]["normal"]["fit_tokens"] + result["position"]["normal"]["heldout_tokens"] == 8 * 8
    assert result["reconstruction"]["normal"] > 0
    assert result["classification"] is None and "no label" in result["classification_note"]
    skipped = {entry["item"]: entry["reason"] for entry in result["skipped"]}
    assert set(skipped) == {"position.outlier", "reconstruction.outlier", "classification"}
    assert "no outlier tokens" in skipped["position.outlier"]


def test_bad_heldout_fraction_is_a_clear_error(tmp_path, capsys):
    weights = planted_backbone(tmp_path, PLANTED)
    assert main(["analyze", "probe", "--weights", str(weights), "--images", "synthetic:size=40,image_size=32",
                 "--heldout-fraction", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--heldout-fraction 1.5" in capsys.readouterr().err


def test_helpers():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(images, 4)  # [2, 4, 48]
    assert patches.shape == (2, 4, 48)
    assert torch.equal(patches[1, 2].view(3, 4, 4), images[1, :, 4:8, 0:4])  # position 2: row 1, column 0
    scores = position_scores(torch.tensor([0, 5, 3]), torch.tensor([0, 1, 15]), width=4)
    assert scores["top1"] == pytest.approx(1 / 3) and scores["mean_distance"] == pytest.approx((0 + 1 + 3) / 3)
    outliers = torch.tensor([[True, False, False, False], [False, False, False, False]])
    norms = torch.tensor([[9.0, 1.0, 2.0, 1.0], [1.0, 3.0, 1.0, 1.0]])
    chosen = select_tokens(outliers, norms, normal_per_image=None, seed=0)
    assert chosen["normal"].sum(dim=1).tolist() == [1, 0] and not (chosen["normal"] & outliers).any()
    assert chosen["top_outlier"].tolist() == [0, -1]
    assert chosen["one_normal"][0] in (1, 2, 3) and chosen["one_normal"][1] in range(4)
