"""Every `dinoreg analyze` tool and the live monitor on a tiny DINOv3-family backbone (RoPE, storage tokens, untied
class norm, mask_k_bias): the storage tokens are the registers, the tools that run the blocks themselves apply each
block's RoPE (their tokens and attention are the model's own), and `analyze antialias` refuses in one line."""

import contextlib
import json

import pytest
import torch

from dinoreg.analysis.attention import query_attention
from dinoreg.analysis.common import open_inputs
from dinoreg.analysis.disconnect import _reference_pass, ablated_cls
from dinoreg.analysis.lost import patch_features
from dinoreg.cli import main
from dinoreg.config import load_config
from dinoreg.models import RopeVisionTransformer
from dinoreg.models.rope import rope_rotate
from dinoreg.models.weights import save_backbone
from dinoreg.train.monitor import ArtifactMonitor

IMAGES = "synthetic:size=40,image_size=32"
STORAGE, DEPTH, HEADS = 3, 2, 2


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = RopeVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=HEADS,
                                  ffn_layer="swiglu", n_storage_tokens=STORAGE, mask_k_bias=True,
                                  untie_cls_and_patch_norms=True, norm_layer="layernormbf16", layerscale_init=1.0,
                                  pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32")
    with torch.no_grad():  # an untied class norm unlike the patches' (at initialisation both are the identity)
        model.cls_norm.weight.uniform_(0.5, 2.0)
        model.cls_norm.bias.normal_()
        for block in model.blocks:  # a key bias that mask_k_bias must cancel
            block.attn.qkv.bias.normal_()
    path = tmp_path_factory.mktemp("rope") / "rope.safetensors"
    save_backbone(model, path)
    return path


@pytest.fixture(scope="module")
def inputs(weights):
    return open_inputs(weights=weights, images=IMAGES, image_size=None, batch_size=4, max_images=8, device="cpu")


def images_of(inputs):
    return torch.cat([images for images, _ in inputs.batches()])


def plain_attention(block, tokens, rope):
    """Softmax attention ``[B, heads, N, N]`` of ``block`` for its input ``tokens``, queries and keys rotated by
    ``rope`` (None: not rotated), written out."""
    batch, n, dim = tokens.shape
    q, k, _ = block.attn.qkv(block.norm1(tokens)).view(batch, n, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
    if rope is not None:
        q, k = rope_rotate(q, rope), rope_rotate(k, rope)
    return ((q * (dim // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)


def analyze(tool, weights, out, *extra):
    assert main(["analyze", tool, "--weights", str(weights), "--images", IMAGES, "--max-images", "8",
                 "--batch-size", "4", "--out", str(out), *extra]) == 0
    return json.loads((out / f"{tool}.json").read_text())


@torch.no_grad()
def test_the_tools_run_the_blocks_with_rope_as_the_model_does(inputs):
    backbone, images = inputs.backbone, images_of(inputs)
    assert backbone.num_register_tokens == STORAGE and backbone.pos_embed_type == "rope"
    outputs, _ = backbone.block_outputs(images)
    reference = backbone.forward_features(images)
    # block by block (the tools' loop: backbone.positions) = the packed forward pass of the model
    torch.testing.assert_close(outputs[-1], reference["x_prenorm"], rtol=1e-5, atol=1e-5)
    rope = backbone.rope_embed(height=4, width=4)
    expected = plain_attention(backbone.blocks[1], outputs[0], rope)  # [B, heads, N, N]
    unrotated = plain_attention(backbone.blocks[1], outputs[0], None)
    assert (expected - unrotated).abs().max() > 1e-2  # the rotation matters: a tool without it would fail below

    # attention: [CLS] and the 3 storage tokens as queries, in the last block
    torch.testing.assert_close(query_attention(backbone, images, layer=1), expected[:, :, :1 + STORAGE])
    # disconnect: the cls output through the untied class norm, and the cls -> storage-token masses per block
    passed = _reference_pass(inputs)
    torch.testing.assert_close(passed["cls"], reference["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(passed["cls"], backbone.norm(reference["x_prenorm"])[:, 0], atol=1e-3)
    cls_to_storage = expected[:, :, 0, 1:1 + STORAGE].sum(-1).mean()
    assert passed["masses"][1, 1].item() == pytest.approx(cls_to_storage.item(), rel=1e-5)
    unablated = ablated_cls(backbone, images, from_layer=DEPTH, replacements=torch.zeros(DEPTH, STORAGE, 32))
    torch.testing.assert_close(unablated, reference["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    # LOST's keys: the last block's key projection of its input (masked key bias), before the rotation
    keys = backbone.blocks[1].attn.qkv(backbone.blocks[1].norm1(outputs[0]))[..., 32:64]
    qkv_bias = backbone.blocks[1].attn.qkv.bias
    assert qkv_bias[32:64].abs().min() > 0  # a bias the mask cancels...
    keys_by_hand = backbone.blocks[1].norm1(outputs[0]) @ backbone.blocks[1].attn.qkv.weight[32:64].T  # ... so none
    torch.testing.assert_close(keys, keys_by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patch_features(backbone, images, features="keys"), keys[:, 1 + STORAGE:])
    torch.testing.assert_close(patch_features(backbone, images, features="tokens"), reference["x_norm_patchtokens"])


def test_every_tool_counts_the_storage_tokens_as_registers(weights, tmp_path):
    # (layers and positions read the norms that norms reads: block_outputs, checked against the model above)
    norms = analyze("norms", weights, tmp_path / "norms")
    assert norms["num_images"] == 8 and norms["grid"] == [4, 4]
    neighbors = analyze("neighbors", weights, tmp_path / "neighbors")
    assert neighbors["num_outliers"] + neighbors["num_normal"] == 8 * 16  # patches only, never a storage token
    attention = analyze("attention", weights, tmp_path / "attention")
    assert attention["num_register_tokens"] == STORAGE and attention["layer"] == DEPTH - 1
    assert list(attention["queries"]) == ["cls", "reg0", "reg1", "reg2"]
    pca = analyze("pca", weights, tmp_path / "pca")
    assert pca["num_images"] == 8
    lost = analyze("lost", weights, tmp_path / "lost")
    assert lost["num_images"] == 8 and lost["grid"] == [4, 4]
    disconnect = analyze("disconnect", weights, tmp_path / "disconnect", "--from-layer", "1")
    assert disconnect["num_register_tokens"] == STORAGE and disconnect["ablated"]
    assert 0 < disconnect["layers"][-1]["cls_to_registers"] < 1 and disconnect["cosine_similarity"] < 1
    probe = analyze("probe", weights, tmp_path / "probe", "--epochs", "2")
    assert probe["num_register_tokens"] == STORAGE and probe["patch_size"] == 8


def test_antialias_refuses_a_rope_backbone_in_one_line(weights, tmp_path, capsys):
    assert main(["analyze", "antialias", "--weights", str(weights), "--out", str(tmp_path / "antialias")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is a RoPE backbone" in error[0] and "no learned positional embedding" in error[0]
    assert not (tmp_path / "antialias").exists()


@torch.no_grad()
def test_the_monitor_reads_the_storage_tokens_as_registers_and_applies_rope(inputs):
    cfg = load_config("tiny_rope_cpu", ["crops.global_crops_size=32", "monitor.images=4",
                                        "train.dataset_path=" + IMAGES])
    monitor = ArtifactMonitor(cfg, torch.device("cpu"))
    backbone = inputs.backbone.train()  # the monitor measures in eval mode: no RoPE augmentation
    reading = monitor(backbone, contextlib.nullcontext())
    assert backbone.training
    backbone.eval()
    outputs, _ = backbone.block_outputs(monitor.images)
    attention = plain_attention(backbone.blocks[-1], outputs[-2], backbone.rope_embed(height=4, width=4))
    cls_to_storage = attention[:, :, 0, 1:1 + STORAGE].sum(-1).mean().item()
    assert reading.metrics["monitor/cls_to_registers"] == pytest.approx(cls_to_storage, rel=1e-5)
    norms = backbone.forward_features(monitor.images)["x_prenorm"][:, 1 + STORAGE:].norm(dim=-1)  # [B, HW]
    assert reading.metrics[f"monitor/norm_max/b{DEPTH - 1:02d}"] == pytest.approx(norms.max().item(), rel=1e-5)
    assert reading.norms.shape == (4 * 16,)
    assert reading.picture.shape == (3, 4 * 32, (2 + 1 + STORAGE) * 32)  # image, norms, cls and the 3 storage maps
