"""Conversions to Hugging Face transformers (loaded for real) and timm (checked against timm's documented
conversion, restated below; timm itself is not a dependency)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dinoreg.models import CheckpointMismatchError, build_backbone
from dinoreg.models.format_common import TimmNameError
from dinoreg.models.formats import timm_create_kwargs, to_hf, to_timm

AA = dict(interpolate_antialias=True, interpolate_offset=0.0)  # official registers family
PLAIN = dict(interpolate_antialias=False, interpolate_offset=0.0)  # what HF's Dinov2Model does
LEGACY = dict(interpolate_antialias=False, interpolate_offset=0.1)  # official models without registers


def tiny(registers, ffn="mlp", interpolation=AA, **kwargs):
    """vit_tiny, patch 8, 32px, depth 2, every parameter random (nothing trivially zero or one)."""
    kwargs = {"init_values": 1.0, **kwargs}
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, num_register_tokens=registers,
                           ffn_layer=ffn, **interpolation, **kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model


def ours_tokens(model, x, masks=None):
    with torch.no_grad():
        out = model.forward_features(x, masks)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], dim=1)


def load_hf(tmp_path, model, **kwargs):
    transformers = pytest.importorskip("transformers")
    config, tensors = to_hf(model.state_dict(), model.arch_kwargs, **kwargs)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf, info = transformers.AutoModel.from_pretrained(str(tmp_path), output_loading_info=True,
                                                      attn_implementation="eager", dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return config, hf.eval()


def max_diff(model, hf, size, masks=None):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state  # [B, 1 + R + HW, D]
    return (ours_tokens(model, x, masks) - theirs).abs().max().item()


# native 32px, then resampled position embeddings: up, down (antialiasing matters), non-square
SIZES = [(32, 32), (48, 48), (16, 16), (24, 40)]


@pytest.mark.parametrize("registers,ffn,interpolation,extra", [
    (4, "mlp", AA, {}),
    (4, "swiglufused", AA, {}),
    (0, "mlp", PLAIN, {}),
    (0, "swiglufused", PLAIN, dict(qkv_bias=False, proj_bias=False, ffn_bias=False, init_values=None)),
], ids=["reg4-mlp", "reg4-swiglu", "reg0-mlp", "reg0-swiglu-nobias-nolayerscale"])
def test_hf_matches_ours_at_every_size(tmp_path, registers, ffn, interpolation, extra):
    model = tiny(registers, ffn, interpolation, **extra)
    config, hf = load_hf(tmp_path, model)
    expected = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    assert type(hf).__name__ == expected and config["architectures"] == [expected]
    assert config["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
    assert (hf.config.num_register_tokens if registers else 0) == registers
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.use_swiglu_ffn is (ffn != "mlp")
    for size in SIZES:
        assert max_diff(model, hf, size) < 1e-4, size


def test_hf_mask_token_matches(tmp_path):
    model = tiny(4)
    _, hf = load_hf(tmp_path, model)
    masks = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.5  # [B, HW]
    assert max_diff(model, hf, (32, 32), masks) < 1e-4


@pytest.mark.parametrize("registers,interpolation", [(0, LEGACY), (0, AA), (4, LEGACY), (4, PLAIN)])
def test_hf_refuses_an_interpolation_its_class_cannot_reproduce(registers, interpolation):
    model = tiny(registers, interpolation=interpolation)
    with pytest.raises(ValueError, match="allow_interpolation_mismatch"):
        to_hf(model.state_dict(), model.arch_kwargs)


def test_hf_mismatch_waived_agrees_only_at_native_size(tmp_path):
    model = tiny(0, interpolation=LEGACY)
    _, hf = load_hf(tmp_path, model, allow_interpolation_mismatch=True)
    assert max_diff(model, hf, (32, 32)) < 1e-4
    assert max_diff(model, hf, (48, 48)) > 1e-3  # why the default refuses


def test_hf_refuses_what_its_config_cannot_express_and_misfit_state_dicts():
    model = tiny(4, mlp_ratio=2.5)
    with pytest.raises(ValueError, match="mlp_ratio"):
        to_hf(model.state_dict(), model.arch_kwargs)
    model = tiny(4)
    with pytest.raises(CheckpointMismatchError, match="register_tokens"):
        to_hf(model.state_dict(), {**model.arch_kwargs, "num_register_tokens": 0})


def timm_reference(state_dict):
    """timm's ``_convert_dinov2`` (timm/models/vision_transformer.py), restated."""
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    out = {}
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, 0]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for key, value in sd.items():
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    return out


def timm_vit_keys(depth, registers):
    """Parameter names of timm's VisionTransformer with num_classes=0 and layer scale."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    keys |= {"reg_token"} if registers else set()
    for i in range(depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


@pytest.mark.parametrize("registers,ffn", [(4, "mlp"), (0, "mlp"), (4, "swiglufused"), (0, "swiglufused")])
def test_timm_tensors_follow_timms_conversion(registers, ffn):
    model = tiny(registers, ffn)
    state_dict = model.state_dict()
    name = "vit_giant_patch14_dinov2" if ffn != "mlp" else "vit_small_patch14_dinov2"  # tiny/patch 8: no timm name
    tensors, built_by, kwargs = to_timm(state_dict, model.arch_kwargs, timm_name=name)
    assert built_by == name
    reference = timm_reference(state_dict)
    assert set(tensors) == set(reference) == timm_vit_keys(2, registers)
    for key, value in reference.items():
        assert tensors[key].shape == value.shape, key
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0, msg=key)
    dim = 192
    if registers:
        assert tensors["reg_token"].shape == (1, registers, dim) and tensors["pos_embed"].shape == (1, 16, dim)
        torch.testing.assert_close(tensors["cls_token"], state_dict["cls_token"] + state_dict["pos_embed"][:, :1])
    else:
        assert tensors["pos_embed"].shape == (1, 17, dim)
    assert kwargs["reg_tokens"] == registers and kwargs["no_embed_class"] is (registers > 0)
    assert kwargs["num_classes"] == 0 and kwargs["init_values"] == 1.0
    if ffn != "mlp":
        packed = state_dict["blocks.0.mlp.w12.weight"].shape[0]  # [w1; w2] rows
        # timm's GluMlp: fc1 has int(dim * mlp_ratio) rows, fc2 half as many inputs
        assert int(dim * kwargs["mlp_ratio"]) == packed == 2 * tensors["blocks.0.mlp.fc2.weight"].shape[1]
    assert "mlp_layer" not in kwargs  # set by the giant entry points, and only there: kwargs are plain values

    # timm's _pos_embed, restated: no_embed_class adds positions to patches, then prepends cls (+ registers)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        patches = model.patch_embed(x)  # [B, HW, D]; same tensor names in timm
        cls = tensors["cls_token"].expand(2, -1, -1)
        if registers:
            timm_tokens = torch.cat([cls, tensors["reg_token"].expand(2, -1, -1), patches + tensors["pos_embed"]], 1)
        else:
            timm_tokens = torch.cat([cls, patches], 1) + tensors["pos_embed"]
        torch.testing.assert_close(timm_tokens, model.prepare_tokens_with_masks(x))


def meta_backbone(arch, **kwargs):
    with torch.device("meta"):  # shapes only: ViT-g costs nothing
        return build_backbone(arch, patch_size=14, img_size=518, init_values=1e-5, **AA, **kwargs)


def test_timm_names_and_kwargs():
    small = meta_backbone("vit_small", num_register_tokens=4)
    tensors, name, kwargs = to_timm(small.state_dict(), small.arch_kwargs)
    assert name == "vit_small_patch14_reg4_dinov2"
    assert kwargs == dict(img_size=518, patch_size=14, in_chans=3, embed_dim=384, depth=12, num_heads=6,
                          mlp_ratio=4.0, qkv_bias=True, proj_bias=True, init_values=1e-5, reg_tokens=4,
                          no_embed_class=True, num_classes=0, dynamic_img_size=True)
    assert tensors["pos_embed"].shape == (1, 37 * 37, 384) and tensors["reg_token"].shape == (1, 4, 384)

    giant = meta_backbone("vit_giant2", num_register_tokens=4, ffn_layer="swiglufused")
    tensors, name, kwargs = to_timm(giant.state_dict(), giant.arch_kwargs)
    assert name == "vit_giant_patch14_reg4_dinov2"
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]) == (1536, 40, 24)
    assert kwargs["reg_tokens"] == 4 and "mlp_layer" not in kwargs
    assert int(1536 * kwargs["mlp_ratio"]) == 8192 and tensors["blocks.39.mlp.fc1.weight"].shape == (8192, 1536)
    assert tensors["blocks.39.mlp.fc2.weight"].shape == (1536, 4096) and "mask_token" not in tensors

    base = meta_backbone("vit_base")
    assert to_timm(base.state_dict(), base.arch_kwargs)[1] == "vit_base_patch14_dinov2"


def test_timm_unnamed_architecture_is_refused_with_a_name_that_works():
    model = meta_backbone("vit_small", num_register_tokens=2)
    with pytest.raises(TimmNameError, match="num_register_tokens=2") as caught:
        to_timm(model.state_dict(), model.arch_kwargs)
    assert isinstance(caught.value, ValueError)
    assert "timm_name='vit_small_patch14_reg4_dinov2' works" in str(caught.value)  # same width, with registers
    kwargs = to_timm(model.state_dict(), model.arch_kwargs, timm_name="vit_small_patch14_reg4_dinov2")[2]
    assert kwargs["reg_tokens"] == 2  # the kwargs override the entry point's 4
    wide = meta_backbone("vit_large", ffn_layer="swiglufused")  # SwiGLU at width 1024: only giant builds SwiGLU
    assert "timm_name='vit_giant_patch14_dinov2'" in str(pytest.raises(TimmNameError, to_timm, wide.state_dict(),
                                                                          wide.arch_kwargs).value)
    with pytest.raises(TimmNameError, match="SwiGLUPacked"):
        to_timm(wide.state_dict(), wide.arch_kwargs, timm_name="vit_large_patch14_dinov2")


def test_timm_dynamic_size_only_where_timm_resizes_as_the_model():
    antialiased = meta_backbone("vit_small")  # AA: the registers family's bicubic antialiased, no offset
    assert timm_create_kwargs(antialiased.arch_kwargs)["dynamic_img_size"] is True
    legacy = {**antialiased.arch_kwargs, "interpolate_antialias": False, "interpolate_offset": 0.1}  # official no-reg
    assert timm_create_kwargs(legacy)["dynamic_img_size"] is False
