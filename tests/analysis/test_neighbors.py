"""`dinoreg analyze neighbors`: neighbour similarity by hand, and high-norm tokens separated from the others."""

import json

import torch
import torch.nn.functional as F

from dinoreg.analysis.neighbors import neighbour_similarity
from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.models.weights import save_backbone


def test_neighbour_similarity_by_hand():
    # a 2x3 grid of 2-d embeddings; similarity = cosine, averaged over the 2 or 3 neighbours each patch has
    grid = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
                         [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])[None]  # [1, 2, 3, 2]
    unit = F.normalize(grid, dim=-1)[0]

    def cos(a, b):
        return float(unit[a] @ unit[b])

    expected = torch.tensor([
        [(cos((0, 0), (0, 1)) + cos((0, 0), (1, 0))) / 2,
         (cos((0, 1), (0, 0)) + cos((0, 1), (0, 2)) + cos((0, 1), (1, 1))) / 3,
         (cos((0, 2), (0, 1)) + cos((0, 2), (1, 2))) / 2],
        [(cos((1, 0), (0, 0)) + cos((1, 0), (1, 1))) / 2,
         (cos((1, 1), (1, 0)) + cos((1, 1), (1, 2)) + cos((1, 1), (0, 1))) / 3,
         (cos((1, 2), (1, 1)) + cos((1, 2), (0, 2))) / 2]])
    torch.testing.assert_close(neighbour_similarity(grid)[0], expected)


def test_high_norm_and_normal_tokens_are_counted_apart(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, num_register_tokens=4, init_values=1.0,
                           interpolate_antialias=True, interpolate_offset=0.0)
    with torch.no_grad():
        for patch in (0, 11):
            model.pos_embed[0, 1 + patch] += 300.0 * F.normalize(torch.randn(192), dim=0)
    save_backbone(model, tmp_path / "planted.safetensors")
    assert main(["analyze", "neighbors", "--weights", str(tmp_path / "planted.safetensors"), "--images",
                 "synthetic:size=40,image_size=32", "--out", str(tmp_path / "out"), "--batch-size", "4"]) == 0
    result = json.loads((tmp_path / "out" / "neighbors.json").read_text())
    assert result["num_images"] == 8 and result["num_outliers"] == 2 * 8 and result["num_normal"] == 14 * 8
    assert result["threshold_source"] == "automatic" and result["threshold"] is not None
    for key in ("outlier_similarity", "normal_similarity"):
        assert -1 <= result[key]["mean"] <= 1 and -1 <= result[key]["median"] <= 1
    assert (tmp_path / "out" / "neighbors.png").stat().st_size > 0
