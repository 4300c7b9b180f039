"""Our timm exports through timm's own front door, with real timm: DINOv2's family (timm's vision_transformer) and
DINOv3's RoPE family (timm's Eva DINOv3 models, vit_*_patch16_dinov3*).

timm cannot be imported beside the CPU torch the suite runs on (its torchvision), so this module skips there. Run
it in a venv where timm imports (see docs/EXPORT.md):

    python -m venv /tmp/timmenv && /tmp/timmenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    /tmp/timmenv/bin/pip install -e . pytest && /tmp/timmenv/bin/python -m pytest -q tests/export/test_timm.py
"""

import pytest
import torch
from PIL import Image

try:
    import timm
    import timm.data
except Exception as error:  # noqa: BLE001 (an ImportError, or torchvision failing to register its operators)
    pytest.skip(f"timm does not import here ({type(error).__name__}: {error})", allow_module_level=True)

from dinoreg.data import IMAGENET_MEAN, IMAGENET_STD
from dinoreg.data.loader import EvalTransform
from dinoreg.export.writers import export_backbone
from dinoreg import load_backbone
from dinoreg.models import build_backbone, build_rope_backbone

AA = dict(interpolate_antialias=True, interpolate_offset=0.0)  # the registers family's interpolation


def ours_tokens(model, images):
    with torch.no_grad():
        out = model.forward_features(images)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def through_timm(path, **extra):
    """timm's documented way to load local weights: create_model with a pretrained_cfg overlay naming the file."""
    saved = torch.load(path, weights_only=True)
    overlay = {**saved["pretrained_cfg"], "file": str(path)}
    model = timm.create_model(saved["model_name"], pretrained=True, pretrained_cfg_overlay=overlay,
                              **saved["model_kwargs"], **extra)
    return model.eval()


def timm_tokens(model, images):
    with torch.no_grad():
        return model.forward_features(images)  # [B, 1 + R + HW, D] after the final norm


def trained_like(model):
    """Random weights with non-trivial layer scales and biases, so a dropped tensor would show."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05 + parameter)
    return model.eval()


def test_registered_name_loads_with_timms_front_door_at_any_size(tmp_path):
    model = trained_like(build_backbone("vit_small", patch_size=14, img_size=56, num_register_tokens=4,
                                        init_values=1e-5, **AA))
    path = export_backbone(model, None, fmt="timm", output=tmp_path / "s.pth")
    loaded = through_timm(path)
    assert torch.load(path, weights_only=True)["model_name"] == "vit_small_patch14_reg4_dinov2"
    for size in (56, 84, 70):  # native, and others through dynamic_img_size
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        torch.testing.assert_close(timm_tokens(loaded, images), ours_tokens(model, images), atol=1e-4, rtol=0)

    config = timm.data.resolve_data_config(model=loaded)
    assert tuple(config["input_size"]) == (3, 56, 56) and config["interpolation"] == "bicubic"
    assert tuple(config["mean"]) == (0.485, 0.456, 0.406) and tuple(config["std"]) == (0.229, 0.224, 0.225)
    picture = Image.fromarray(torch.randint(0, 256, (80, 80, 3), dtype=torch.uint8,
                                            generator=torch.Generator().manual_seed(1)).numpy())
    timm_input = timm.data.create_transform(**config)(picture)  # resize 64 (56 / 0.875), centre crop 56
    our_input = EvalTransform(56)(picture).float() / 255  # round(56 * 256 / 224) = 64, the same crop
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    torch.testing.assert_close(timm_input, (our_input - mean) / std, atol=1e-6, rtol=0)  # both PIL bicubic


def test_timms_transform_is_dinoregs_at_the_tiny_recipes_size_and_any_aspect_ratio(tmp_path):
    """48 px (tiny_cpu's): timm resizes to floor(48 / crop_pct), dinoreg to round(48 * 256 / 224) = 55; the stored
    crop_pct makes them agree, and both truncate the longer side as torchvision does."""
    model = trained_like(build_backbone("vit_tiny", patch_size=8, img_size=48, depth=1, num_register_tokens=4,
                                        init_values=1e-5, **AA))
    path = export_backbone(model, None, fmt="timm", output=tmp_path / "t.pth",
                           timm_name="vit_small_patch14_reg4_dinov2")
    loaded = through_timm(path)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=loaded))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for height, width in ((64, 64), (70, 90), (90, 70), (480, 640)):
        picture = Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8,
                                                generator=torch.Generator().manual_seed(height)).numpy())
        ours = (EvalTransform(48)(picture).float() / 255 - mean) / std
        torch.testing.assert_close(transform(picture), ours, atol=1e-6, rtol=0, msg=f"{height}x{width}")
        torch.testing.assert_close(timm_tokens(loaded, ours[None]), ours_tokens(model, ours[None]), atol=1e-4, rtol=0)


def test_unregistered_swiglu_with_a_giant_name(tmp_path):
    model = trained_like(build_backbone("vit_giant2", patch_size=14, img_size=42, depth=2, num_register_tokens=2,
                                        ffn_layer="swiglufused", init_values=1e-5, **AA))
    path = export_backbone(model, None, fmt="timm", output=tmp_path / "g.pth", timm_name="vit_giant_patch14_dinov2")
    images = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(timm_tokens(through_timm(path), images), ours_tokens(model, images), atol=1e-4, rtol=0)


def test_a_model_timm_cannot_resize_is_fixed_to_its_size(tmp_path):
    model = trained_like(build_backbone("vit_small", patch_size=14, img_size=56, init_values=1e-5,
                                        interpolate_antialias=False, interpolate_offset=0.1))  # official, no registers
    path = export_backbone(model, None, fmt="timm", output=tmp_path / "legacy.pth")
    loaded = through_timm(path)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(timm_tokens(loaded, images), ours_tokens(model, images), atol=1e-4, rtol=0)
    with pytest.raises(AssertionError, match="Input height"):  # refused, not different features
        timm_tokens(loaded, torch.randn(1, 3, 84, 84))


def test_official_layout_loads_with_timms_own_dinov2_conversion(tmp_path):
    model = trained_like(build_backbone("vit_small", patch_size=14, img_size=56, num_register_tokens=4,
                                        init_values=1e-5, **AA))
    path = export_backbone(model, None, fmt="dinov2", output=tmp_path / "official.pth")
    loaded = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, img_size=56, dynamic_img_size=True,
                               pretrained_cfg_overlay={"file": str(path)}).eval()
    images = torch.randn(2, 3, 70, 70, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(timm_tokens(loaded, images), ours_tokens(model, images), atol=1e-4, rtol=0)


# --- DINOv3 (RoPE) ----------------------------------------------------------------------------------------------

RECTANGLES = ((32, 32), (48, 80))  # RoPE: any multiple of the patch, nothing resampled


def test_dinov3_registered_name_through_timms_front_door(tmp_path):
    """The released ViT-S/16 architecture (full size) under its timm name; timm's tokens and CLS pooling are
    load_backbone's within 1e-4."""
    model = trained_like(build_rope_backbone("vits16", img_size=32))
    path = export_backbone(model, None, fmt="timm", output=tmp_path / "s.pth")
    assert torch.load(path, weights_only=True)["model_name"] == "vit_small_patch16_dinov3_qkvb"
    loaded, ours = through_timm(path), load_backbone(path)
    assert type(loaded).__name__ == "Eva"
    for height, width in RECTANGLES:
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        timm_out = timm_tokens(loaded, images)
        torch.testing.assert_close(timm_out, ours_tokens(ours, images), atol=1e-4, rtol=0)
        torch.testing.assert_close(timm_out, ours_tokens(model, images), atol=1e-4, rtol=0)
        with torch.no_grad():  # global_pool="token": the CLS, DINOv3's pooling
            torch.testing.assert_close(loaded(images), ours(images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra", [
    dict(ffn_layer="swiglu", ffn_ratio=6.0, n_storage_tokens=2),
    dict(n_storage_tokens=0, qkv_bias=False, proj_bias=False, ffn_bias=False, layerscale_init=None),
], ids=["swiglu-2-storage", "no-storage-no-bias-no-layerscale"])
def test_dinov3_unregistered_architecture_with_a_timm_name(tmp_path, extra):
    model = trained_like(build_rope_backbone("vits16", depth=2, embed_dim=64, num_heads=2, patch_size=8, img_size=32,
                                             **extra))
    path = export_backbone(model, None, fmt="timm", output=tmp_path / "t.pth",
                           timm_name="vit_small_patch16_dinov3_qkvb")
    loaded = through_timm(path)
    for height, width in RECTANGLES:
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(width))
        torch.testing.assert_close(timm_tokens(loaded, images), ours_tokens(load_backbone(path), images), atol=1e-4,
                                   rtol=0)


def test_official_dinov3_layout_loads_with_timms_own_dinov3_filter(tmp_path):
    """A --format dinov3 file (the official hub layout: storage_tokens, qkv.bias with its mask, periods) through
    timm's checkpoint_filter_fn for DINOv3 weights, as the released .pth files load."""
    model = trained_like(build_rope_backbone("vits16", img_size=32))
    path = export_backbone(model, None, fmt="dinov3", output=tmp_path / "official.pth")
    loaded = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay={"file": str(path)}).eval()
    images = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(timm_tokens(loaded, images), ours_tokens(model, images), atol=1e-4, rtol=0)
