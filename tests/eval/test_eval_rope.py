"""`dinoreg eval knn|linear|segmentation` with a DINOv3-family backbone (RoPE, storage tokens, untied class norm):
the features are the model's own, computed here block by block with each block's RoPE, and the three protocols run
end to end from a backbone file."""

import json

import pytest
import torch

from dinoreg.cli import main
from dinoreg.eval.features import block_tokens_encoder, knn_encoder
from dinoreg.metrics.segmentation import patch_feature_maps
from dinoreg.models import RopeVisionTransformer
from dinoreg.models.weights import save_backbone

STORAGE = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = RopeVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, n_storage_tokens=STORAGE,
                                  mask_k_bias=True, untie_cls_and_patch_norms=True, norm_layer="layernormbf16",
                                  layerscale_init=1.0, pos_embed_rope_dtype="fp32").eval()
    with torch.no_grad():  # an untied class norm unlike the patches'
        model.cls_norm.weight.uniform_(0.5, 2.0)
    return model


def by_hand(model, images):
    """The tokens after each block ``[B, 1 + S + HW, D]``, normed as the model's outputs (the class and storage
    tokens by ``cls_norm``, the patches by ``norm``), computed with the RoPE of the images' grid."""
    height, width = images.shape[-2] // 8, images.shape[-1] // 8
    rope = model.rope_embed(height=height, width=width)
    tokens, normed = model.prepare_tokens_with_masks(images), []
    for block in model.blocks:
        tokens = block(tokens, rope)
        normed.append(torch.cat([model.cls_norm(tokens[:, :1 + STORAGE]), model.norm(tokens[:, 1 + STORAGE:])], 1))
    return normed


@torch.no_grad()
def test_the_protocols_features_are_the_rope_models_own(model):
    images = torch.randn(2, 3, 32, 48)  # a non-square grid: 4 x 6 patches, nothing resampled
    per_block = by_hand(model, images)
    cls, patches = per_block[-1][:, 0], per_block[-1][:, 1 + STORAGE:]
    pooled = torch.cat([cls, patches.mean(1)], dim=-1)
    torch.testing.assert_close(knn_encoder(model, avgpool=True)(images), pooled / pooled.norm(dim=-1, keepdim=True))
    features = block_tokens_encoder(model, n_last_blocks=2)(images)  # [B, 3, D]
    torch.testing.assert_close(features[:, 0], per_block[1][:, 0])
    torch.testing.assert_close(features[:, 2], patches.mean(1))
    maps = patch_feature_maps(model, images, n_last_blocks=1)  # [B, D, 4, 6]
    torch.testing.assert_close(maps, patches.reshape(2, 4, 6, 32).permute(0, 3, 1, 2))


def test_knn_linear_and_segmentation_run_from_a_rope_backbone_file(model, tmp_path):
    weights = tmp_path / "rope.safetensors"
    save_backbone(model, weights)
    data = "synthetic:size=80,image_size=32"
    common = ["--weights", str(weights), "--num-workers", "0"]
    assert main(["eval", "knn", *common, "--data", data, "--output-dir", str(tmp_path / "knn"), "--ks", "5"]) == 0
    knn = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert (knn["pos_embed_type"], knn["num_register_tokens"], knn["feature_dim"]) == ("rope", STORAGE, 32)
    assert 0 <= knn["knn"][0]["top1"] <= 1
    assert main(["eval", "linear", *common, "--data", data, "--output-dir", str(tmp_path / "linear"), "--epochs", "1",
                 "--classifier-batch-size", "16", "--learning-rates", "0.01"]) == 0
    linear = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert linear["pos_embed_type"] == "rope" and 0 <= linear["val_top1"] <= 1
    assert main(["eval", "segmentation", *common, "--images", "synthetic:size=16,image_size=32", "--output-dir",
                 str(tmp_path / "segmentation"), "--iterations", "3", "--overlays", "0"]) == 0
    segmentation = json.loads((tmp_path / "segmentation" / "results.json").read_text())
    assert segmentation["pos_embed_type"] == "rope" and segmentation["feature_grid"] == [4, 4]
