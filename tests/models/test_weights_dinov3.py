"""DINOv3-layout files (the official hub layout, a training ``teacher_checkpoint`` with heads, our safetensors) load
strictly through ``dinoreg.load_backbone``, with the architecture inferred from the tensors; a misfit is refused in
one line naming the key."""

import json

import pytest
import torch
from safetensors import safe_open

import dinoreg
from dinoreg.models import CheckpointMismatchError
from dinoreg.models.backbones import backbone_from_arch_kwargs
from dinoreg.models.rope import RopePositionEmbedding
from dinoreg.models.rope_vit import ROPE_PRESETS, RopeVisionTransformer, build_rope_backbone
from dinoreg.models.weights import METADATA_KEY, infer_arch_kwargs, save_backbone
from rope_reference import official_rope_key_names


def shapes(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def test_our_keys_are_the_official_ones():
    model = build_rope_backbone("vits16", depth=2)
    assert set(model.state_dict()) == official_rope_key_names(2, storage=True)
    with torch.device("meta"):
        big = build_rope_backbone("vit7b16", embed_dim=64, num_heads=4, depth=2)
    assert set(big.state_dict()) == official_rope_key_names(2, storage=True, qkv_bias=False, ffn="swiglu",
                                                            untie_local=True)
    untied = RopeVisionTransformer(embed_dim=32, num_heads=2, depth=1, untie_cls_and_patch_norms=True,
                                   mask_k_bias=False, layerscale_init=None)
    assert set(untied.state_dict()) == official_rope_key_names(1, storage=False, mask_k_bias=False, layerscale=False,
                                                               untie_cls=True)


@pytest.mark.parametrize("preset", list(ROPE_PRESETS))
def test_a_presets_architecture_is_inferred_from_its_tensors(preset):
    with torch.device("meta"):  # shapes without memory, even for vit7b16
        model = build_rope_backbone(preset, depth=1)
    state = dict(model.state_dict())
    # the only values inference reads: the RoPE periods, as the model computes them
    state["rope_embed.periods"] = RopePositionEmbedding(model.embed_dim, num_heads=model.num_heads).periods
    inferred = infer_arch_kwargs(state)
    assert inferred == model.arch_kwargs
    with torch.device("meta"):
        rebuilt = backbone_from_arch_kwargs(inferred)
    assert isinstance(rebuilt, RopeVisionTransformer) and shapes(rebuilt.state_dict()) == shapes(model.state_dict())


@pytest.mark.parametrize("periods", [
    dict(pos_embed_rope_base=100.0), dict(pos_embed_rope_base=1000.0), dict(pos_embed_rope_base=37.5),
    dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=40.0),
    dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.001, pos_embed_rope_max_period=1.2345),
])
def test_rope_periods_are_inferred_from_base_or_min_max(periods):
    model = RopeVisionTransformer(embed_dim=64, num_heads=2, depth=1, pos_embed_rope_dtype="fp32", **periods)
    inferred = infer_arch_kwargs(model.state_dict())
    wanted = {"pos_embed_rope_min_period": None, "pos_embed_rope_max_period": None, **periods}
    assert {key: inferred[key] for key in wanted} == wanted


def test_periods_computed_in_float64_elsewhere_give_the_round_base():
    state = dict(RopeVisionTransformer(embed_dim=64, num_heads=1, depth=1).state_dict())
    state["rope_embed.periods"] = (100.0 ** (torch.arange(16, dtype=torch.float64) * 4 / 64)).float()
    assert infer_arch_kwargs(state)["pos_embed_rope_base"] == 100.0


def official_files(tmp_path, model):
    """The hub layout (a flat state dict) and an official training teacher_checkpoint with its heads (DINOv3's heads
    have a plain ``last_layer.weight``)."""
    state = model.state_dict()
    hub = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(state, hub)
    heads = {f"{head}.{key}": torch.randn(*shape) for head in ("dino_head", "ibot_head") for key, shape in (
        ("mlp.0.weight", (64, 384)), ("mlp.0.bias", (64,)), ("mlp.2.weight", (16, 64)), ("mlp.2.bias", (16,)),
        ("last_layer.weight", (128, 16)))}
    teacher = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **heads}}, teacher)
    return hub, teacher


def test_official_layout_files_load_strictly_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    source = build_rope_backbone("vits16", depth=1).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = source.forward_features(x)
    for path in official_files(tmp_path, source):
        loaded = dinoreg.load_backbone(path)
        assert isinstance(loaded, RopeVisionTransformer) and not loaded.training
        assert loaded.arch_kwargs == source.arch_kwargs
        state = loaded.state_dict()
        assert all(torch.equal(state[key], value) for key, value in source.state_dict().items())
        with torch.no_grad():
            out = loaded.forward_features(x)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            assert torch.equal(out[key], expected[key])


@pytest.mark.parametrize("change, named", [
    (lambda sd: sd.pop("blocks.0.norm2.weight"), "missing (1): blocks.0.norm2.weight"),
    (lambda sd: sd.__setitem__("blocks.0.attn.extra", torch.zeros(3)), "unexpected (1): blocks.0.attn.extra"),
    (lambda sd: sd.__setitem__("blocks.0.ls1.gamma", torch.zeros(5)),
     "mis-shaped (1): blocks.0.ls1.gamma: checkpoint "),
])
def test_a_file_with_a_missing_or_extra_key_is_refused_naming_it(tmp_path, change, named):
    state = dict(build_rope_backbone("vits16", embed_dim=64, num_heads=1, depth=1).state_dict())
    change(state)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as refusal:
        dinoreg.load_backbone(path)
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {path} does not fit the model: {named}")


def test_our_safetensors_round_trip_with_metadata(tmp_path):
    torch.manual_seed(0)
    arch = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, n_storage_tokens=2, pos_embed_rope_base=None,
                pos_embed_rope_min_period=0.25, pos_embed_rope_max_period=30.0, pos_embed_rope_normalize_coords="max",
                pos_embed_rope_shift_coords=0.1, pos_embed_rope_jitter_coords=1.2, pos_embed_rope_rescale_coords=None,
                pos_embed_rope_dtype="bf16", norm_layer="rmsnorm", ffn_layer="swiglu64", ffn_ratio=3.0, qkv_bias=False,
                mask_k_bias=True, untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    source = RopeVisionTransformer(**arch).eval()
    path = tmp_path / "backbone.safetensors"
    save_backbone(source, path)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == source.arch_kwargs
    loaded = dinoreg.load_backbone(path)
    assert loaded.arch_kwargs == source.arch_kwargs
    assert {k: v for k, v in loaded.arch_kwargs.items() if k in arch} == arch
    x = torch.randn(2, 3, 16, 40)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x)["x_prenorm"], source.forward_features(x)["x_prenorm"])
