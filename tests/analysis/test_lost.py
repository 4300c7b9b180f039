"""`dinoreg analyze lost`: LOST on hand-made feature grids, on a planted backbone (CorLoc on synthetic
single-object images), on a folder without boxes; IoU and feature extraction."""

import json

import pytest
import torch
from PIL import Image

from dinoreg.analysis.lost import box_iou, connected_component, lost, patch_features
from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.models.weights import save_backbone

SINGLE_OBJECTS = "synthetic:size=100,image_size=32,objects=1"  # the val split: 20 images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def planted_backbone(tmp_path, *, patch_size=2, threshold=0.45, gain=20.0, offset=1.0):
    """A ViT whose last-block keys are ``k = c * u / sqrt(u^2 + offset^2)`` in one dimension (0 elsewhere), with
    ``u = gain * (mean patch brightness in [0, 1] - threshold)``.

    Every parameter is zero except: the patch embedding writes ``u, -u, offset, -offset`` into dimensions 0-3
    (brightness recovered from the normalised pixels with the ImageNet std/mean); the last block's norm1 scale
    is 1 and its qkv maps norm1's dimension 0 to key dimension 0. The zero first block adds nothing to the
    residual stream (zero attention projection and MLP output), cls/registers/pos_embed are zero, so the
    LayerNorm sees ``[u, -u, offset, -offset, 0, ...]`` (mean 0): its dimension 0 is ``u`` scaled smoothly to
    a bounded value. Synthetic objects are brighter than their background (channels >= 128 vs <= 127 at base,
    textures +-40), so ``k > 0`` on object patches and ``k < 0`` on the background: positively correlated
    patches are those on the same side, and the object (fewer patches) has the lower degree. Patches of 2
    pixels keep the grid's quantisation of the box small (16 x 16 patches on 32 px images).
    """
    model = build_backbone("vit_tiny", patch_size=patch_size, img_size=32, depth=2, num_register_tokens=4)
    dim = model.embed_dim
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        conv = model.patch_embed.proj
        for channel in range(3):  # weight * normalised pixel summed over the patch = gain * mean brightness
            weight = gain * IMAGENET_STD[channel] / (3 * patch_size * patch_size)
            conv.weight[0, channel], conv.weight[1, channel] = weight, -weight
        bias = gain * (sum(IMAGENET_MEAN) / 3 - threshold)
        conv.bias[:4] = torch.tensor([bias, -bias, offset, -offset])
        last = model.blocks[-1]
        last.norm1.weight.fill_(1.0)
        last.attn.qkv.weight[dim + 0, 0] = 1.0  # rows [dim, 2 dim) of qkv are the keys
    path = tmp_path / "planted.safetensors"
    save_backbone(model, path)
    return path


def analyze(weights, images, out, *extra):
    assert main(["analyze", "lost", "--weights", str(weights), "--images", images, "--batch-size", "20",
                 "--out", str(out), *extra]) == 0
    return json.loads((out / "lost.json").read_text())


def test_planted_backbone_finds_the_synthetic_objects(tmp_path, capsys):
    result = analyze(planted_backbone(tmp_path), SINGLE_OBJECTS, tmp_path / "out")
    assert result["num_images"] == 20 and result["ground_truth"] == "dataset boxes"
    assert result["corloc"] >= 0.8, result["corloc"]  # measured: 0.95 (19/20); 0.945 on 200 val images
    assert result["num_correct"] == round(result["corloc"] * 20)
    assert result["grid"] == [16, 16] and result["k_patches"] == 100 and result["features"] == "keys"
    assert {"tool", "weights", "images", "patch_size", "image_size", "note", "per_image"} <= set(result)
    record = result["per_image"][0]
    assert set(record) == {"index", "box", "seed", "seed_degree", "mask_patches", "gt_boxes", "iou", "correct"}
    for record in result["per_image"]:
        x0, y0, x1, y1 = record["box"]
        row, column = record["seed"]
        assert x0 <= 2 * column < x1 and y0 <= 2 * row < y1  # the box holds its seed
        assert record["correct"] == (record["iou"] >= 0.5) and len(record["gt_boxes"]) == 1
    assert "CorLoc" in capsys.readouterr().out
    for name in ("lost.png", "lost_iou.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_a_folder_without_boxes_reports_boxes_only(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (x0, y0, x1, y1) in enumerate([(8, 4, 16, 20), (20, 22, 30, 30)]):
        pixels = torch.full((32, 32, 3), 40, dtype=torch.uint8)
        pixels[y0:y1, x0:x1] = 220
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    result = analyze(planted_backbone(tmp_path), str(folder), tmp_path / "out")
    assert result["corloc"] is None and result["ground_truth"] is None and result["num_correct"] is None
    assert [record["box"] for record in result["per_image"]] == [[8, 4, 16, 20], [20, 22, 30, 30]]
    assert all(record["iou"] is None and record["gt_boxes"] is None for record in result["per_image"])
    assert "boxes only" in capsys.readouterr().out
    assert (tmp_path / "out" / "lost.png").exists() and not (tmp_path / "out" / "lost_iou.png").exists()


def grid_features(codes, vectors):
    """Features ``[HW, D]`` from a grid of letters, each letter standing for one feature vector."""
    rows = [row.split() for row in codes.strip().splitlines()]
    return torch.tensor([vectors[code] for row in rows for code in row], dtype=torch.float32), (len(rows),
                                                                                                len(rows[0]))


def test_the_seed_component_is_boxed():
    features, grid = grid_features("""
        b b b b b
        b o o b b
        b o o b b
        b b b b b
    """, {"b": [1.0, 0.0], "o": [-1.0, 0.5]})
    found = lost(features, grid=grid)
    assert found.seed == (1, 1)  # all object patches have degree 3; ties go to the first in row-major order
    assert found.degree[1, 1] == 3 and found.degree[0, 0] == 15
    assert found.patch_box == (1, 1, 3, 3) and found.box(14) == (14.0, 14.0, 42.0, 42.0)
    assert found.component.sum() == 4


def test_of_two_objects_only_the_seed_component_is_boxed():
    # a, b: two objects correlated with each other (a.b = 1), both anti-correlated with the background;
    # x: a background patch correlated with a (and the background) but not b, so a's degree exceeds b's and the
    # seed lies in b although a comes first in row-major order.
    features, grid = grid_features("""
        g g g g g g x
        g a a g g g g
        g a a g g g g
        g g g g b g g
        g g g b b g g
        g g g g g g g
    """, {"g": [1.0, 0.0, 0.0], "a": [-1.0, 0.0, 1.0], "b": [-1.0, 0.0, 0.0], "x": [0.5, 0.0, 1.0]})
    found = lost(features, grid=grid)
    assert found.seed == (3, 4)
    assert found.mask[1:3, 1:3].all() and found.mask[3, 4] and found.mask[4, 3:5].all()  # both in the mask
    assert found.patch_box == (3, 3, 5, 5)  # (x0, y0, x1, y1): b only
    assert found.component.sum() == 3


def test_seed_expansion_is_limited_to_the_k_lowest_degree_patches():
    # s seeds (degree 1, first in row-major order); t correlates with s, y does not but correlates with t. With
    # k=1 only s is summed: y stays out. With all patches, t (degree 2, third lowest) joins s and pulls y in.
    features, grid = grid_features("""
        g g g g
        g s t y
        g g g g
    """, {"g": [1.0, 0.0, 0.0], "s": [-1.0, 1.0, 0.0], "t": [-1.0, 0.2, 1.0], "y": [-0.2, -1.0, 1.0]})
    narrow = lost(features, grid=grid, k_patches=1)
    assert narrow.seed == (1, 1) and narrow.degree[1].tolist() == [8, 1, 2, 1]
    assert narrow.patch_box == (1, 1, 3, 2)
    assert lost(features, grid=grid, k_patches=2).patch_box == (1, 1, 3, 2)  # s and y: y is not similar to s
    assert lost(features, grid=grid, k_patches=3).patch_box == (1, 1, 4, 2)
    assert lost(features, grid=grid, k_patches=1000).patch_box == (1, 1, 4, 2)  # clipped to the 12 patches


def test_a_zero_seed_feature_boxes_the_seed_patch_alone():
    found = lost(torch.zeros(6, 4), grid=(2, 3))
    assert found.seed == (0, 0) and not found.mask.any() and found.patch_box == (0, 0, 1, 1)


def test_connected_component_uses_four_connectivity():
    mask = torch.tensor([[1, 1, 0, 0],
                         [0, 1, 0, 1],
                         [0, 0, 1, 1]], dtype=torch.bool)
    assert connected_component(mask, (0, 0)).nonzero().tolist() == [[0, 0], [0, 1], [1, 1]]  # (2, 2) is diagonal
    assert connected_component(mask, (2, 2)).nonzero().tolist() == [[1, 3], [2, 2], [2, 3]]
    assert not connected_component(mask, (0, 3)).any()


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges: x1 is exclusive
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_keys_are_the_last_blocks_attention_keys():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, num_register_tokens=4).eval()
    captured = {}
    model.blocks[-1].attn.qkv.register_forward_hook(lambda module, args, output: captured.update(qkv=output))
    images = torch.randn(2, 3, 32, 32)
    model.forward_features(images)
    qkv = captured["qkv"].reshape(2, 1 + 4 + 16, 3, 192)  # what the attention itself computes (packed tokens)
    for index, name in enumerate(("queries", "keys", "values")):
        assert torch.allclose(patch_features(model, images, features=name), qkv[:, 5:, index], atol=1e-5)
    tokens = patch_features(model, images, features="tokens")
    assert torch.allclose(tokens, model.forward_features(images)["x_norm_patchtokens"])
