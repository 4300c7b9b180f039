"""Exports of the DINOv3 (RoPE) family through their libraries' front doors: transformers' DINOv3ViTModel (loaded
for real, through AutoModel and pipeline), the official DINOv3 hub layout, safetensors, timm's Eva layout (checked
against timm's naming, restated below; real timm runs in tests/export/test_timm.py), and the torch.hub entries in
DINOv3's dialect."""

import json
from pathlib import Path

import pytest
import torch
from launch_helpers import TINY

from dinoreg import load_backbone
from dinoreg.cli import main
from dinoreg.export.source import ExportError
from dinoreg.export.writers import official_load_overrides, export_backbone
from dinoreg.models import CheckpointMismatchError, build_backbone, build_rope_backbone
from dinoreg.models.format_common import FormatError, TimmNameError
from dinoreg.models.formats import from_timm, resolve_timm_name, to_timm
from dinoreg.models.weights import WeightsFileError, read_heads

REPO = str(Path(__file__).resolve().parents[2])
IMAGES = torch.Generator().manual_seed(0)
NATIVE = torch.rand(2, 3, 32, 32, generator=IMAGES)
OTHER = torch.rand(1, 3, 48, 40, generator=IMAGES)  # another grid, not square: RoPE resamples nothing

RELEASED = {}  # vits16's settings: mlp, mask_k_bias, LayerScale, layernormbf16, 4 storage tokens
VARIANTS = {
    "released": RELEASED,
    "swiglu-keybias-augments": dict(ffn_layer="swiglu", ffn_ratio=6.0, mask_k_bias=False,
                                    pos_embed_rope_shift_coords=0.5, pos_embed_rope_jitter_coords=1.5),
    "plain": dict(n_storage_tokens=0, qkv_bias=False, proj_bias=False, ffn_bias=False, layerscale_init=None,
                  norm_layer="layernorm", pos_embed_rope_base=50.0),
}


def tiny_rope(**kwargs):
    """vits16's settings at width 64, 2 blocks of 2 heads, patch 8, 32 px; every tensor moved off its
    initialisation, so a dropped or misplaced one would show."""
    model = build_rope_backbone("vits16", depth=2, embed_dim=64, num_heads=2, patch_size=8, img_size=32, **kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tokens(model, images):
    with torch.no_grad():
        out = model.forward_features(images)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def hf_outputs(folder, images):
    import transformers

    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "DINOv3ViTModel" and not model.training
    assert not any(info.values()), info  # every tensor used, none missing, none reshaped
    with torch.no_grad():
        out = model(pixel_values=images)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_dinov3_gives_load_backbones_features_and_round_trips_exactly(tmp_path, variant):
    pytest.importorskip("transformers")
    model = tiny_rope(**VARIANTS[variant])
    folder = export_backbone(model, None, fmt="hf", output=tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "preprocessor_config.json"]
    loaded = load_backbone(folder)
    assert type(loaded).__name__ == "RopeVisionTransformer" and loaded.n_storage_tokens == model.n_storage_tokens
    for images in (NATIVE, OTHER):
        hidden, pooled = hf_outputs(folder, images)
        ours = tokens(loaded, images)  # [B, 1 + S + HW, D]: cls, storage tokens, patches
        torch.testing.assert_close(hidden, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(pooled, ours[:, 0], atol=1e-4, rtol=0)
        assert torch.equal(ours, tokens(model, images))  # hf -> load_backbone is the exported model, exactly
    for name, value in model.state_dict().items():
        if name.endswith("attn.qkv.bias") and model.arch_kwargs["mask_k_bias"]:  # the masked keys' third is unused
            value, other = value.chunk(3)[::2], loaded.state_dict()[name].chunk(3)[::2]
            assert all(torch.equal(a, b) for a, b in zip(value, other)), name
        else:
            assert torch.equal(loaded.state_dict()[name], value), name
    config = json.loads((folder / "config.json").read_text())
    assert config["key_bias"] is (variant == "swiglu-keybias-augments")
    assert config["layer_norm_eps"] == (1e-6 if variant == "plain" else 1e-5)


def test_load_backbone_reads_what_transformers_itself_saves(tmp_path):
    """A DINOv3ViTModel folder written by save_pretrained (as the facebook/dinov3-* ones): the same model back."""
    transformers = pytest.importorskip("transformers")
    model = tiny_rope(**VARIANTS["swiglu-keybias-augments"])
    folder = export_backbone(model, None, fmt="hf", output=tmp_path / "hf")
    transformers.AutoModel.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    loaded = load_backbone(tmp_path / "saved")
    assert loaded.arch_kwargs == load_backbone(folder).arch_kwargs
    assert torch.equal(tokens(loaded, OTHER), tokens(model, OTHER))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    with pytest.raises(WeightsFileError, match="hidden_act='gelu_new' with use_gated_mlp=True"):
        load_backbone(folder)  # another activation than ours is refused, not computed as ours


def test_hf_dinov3_through_the_pipeline(tmp_path):
    """pipeline("image-feature-extraction") on a picture: the image processor of preprocessor_config.json, then
    DINOv3ViTModel; the same pixels through load_backbone give the same tokens and CLS."""
    transformers = pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    model = tiny_rope()
    folder = export_backbone(model, None, fmt="hf", output=tmp_path / "hf")
    extractor = transformers.pipeline("image-feature-extraction", model=str(folder))
    image = Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype("uint8"))
    pixels = transformers.AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)  # resized (shorter side 37) and centre-cropped to the training size
    ours = tokens(load_backbone(folder), pixels)
    torch.testing.assert_close(extractor(image, return_tensors=True), ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(extractor(image, return_tensors=True, pool=True), ours[:, 0], atol=1e-4, rtol=0)
    card = (folder / "README.md").read_text()
    assert "tags: [dinov3," in card and "| storage tokens (registers) | 4 |" in card and "DINOv3ViTModel" in card


@pytest.mark.parametrize("change, named", [
    (dict(norm_layer="rmsnorm"), "norm_layer='rmsnorm'"),
    (dict(untie_cls_and_patch_norms=True), "untie_cls_and_patch_norms=True"),
    (dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=50.0), "min/max periods"),
    (dict(pos_embed_rope_normalize_coords="max"), "pos_embed_rope_normalize_coords='max'"),
    (dict(pos_embed_rope_dtype="bf16"), "pos_embed_rope_dtype='bf16'"),
])
def test_what_hf_and_timm_cannot_compute_is_refused_naming_it(tmp_path, change, named):
    model = tiny_rope(**change)
    for fmt, output in (("hf", tmp_path / "hf"), ("timm", tmp_path / "t.pth")):
        with pytest.raises(FormatError, match="cannot compute this backbone as dinoreg does") as refused:
            export_backbone(model, None, fmt=fmt, output=output, timm_name="vit_small_patch16_dinov3_qkvb")
        assert named in str(refused.value) and "--format dinov3 or safetensors" in str(refused.value)
        assert "\n" not in str(refused.value) and not output.exists()


def test_rope_periods_other_than_the_bases_are_refused_unless_accepted(tmp_path):
    """transformers and timm recompute the periods from the base; a model holding others (the released files' bf16
    rounding, kept by a continued model) would silently compute other features there."""
    model = tiny_rope()
    with torch.no_grad():
        model.rope_embed.periods.copy_(model.rope_embed.periods.bfloat16().float())
    for fmt, output in (("hf", tmp_path / "hf"), ("timm", tmp_path / "t.pth")):
        with pytest.raises(FormatError, match="rope_embed.periods differ from what base 100.0 gives .*bf16.*"
                                              "allow_periods_mismatch=True"):
            export_backbone(model, None, fmt=fmt, output=output, timm_name="vit_small_patch16_dinov3")
    folder = export_backbone(model, None, fmt="hf", output=tmp_path / "hf", allow_periods_mismatch=True)
    assert 0 < (tokens(load_backbone(folder), OTHER) - tokens(model, OTHER)).abs().max() < 0.05
    # exported in bf16, every format keeps the periods' own precision: rounding them would change every output
    path = export_backbone(tiny_rope(), None, fmt="dinov3", output=tmp_path / "b.pth", dtype="bf16")
    state = torch.load(path, weights_only=True)
    assert state["rope_embed.periods"].dtype == torch.float32 and state["cls_token"].dtype == torch.bfloat16


def test_timm_layout_is_evas_and_reads_back(tmp_path):
    """timm's Eva names (timm/models/eva.py, the model its DINOv3 checkpoint filter loads into): reg_token, q_bias
    and v_bias beside the fused qkv weight (no key bias), gamma_1/gamma_2, SwiGLU fc1_g/fc1_x/fc2; no mask token,
    periods or bias masks (timm recomputes or has none)."""
    model = tiny_rope(ffn_layer="swiglu", ffn_ratio=6.0)
    tensors, name, kwargs = to_timm(model.state_dict(), model.arch_kwargs, timm_name="vit_small_plus_patch16_dinov3")
    sd = model.state_dict()
    assert name == "vit_small_plus_patch16_dinov3"
    assert torch.equal(tensors["reg_token"], sd["storage_tokens"])
    assert torch.equal(tensors["blocks.1.attn.q_bias"], sd["blocks.1.attn.qkv.bias"][:64])
    assert torch.equal(tensors["blocks.1.attn.v_bias"], sd["blocks.1.attn.qkv.bias"][128:])
    assert torch.equal(tensors["blocks.0.gamma_2"], sd["blocks.0.ls2.gamma"])
    assert torch.equal(tensors["blocks.0.mlp.fc1_x.weight"], sd["blocks.0.mlp.w2.weight"])
    assert not any(k.endswith(("bias_mask", "periods", "qkv.bias")) or k == "mask_token" for k in tensors)
    assert kwargs["swiglu_mlp"] and int(64 * kwargs["mlp_ratio"]) == sd["blocks.0.mlp.w1.weight"].shape[0]
    assert kwargs["num_reg_tokens"] == 4 and kwargs["global_pool"] == "token" and kwargs["dynamic_img_size"]
    back = build_rope_backbone("vits16", depth=2, embed_dim=64, num_heads=2, patch_size=8, img_size=32,
                               ffn_layer="swiglu", ffn_ratio=6.0).eval()
    back.load_state_dict(from_timm(tensors, model.arch_kwargs), strict=True)
    assert torch.equal(tokens(back, OTHER), tokens(model, OTHER))


def test_timm_names(tmp_path):
    with torch.device("meta"):  # shapes only
        released = {preset: build_rope_backbone(preset) for preset in ("vits16", "vitl16", "vith16plus", "vit7b16")}
    for preset, name in (("vits16", "vit_small_patch16_dinov3_qkvb"), ("vitl16", "vit_large_patch16_dinov3_qkvb"),
                         ("vith16plus", "vit_huge_plus_patch16_dinov3_qkvb"),
                         ("vit7b16", "vit_7b_patch16_dinov3")):  # timm has the 7B without q/v biases only
        assert resolve_timm_name(released[preset].arch_kwargs, None) == name
    tiny = tiny_rope()
    with pytest.raises(TimmNameError, match="timm registers no DINOv3 model for embed_dim=64.*timm_name="):
        to_timm(tiny.state_dict(), tiny.arch_kwargs)
    with pytest.raises(TimmNameError, match="'vit_small_patch14_reg4_dinov2' is not one of timm's DINOv3 models"):
        export_backbone(tiny, None, fmt="timm", output=tmp_path / "t.pth", timm_name="vit_small_patch14_reg4_dinov2")
    learned = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1, num_register_tokens=4)
    with pytest.raises(TimmNameError, match="builds a DINOv3 \\(RoPE\\) model.*vit_small_patch14_reg4_dinov2"):
        export_backbone(learned, None, fmt="timm", output=tmp_path / "t.pth", timm_name="vit_small_patch16_dinov3")
    assert not (tmp_path / "t.pth").exists()


def test_official_layouts_belong_to_their_family(tmp_path):
    rope, learned = tiny_rope(), build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1)
    with pytest.raises(ExportError, match="--format dinov2 writes the official DINOV2 layout.*RoPE.*--format dinov3"):
        export_backbone(rope, None, fmt="dinov2", output=tmp_path / "b.pth")
    with pytest.raises(ExportError, match="learned position embeddings.*use --format dinov2"):
        export_backbone(learned, None, fmt="dinov3", output=tmp_path / "b.pth")
    assert list(tmp_path.iterdir()) == []


def test_dinov3_layout_is_the_official_state_dict_and_loads_strictly(tmp_path):
    model = build_rope_backbone("vits16", depth=1).eval()  # the official hub's vits16 at depth 1
    path = export_backbone(model, None, fmt="dinov3", output=tmp_path / "vits16.pth")
    state = torch.load(path, weights_only=True)
    assert list(state) == list(model.state_dict())  # the official keys, in order (rope_embed.periods, bias_mask)
    assert official_load_overrides(model) == {}  # the released settings: a plain .pth needs no arguments
    images = torch.rand(1, 3, 64, 48)
    assert torch.equal(tokens(load_backbone(path), images), tokens(model, images))
    # what the shapes cannot tell (the released models' values are assumed): the CLI prints them to pass
    odd = build_rope_backbone("vits16", depth=1, num_heads=3, norm_layer="layernorm",
                              pos_embed_rope_normalize_coords="max", pos_embed_rope_rescale_coords=1.5)
    assert official_load_overrides(odd) == {"norm_layer": "layernorm", "pos_embed_rope_normalize_coords": "max",
                                          "pos_embed_rope_rescale_coords": 1.5}


def test_safetensors_records_the_rope_architecture(tmp_path):
    from safetensors import safe_open

    model = tiny_rope(**VARIANTS["swiglu-keybias-augments"])
    path = export_backbone(model, None, fmt="safetensors", output=tmp_path / "b.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["dinoreg_arch"]) == model.arch_kwargs
    loaded = load_backbone(path)
    assert loaded.arch_kwargs == model.arch_kwargs and torch.equal(tokens(loaded, OTHER), tokens(model, OTHER))


# --- dinoreg export of a RoPE training run ----------------------------------------------------------------------

RUN = ["--config", "tiny_rope_cpu", *TINY, "train.batch_size_per_gpu=4", "train.num_workers=0", "optim.epochs=1",
       "train.epoch_length=2", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0",
       "evaluation.knn_enabled=false", "monitor.period=0", "checkpoint.period=2"]


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("rope_run")
    assert main(["train", "--output-dir", str(run), *RUN]) == 0
    return run


def export(run, output, fmt, *flags):
    assert main(["export", str(run), "--format", fmt, "--output", str(output), *flags]) == 0
    return output


def test_every_format_of_a_rope_run_gives_the_teachers_features(rope_run, tmp_path, capsys):
    teacher = load_backbone(rope_run / "teacher_backbone.safetensors")
    assert teacher.pos_embed_type == "rope" and teacher.n_storage_tokens == 4
    outputs = [export(rope_run, tmp_path / "b.pth", "dinov3"),
               export(rope_run, tmp_path / "b.safetensors", "safetensors"),
               export(rope_run, tmp_path / "t.pth", "timm", "--timm-name", "vit_small_patch16_dinov3_qkvb")]
    pytest.importorskip("transformers")
    outputs.append(export(rope_run, tmp_path / "hf", "hf"))
    for path in outputs:
        for images in (NATIVE, OTHER):
            torch.testing.assert_close(tokens(load_backbone(path), images), tokens(teacher, images), atol=1e-5,
                                       rtol=0, msg=str(path))
    hidden, _ = hf_outputs(tmp_path / "hf", OTHER)
    torch.testing.assert_close(hidden, tokens(teacher, OTHER), atol=1e-4, rtol=0)
    assert torch.load(tmp_path / "t.pth", weights_only=True)["model_name"] == "vit_small_patch16_dinov3_qkvb"


def test_a_rope_runs_official_teacher_checkpoint_with_heads(rope_run, tmp_path):
    path = export(rope_run, tmp_path / "teacher.pth", "dinov3", "--with-heads")
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["teacher"]  # the official training's teacher_checkpoint.pth
    parts = {key.split(".")[0] for key in saved["teacher"]}
    assert parts == {"backbone", "dino_head"}  # the tiny recipe's iBOT shares the DINO head
    assert set(read_heads(path)) == {"dino_head"} and "dino_head.last_layer.weight_g" in saved["teacher"]
    assert load_backbone(path).n_storage_tokens == 4


def test_bad_format_or_timm_name_for_a_rope_run_is_one_line(rope_run, tmp_path, capsys):
    def one_line(*args):
        assert main(["export", str(rope_run), *args]) == 1
        error = capsys.readouterr().err.strip()
        assert "Traceback" not in error and len(error.splitlines()) == 1, error
        return error

    assert "use --format dinov3" in one_line("--format", "dinov2", "--output", str(tmp_path / "b.pth"))
    error = one_line("--format", "timm", "--output", str(tmp_path / "t.pth"), "--timm-name", "vit_small_patch14_dinov2")
    assert "is not one of timm's DINOv3 models" in error and "--timm-name vit_small_patch16_dinov3_qkvb" in error
    error = one_line("--format", "timm", "--output", str(tmp_path / "t.pth"))
    assert "timm registers no DINOv3 model for embed_dim=32" in error and "--timm-name 'vit_small" in error
    assert list(tmp_path.iterdir()) == []


# --- torch.hub in DINOv3's dialect ------------------------------------------------------------------------------

def hub(name, **kwargs):
    return torch.hub.load(REPO, name, source="local", **kwargs)


@pytest.mark.parametrize("preset", ["vits16", "vits16plus", "vitb16", "vitl16", "vitl16plus", "vith16plus", "vit7b16"])
def test_every_preset_has_an_entry_with_the_presets_architecture(preset):
    with torch.device("meta"):  # shapes only: vit7b16 is 7 billion parameters
        model = hub(f"dinov3_{preset}", pretrained=False)
        assert model.arch_kwargs == build_rope_backbone(preset).arch_kwargs and not model.training


def test_hub_entry_initialises_as_dinov3_and_loads_files_strictly(tmp_path):
    torch.manual_seed(0)
    model = hub("dinov3_vits16", pretrained=False, depth=1)
    assert model.n_blocks == 1 and model.n_storage_tokens == 4 and model.blocks[0].ls1.gamma.eq(1e-5).all()
    assert 0.015 < model.cls_token.std() < 0.025  # DINOv3's init: normal(std 0.02), not DINOv2's 1e-6
    path = export_backbone(model, None, fmt="dinov3", output=tmp_path / "vits16.pth")
    loaded = hub("dinov3_vits16", weights=str(path), depth=1)
    images = torch.rand(1, 3, 48, 64)
    assert torch.equal(tokens(loaded, images), tokens(model, images)) and not loaded.training
    torch.hub.set_dir(str(tmp_path / "hub_cache"))  # a URL is fetched to torch.hub's cache, as the official hub does
    assert torch.equal(tokens(hub("dinov3_vits16", weights=path.as_uri(), depth=1), images), tokens(model, images))
    with pytest.raises(CheckpointMismatchError, match="missing.*blocks.1"):
        hub("dinov3_vits16", weights=str(path), depth=2)
    other = tiny_rope(norm_layer="layernorm")  # a file that records another architecture
    recorded = export_backbone(other, None, fmt="safetensors", output=tmp_path / "o.safetensors")
    with pytest.raises(CheckpointMismatchError, match="embed_dim=64 .*norm_layer='layernorm'.*dinoreg_backbone"):
        hub("dinov3_vits16", weights=str(recorded), depth=1)


def test_hub_entry_says_where_the_released_weights_are(tmp_path):
    for kwargs in ({}, {"pretrained": True}, {"weights": "LVD1689M"}):
        with pytest.raises(WeightsFileError, match="Meta's, under the DINOv3 License.*dinov3-downloads.*weights=PATH"):
            hub("dinov3_vitl16", **kwargs)
    with pytest.raises(WeightsFileError, match="does not exist"):
        hub("dinov3_vitl16", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsFileError, match="pass one or the other"):
        hub("dinov3_vitl16", pretrained=False, weights=str(tmp_path / "missing.pth"))
