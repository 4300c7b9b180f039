"""`dinoreg analyze antialias` (Fig. 11 striping) and `dinoreg analyze disconnect` (cls attention masses, register
ablation) on tiny backbones, including one built so that cls and patches ignore the registers exactly."""

import json

import pytest
import torch

from dinoreg.analysis.antialias import default_target_grid
from dinoreg.analysis.disconnect import ablated_cls, bank_split
from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.models.pos_embed import resample_patch_pos_embed
from dinoreg.models.weights import save_backbone

IMAGES = "synthetic:size=80,image_size=32"  # val split: 16 images, labels 0-7 twice
KEYS = {"tool", "weights", "images", "num_images", "grid", "num_register_tokens", "layers", "ablation", "from_layer",
        "ablated", "note", "cosine_similarity", "knn", "knn_note", "knn_top1_unablated", "knn_top1_ablated"}


def tiny(registers, *, depth=2, init_values=1.0, seed=0):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny", patch_size=8, img_size=32, depth=depth, num_register_tokens=registers,
                          init_values=init_values, interpolate_antialias=True, interpolate_offset=0.0).eval()


def saved(model, tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    save_backbone(model, path)
    return path


def analyze(tool, weights, out, *extra, max_images=16):
    assert main(["analyze", tool, "--weights", str(weights), "--images", IMAGES, "--max-images", str(max_images),
                 "--batch-size", "4", "--out", str(out), *extra]) == 0
    return json.loads((out / f"{tool}.json").read_text())


def reference_striping(antialias):
    """tests/models/test_pos_embed.py's Fig. 11 measure: cv of per-row gradient sums, 16x16 -> 7x7."""
    grid = torch.zeros(1, 16 * 16, 8, requires_grad=True)
    resample_patch_pos_embed(grid, (7, 7), antialias=antialias, offset=0.0).sum().backward()
    rows = grid.grad[0, :, 0].view(16, 16).sum(dim=1)
    return (rows.std() / rows.mean()).item()


def test_antialias_shows_striping_only_without_antialiasing(tmp_path):
    weights = saved(tiny(4), tmp_path, "reg4")
    result = analyze("antialias", weights, tmp_path / "aa", "--source-grid", "16", "--target-grid", "7")
    assert result["source_grid"] == [16, 16] and result["target_grid"] == [7, 7] and result["embed_dim"] == 192
    striped, smooth = result["without_antialias"], result["with_antialias"]
    assert striped["striping_rows"] == pytest.approx(reference_striping(False), abs=1e-5)
    assert smooth["striping_rows"] == pytest.approx(reference_striping(True), abs=1e-5)
    assert striped["striping_rows"] > 0.5 > 0.15 > smooth["striping_rows"]  # measured 0.96 and 0.08
    for setting in (striped, smooth):
        assert setting["striping_columns"] == pytest.approx(setting["striping_rows"], abs=1e-6)  # separable, square
        assert len(setting["row_sums"]) == 16 and len(setting["gradient"]) == 16
        assert sum(setting["row_sums"]) == pytest.approx(7 * 7, abs=1e-3)  # each output's bicubic weights sum to 1
    assert min(striped["row_sums"]) < 0.05 and min(smooth["row_sums"]) > 0.1  # skipped rows only without antialias
    assert result["model_interpolation"] == {"antialias": True, "offset": 0.0}
    assert (tmp_path / "aa" / "antialias.png").stat().st_size > 0

    own = analyze("antialias", weights, tmp_path / "own")  # the backbone's own 4x4 grid -> its local-crop grid
    assert own["source_grid"] == [4, 4] and own["target_grid"] == [2, 2]
    assert default_target_grid(16) == 7 and default_target_grid(37) == 16


def test_explicit_attention_reproduces_the_blocks_attention_output():
    model = tiny(4)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.blocks[0](model.prepare_tokens_with_masks(images))  # [3, 1 + 4 + 16, 192]: block 1's input
        block = model.blocks[1]
        probs = block.attention_probs(tokens)  # [3, 3, 21, 21]
        values = block.attn.qkv(block.norm1(tokens)).view(3, 21, 3, 3, 64)[:, :, 2].transpose(1, 2)  # [3, 3, 21, 64]
        heads = (probs @ values).transpose(1, 2).reshape(3, 21, 192)
        ours = block.attn.proj(heads)
        theirs = block.attn(block.norm1(tokens).reshape(-1, 192), [(3, 21)]).view(3, 21, 192)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        cls_probs = block.attention_probs(tokens, num_queries=1)
        torch.testing.assert_close(cls_probs, probs[:, :, :1])
        # the ablation loop with nothing ablated is the model's own forward
        unablated = ablated_cls(model, images, from_layer=2, replacements=torch.zeros(2, 4, 192))
        torch.testing.assert_close(unablated, model.forward_features(images)["x_norm_clstoken"])


def test_disconnect_without_registers_reports_zero_mass_and_no_ablation(tmp_path):
    weights = saved(tiny(0), tmp_path, "reg0")
    result = analyze("disconnect", weights, tmp_path / "out")
    assert set(result) == KEYS
    assert result["num_register_tokens"] == 0 and result["num_images"] == 16
    assert all(layer["cls_to_registers"] == 0.0 for layer in result["layers"])
    assert not result["ablated"] and "no register tokens" in result["note"]
    assert result["cosine_similarity"] is None and result["knn_top1_ablated"] is None
    assert 0.0 <= result["knn_top1_unablated"] <= 1.0
    assert result["knn"]["bank_size"] == result["knn"]["query_size"] == 8
    assert (tmp_path / "out" / "disconnect.png").stat().st_size > 0
    single = analyze("disconnect", weights, tmp_path / "single", max_images=8)  # one image per class: no query
    assert single["knn"] is None and single["knn_top1_unablated"] is None and "at least 2 images" in single["knn_note"]


def test_the_knn_split_puts_every_class_in_bank_and_queries():
    labels = torch.arange(16) % 8  # a plain alternation would put classes 0, 2, ... in the bank only
    bank = bank_split(labels)
    assert set(labels[bank].tolist()) == set(labels[~bank].tolist()) == set(range(8))
    assert bank_split(torch.tensor([3, 3, 3, 1])).tolist() == [True, False, True, True]


def test_disconnect_with_registers_measures_masses_and_ablation(tmp_path):
    model = tiny(4)
    with torch.no_grad():
        model.register_tokens.normal_(std=1.0)  # registers with content, so that replacing them matters
    weights = saved(model, tmp_path, "reg4")
    zero = analyze("disconnect", weights, tmp_path / "zero", "--from-layer", "0")
    assert set(zero) == KEYS and zero["ablated"] and zero["note"] is None and zero["ablation"] == "zero"
    for layer in zero["layers"]:
        assert sum(layer[key] for key in ("cls_to_cls", "cls_to_registers", "cls_to_patches")) == \
            pytest.approx(1.0, abs=1e-6)
        assert layer["cls_to_registers"] > 0.05  # 4 of 21 tokens
    assert zero["cosine_similarity"] < 0.999
    assert 0.0 <= zero["knn_top1_ablated"] <= 1.0 and 0.0 <= zero["knn_top1_unablated"] <= 1.0
    mean = analyze("disconnect", weights, tmp_path / "mean", "--ablation", "mean")
    assert mean["ablation"] == "mean" and mean["from_layer"] == 1  # default: the middle block of 2
    assert mean["layers"] == zero["layers"] and -1.0 <= mean["cosine_similarity"] <= 1.0


def registers_ignored(*, masked=True):
    """A model whose cls and patch tokens give the registers exactly zero attention, before and after ablation.

    Channel 0 carries +100 in cls and patch tokens, -100 in the registers (and 0 in zero-ablated ones). In every
    head, one query dimension is a constant 1 and the matching key dimension reads 100x the normalised channel 0:
    the score of a register key is at least ~170 below that of a non-register one, so softmax gives it 0. Without
    ``masked`` that key dimension is 0 and the registers are attended to like any token."""
    model = tiny(4, depth=3)
    with torch.no_grad():
        model.pos_embed[0, :, 0] = 100.0
        model.cls_token[0, 0, 0] = 0.0  # the cls position of pos_embed adds the 100
        model.register_tokens.zero_()
        model.register_tokens[0, :, 0] = -100.0
        for block in model.blocks:
            qkv, head_dim = block.attn.qkv, block.attn.head_dim
            for head in range(block.attn.num_heads):
                query, key = head * head_dim, 192 + head * head_dim
                qkv.weight[query].zero_()
                qkv.bias[query] = 1.0
                qkv.weight[key].zero_()
                qkv.weight[key, 0] = 100.0 if masked else 0.0
                qkv.bias[key] = 0.0
    return model


def test_ablating_registers_that_nothing_attends_to_changes_nothing(tmp_path):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(3, 4, 192)
    with torch.no_grad():
        for masked in (True, False):
            model = registers_ignored(masked=masked)
            change = (ablated_cls(model, images, from_layer=0, replacements=zeros)
                      - model.forward_features(images)["x_norm_clstoken"]).abs().max()
            assert (change == 0) if masked else (change > 1e-3)  # measured: 0 exactly, and 0.01 (control)
    weights = saved(registers_ignored(), tmp_path, "ignored")
    for ablation in ("zero", "mean"):
        result = analyze("disconnect", weights, tmp_path / ablation, "--ablation", ablation, "--from-layer", "0")
        assert all(layer["cls_to_registers"] == 0.0 for layer in result["layers"])
        assert result["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
        assert result["knn_top1_ablated"] == result["knn_top1_unablated"]


def test_bad_from_layer_is_a_clear_error(tmp_path, capsys):
    weights = saved(tiny(4), tmp_path, "reg4")
    assert main(["analyze", "disconnect", "--weights", str(weights), "--images", IMAGES, "--from-layer", "2",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--from-layer 2" in capsys.readouterr().err
