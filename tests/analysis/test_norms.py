"""`dinoreg analyze norms|layers|positions` on planted high-norm tokens, and on a model without them."""

import json
import math

import pytest
import torch

from dinoreg.analysis.norms import MIN_MODE_RATIO, automatic_threshold
from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.models.weights import save_backbone

IMAGES = "synthetic:size=40,image_size=32"
PLANTED = [(0, 0), (2, 3)]  # grid positions (row, column) of a 4x4 grid


def backbone(tmp_path, planted):
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, num_register_tokens=4, init_values=1.0,
                           interpolate_antialias=True, interpolate_offset=0.0)
    with torch.no_grad():
        for row, column in planted:  # a huge vector in these positions' embeddings rides the residual stream
            model.pos_embed[0, 1 + 4 * row + column] += 300.0 * torch.nn.functional.normalize(torch.randn(192), dim=0)
    path = tmp_path / ("planted.safetensors" if planted else "clean.safetensors")
    save_backbone(model, path)
    return path


def analyze(tool, weights, out, *extra):
    assert main(["analyze", tool, "--weights", str(weights), "--images", IMAGES, "--max-images", "10",
                 "--batch-size", "4", "--out", str(out), *extra]) == 0
    return json.loads((out / f"{tool}.json").read_text())


def test_planted_high_norm_tokens_are_found_exactly(tmp_path):
    weights = backbone(tmp_path, PLANTED)
    norms = analyze("norms", weights, tmp_path / "norms")
    assert norms["threshold_source"] == "automatic" and norms["threshold"] is not None
    assert norms["outlier_fraction"] == pytest.approx(len(PLANTED) / 16)
    found = {(y, x) for _, y, x in norms["outlier_positions"]}
    assert found == set(PLANTED) and norms["outliers_per_image"] == [len(PLANTED)] * norms["num_images"]
    assert norms["num_images"] == 8  # the val split of 40 synthetic images
    assert {"images", "weights", "num_images", "grid", "quantiles", "max"} <= set(norms)
    assert (tmp_path / "norms" / "norms_histogram.png").stat().st_size > 0
    assert (tmp_path / "norms" / "norms_maps.png").stat().st_size > 0

    positions = analyze("positions", weights, tmp_path / "positions")
    expected = torch.zeros(4, 4)
    for row, column in PLANTED:
        expected[row, column] = 1.0
    assert torch.tensor(positions["frequency"]).equal(expected)

    layers = analyze("layers", weights, tmp_path / "layers")
    assert [layer["layer"] for layer in layers["layers"]] == [0, 1]
    assert all(layer["outlier_fraction"] == pytest.approx(2 / 16) for layer in layers["layers"])


def test_a_model_without_artifacts_reports_none_and_a_given_threshold_is_used(tmp_path):
    weights = backbone(tmp_path, [])
    norms = analyze("norms", weights, tmp_path / "auto")
    assert norms["threshold"] is None and norms["outlier_fraction"] == 0.0
    given = analyze("norms", weights, tmp_path / "given", "--threshold", "0")
    assert given["threshold_source"] == "given" and given["outlier_fraction"] == 1.0


def test_automatic_threshold_needs_two_separated_modes():
    generator = torch.Generator().manual_seed(0)
    normal = torch.exp(torch.randn(2000, generator=generator) * 0.2 + math.log(20))
    assert automatic_threshold(normal) == math.inf
    artifacts = torch.exp(torch.randn(50, generator=generator) * 0.1 + math.log(400))
    threshold = automatic_threshold(torch.cat([normal, artifacts]))
    assert normal.max() < threshold < artifacts.min()
    close = torch.exp(torch.randn(50, generator=generator) * 0.05 + math.log(20 * MIN_MODE_RATIO / 2))
    assert automatic_threshold(torch.cat([normal, close])) == math.inf  # a second mode, but too close to count


def test_bad_weights_are_a_clear_error(tmp_path, capsys):
    assert main(["analyze", "norms", "--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
