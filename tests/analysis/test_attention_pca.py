"""`dinoreg analyze attention|pca`: explicit attention against the block's own, a planted attention sink,
PCA on planted structure."""

import json
import math

import pytest
import torch

import dinoreg.analysis.attention as attention_module
from dinoreg.analysis.attention import query_attention
from dinoreg.analysis.pca import min_max, principal_components
from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.models.weights import save_backbone

IMAGES = "synthetic:size=40,image_size=32"
PLANTED = (2, 1)  # (row, column) of the 4x4 grid that every query attends to


def tiny(*, registers=4, depth=2):
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=8, img_size=32, depth=depth, num_register_tokens=registers,
                          init_values=1.0, interpolate_antialias=True, interpolate_offset=0.0).eval()


def saved(model, path):
    save_backbone(model, path)
    return path


def analyze(tool, weights, out, *extra):
    assert main(["analyze", tool, "--weights", str(weights), "--images", IMAGES, "--max-images", "10",
                 "--batch-size", "4", "--out", str(out), *extra]) == 0
    return json.loads((out / f"{tool}.json").read_text())


def panel_titles(monkeypatch):
    """The titles of every axis (panels and colour bars) of each figure the attention tool saves."""
    figures, original = [], attention_module.save_figure

    def record(figure, path):
        figures.append([axis.get_title() for axis in figure.axes])
        return original(figure, path)

    monkeypatch.setattr(attention_module, "save_figure", record)
    return figures


def plant_attention_sink(model):
    """Every query attends to one grid position: all queries are the constant vector q (zero weights, bias q),
    and a key is q scaled by the normalised token's component along a direction planted, huge, in that
    position's embedding."""
    direction = torch.nn.functional.normalize(torch.randn(192), dim=0)
    qkv = model.blocks[-1].attn.qkv
    with torch.no_grad():
        model.pos_embed[0, 1 + 4 * PLANTED[0] + PLANTED[1]] += 300.0 * direction
        qkv.weight[:192] = 0
        qkv.bias[:192] = 1.0
        qkv.weight[192:384] = torch.outer(torch.ones(192), direction)
        qkv.bias[192:384] = 0
    return model


def test_planted_attention_sink_is_found_and_plotted(tmp_path, monkeypatch):
    figures = panel_titles(monkeypatch)
    model = plant_attention_sink(tiny(depth=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weights = saved(model, tmp_path / "sink.safetensors")
    result = analyze("attention", weights, tmp_path / "sink")
    assert {"layer", "num_layers", "num_heads", "num_register_tokens", "grid", "num_images", "entropy_uniform",
            "queries"} <= set(result)
    assert (result["layer"], result["num_heads"], result["num_register_tokens"]) == (0, 3, 4)
    assert result["grid"] == [4, 4] and result["num_images"] == 8
    assert list(result["queries"]) == ["cls", "reg0", "reg1", "reg2", "reg3"]
    for query in result["queries"].values():
        assert query["mass"]["patches"] > 0.999 and query["max_attention"] > 0.999 and query["entropy"] < 0.01
        assert len(query["per_head"]["entropy"]) == 3
        assert sum(query["mass"][part] for part in ("cls", "registers", "patches")) == pytest.approx(1, abs=1e-5)
    assert result["entropy_uniform"] == pytest.approx(math.log(16))
    assert (tmp_path / "sink" / "attention_maps.png").stat().st_size > 0
    titles = figures[0]
    assert [t for t in titles if t] == ["image", "[CLS]", "reg0", "reg1", "reg2", "reg3"]
    assert len(titles) == 6 * 6 + 6 * 5  # 6 images x (image + 5 maps) panels, one colour bar per map
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the tool changed nothing

    # the plotted maps (patch part, mean over heads) peak on the planted position in every image
    images = torch.randn(4, 3, 32, 32)
    maps = query_attention(model, images, layer=0)[..., 5:].mean(1)  # [B, 1 + R, HW]
    assert (maps.argmax(-1) == 4 * PLANTED[0] + PLANTED[1]).all()


def test_without_registers_only_the_cls_panel_and_layer_option(tmp_path, monkeypatch, capsys):
    figures = panel_titles(monkeypatch)
    weights = saved(tiny(registers=0), tmp_path / "plain.safetensors")
    result = analyze("attention", weights, tmp_path / "plain", "--layer", "0")
    assert result["layer"] == 0 and result["num_layers"] == 2 and list(result["queries"]) == ["cls"]
    cls = result["queries"]["cls"]
    assert cls["mass"]["registers"] == 0.0 and cls["mass"]["self"] == pytest.approx(cls["mass"]["cls"])
    assert 0 < cls["entropy"] <= result["entropy_uniform"] + 1e-6
    assert [t for t in figures[0] if t] == ["image", "[CLS]"]
    assert main(["analyze", "attention", "--weights", str(weights), "--images", IMAGES, "--layer", "2",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--layer 2: the backbone has 2 blocks" in capsys.readouterr().err


def test_pca_recovers_planted_principal_directions():
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(64, 3, generator=generator)).Q  # [D, 3] orthonormal
    scales = torch.tensor([5.0, 3.0, 2.0])
    draws = torch.randn(4000, 3, generator=generator)
    # exactly uncorrelated, centred latent coordinates: their sample covariance is diag(scales**2)
    latent = torch.linalg.qr(draws - draws.mean(0)).Q * math.sqrt(4000 - 1) * scales  # [M, 3]
    features = latent @ directions.T + 0.01 * torch.randn(4000, 64, generator=generator) + 7.0
    pca = principal_components(features, num_components=5)
    cosines = pca.components[:3].float() @ directions  # [3, 3]
    assert torch.allclose(cosines.abs(), torch.eye(3), atol=1e-3)
    variances = latent.var(0)
    expected = variances / (variances.sum() + 64 * 0.01**2)
    assert torch.allclose(pca.explained_variance_ratio[:3].float(), expected, rtol=2e-3)
    assert pca.explained_variance_ratio[3] < 1e-4
    scaled = min_max(pca.project(features)[:, :3])
    assert scaled.amin(0).tolist() == [0, 0, 0] and scaled.amax(0).tolist() == [1, 1, 1]


def test_pca_tool_on_features_that_live_in_three_dimensions(tmp_path):
    """Zero patch embedding and residual branches: every output depends on position only, through three
    planted positional directions; the PCA must explain all variance with three components."""
    model = tiny(registers=0)
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(192, 3, generator=generator)).Q
    basis = basis - basis.mean(0)  # zero mean over channels: LayerNorm only rescales each token
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        for block in model.blocks:
            block.ls1.gamma.zero_()
            block.ls2.gamma.zero_()
        model.pos_embed[0, 1:] = torch.randn(16, 3, generator=generator) @ basis.T
    weights = saved(model, tmp_path / "positional.safetensors")
    result = analyze("pca", weights, tmp_path / "pca")
    assert {"num_images", "grid", "feature_dim", "num_patches", "explained_variance_ratio",
            "cumulative_explained_variance_ratio", "foreground"} <= set(result)
    assert result["num_images"] == 8 and result["grid"] == [4, 4] and result["num_patches"] == 128
    assert result["feature_dim"] == 192 and len(result["explained_variance_ratio"]) == 10
    assert sum(result["explained_variance_ratio"][:3]) > 0.999 and result["explained_variance_ratio"][3] < 1e-4
    assert result["foreground"] is None
    for name in ("pca_maps.png", "pca_variance.png"):
        assert (tmp_path / "pca" / name).stat().st_size > 0

    masked = analyze("pca", weights, tmp_path / "foreground", "--foreground-threshold", "0.5")
    foreground = masked["foreground"]
    assert {"threshold", "fraction", "fraction_per_image", "explained_variance_ratio"} <= set(foreground)
    # identical features in every image: the same positions are foreground everywhere
    assert 0 < foreground["fraction"] < 1 and len(set(foreground["fraction_per_image"])) == 1
    assert sum(foreground["explained_variance_ratio"][:3]) > 0.999
    assert main(["analyze", "pca", "--weights", str(weights), "--images", IMAGES, "--foreground-threshold", "1.5",
                 "--out", str(tmp_path / "bad")]) == 2
