"""FLOP counting: the SDPA handler against a hand count, and the registers paper's Fig. 12."""

import pytest
import torch

from dinoreg.models import build_backbone
from dinoreg.tools.flops import count_flops, count_parameters, flop_analysis, flops_vs_registers

EMBED_DIM, HEADS, PATCH, IMG = 192, 3, 16, 32  # vit_tiny width, 2x2 patches


def tiny(num_register_tokens: int) -> torch.nn.Module:
    return build_backbone("vit_tiny", depth=1, patch_size=PATCH, img_size=IMG,
                          num_register_tokens=num_register_tokens, init_values=1.0).eval()


def hand_count(num_register_tokens: int) -> dict[str, int]:
    """Multiply-adds of one image through a depth-1 ViT, operator by operator."""
    d, patches = EMBED_DIM, (IMG // PATCH) ** 2
    n = 1 + num_register_tokens + patches
    head_dim = d // HEADS
    return {
        "conv": patches * d * 3 * PATCH * PATCH,
        "linear": n * d * 3 * d + n * d * d + n * d * 4 * d + n * 4 * d * d,  # qkv, proj, fc1, fc2
        "scaled_dot_product_attention": HEADS * n * n * head_dim * 2,  # q @ k^T and attn @ v
        "layer_norm": 3 * n * d * 5,  # norm1, norm2, final norm; fvcore's 5 per element (affine)
    }


@pytest.mark.parametrize("num_register_tokens", [0, 4])
def test_flops_match_hand_count(num_register_tokens):
    model = tiny(num_register_tokens)
    expected = hand_count(num_register_tokens)
    with torch.no_grad():
        analysis = flop_analysis(model, IMG)
        assert dict(analysis.by_operator()) == expected
        assert not analysis.unsupported_ops(), "an operator with real cost went uncounted"
        # fvcore alone misses attention entirely; the handler adds exactly the hand-computed part
        without = flop_analysis(model, IMG, count_attention=False).total()
    assert analysis.total() - without == expected["scaled_dot_product_attention"]
    assert count_flops(model, IMG) == sum(expected.values())


def test_count_flops_is_per_image_and_keeps_mode():
    model = tiny(2).train()
    assert count_flops(model, IMG, batch_size=3) == count_flops(model, (IMG, IMG)) == sum(hand_count(2).values())
    assert model.training


def test_vit_large_fig12_register_overhead():
    """Darcet et al. 2023, Fig. 12: ViT-L/14 at 224, 4 registers cost < 2% FLOPs, 16 about 6%."""
    rows = {row["registers"]: row for row in flops_vs_registers("vit_large", 14, 224, [0, 4, 16])}
    base = rows[0]["flops"]
    assert base > 7e10  # ~81 G multiply-adds
    assert (rows[4]["flops"] - base) / base < 0.02
    assert 0.04 < (rows[16]["flops"] - base) / base < 0.08
    for registers, row in rows.items():
        assert row["params"] - rows[0]["params"] == registers * 1024  # only register_tokens differ
        assert isinstance(row["flops"], int)


def test_params_differ_only_by_register_tokens():
    base = count_parameters(tiny(0))
    model = tiny(8)
    assert count_parameters(model) - base == model.register_tokens.numel() == 8 * EMBED_DIM


# --- the RoPE family (DINOv3) ---------------------------------------------------------------------------------------

ROPE_DIM, ROPE_HEADS, ROPE_PATCH, STORAGE = 64, 2, 8, 3


def tiny_rope(norm_layer: str, size: int = 32) -> torch.nn.Module:
    """One block of every DINOv3 option that costs work: split SwiGLU (ratio 3, aligned to 8), mask_k_bias, untied
    class / patch norms, storage tokens, RoPE."""
    from dinoreg.models import RopeVisionTransformer  # noqa: PLC0415

    return RopeVisionTransformer(img_size=size, patch_size=ROPE_PATCH, embed_dim=ROPE_DIM, depth=1,
                                 num_heads=ROPE_HEADS, ffn_layer="swiglu", ffn_ratio=3.0, n_storage_tokens=STORAGE,
                                 mask_k_bias=True, untie_cls_and_patch_norms=True, norm_layer=norm_layer,
                                 layerscale_init=1.0, pos_embed_rope_dtype="fp32").eval()


def rope_hand_count(height: int, width: int, norm_layer: str) -> dict[str, int]:
    """Multiply-adds of one image through a depth-1 RoPE ViT, by kind of work."""
    d, patches, head_dim = ROPE_DIM, (height // ROPE_PATCH) * (width // ROPE_PATCH), ROPE_DIM // ROPE_HEADS
    n = 1 + STORAGE + patches
    hidden = 128  # SwiGLU: 2/3 of 3 x 64 = 128, a multiple of 8
    # norm1, norm2, and the final norms: cls_norm over the class and storage tokens, norm over the patches
    norm_elements = 3 * n * d
    return {
        "conv": patches * d * 3 * ROPE_PATCH * ROPE_PATCH,
        "linear": n * d * 3 * d + n * d * d + 2 * n * d * hidden + n * hidden * d,  # qkv, proj, w1 and w2, w3
        "scaled_dot_product_attention": ROPE_HEADS * n * n * head_dim * 2,
        # x * cos + rotate_half(x) * sin on the queries and keys of the patches only: 2 multiply-adds per element
        "rope": 2 * 2 * ROPE_HEADS * patches * head_dim,
        "norms": norm_elements * (4 if norm_layer == "rmsnorm" else 5),
    }


@pytest.mark.parametrize("norm_layer", ["rmsnorm", "layernormbf16"])
def test_rope_flops_match_a_hand_count_in_both_counters(norm_layer):
    from dinoreg.tools.flops import count_flops_on_meta, forward_flops  # noqa: PLC0415

    torch.manual_seed(0)
    model = tiny_rope(norm_layer)
    expected = rope_hand_count(32, 32, norm_layer)
    with torch.no_grad():
        analysis = flop_analysis(model, IMG)
        by_operator = dict(analysis.by_operator())
        assert not analysis.unsupported_ops(), "an operator with real cost went uncounted"
    # fvcore's operators: the matmuls, the patch embedding, attention, and layer norms (RMSNorm is hooked)
    operators = {key: expected[key] for key in ("conv", "linear", "scaled_dot_product_attention")}
    assert by_operator == operators | ({"layer_norm": expected["norms"]} if norm_layer != "rmsnorm" else {})
    assert count_flops(model, IMG) == sum(expected.values())
    # a non-square image: the rotation covers every patch of the grid
    assert count_flops(model, (32, 48)) == sum(rope_hand_count(32, 48, norm_layer).values())
    with torch.device("meta"):
        meta = tiny_rope(norm_layer)
    assert count_flops_on_meta(meta, IMG) == sum(expected.values())
    assert forward_flops(meta, torch.zeros(2, 3, 32, 32, device="meta")) == 2 * 2 * sum(expected.values())


def test_the_rotation_is_counted_once_per_block_and_not_for_the_learned_family():
    from dinoreg.tools.flops import HookedWork  # noqa: PLC0415

    with torch.device("meta"):
        deeper = build_backbone("vits16", depth=3, n_storage_tokens=4)
        learned = build_backbone("vit_small", depth=3, patch_size=16, num_register_tokens=4)
    for model, rotated in ((deeper, 3 * 2 * 6 * 196 * 64), (learned, 0)):  # blocks x (q, k) x heads x HW x head_dim
        with HookedWork(model) as hooked, torch.no_grad():
            model.eval().forward_features(torch.zeros(1, 3, 224, 224, device="meta"))
        assert hooked.macs == 2 * rotated  # layernormbf16 and LayerNorm: no RMSNorm term


def test_the_step_counter_on_the_meta_device_counts_a_rope_student_as_fvcore_does():
    """The training-step counter builds the RoPE student on the meta device; its per-image count is twice fvcore's
    trace of the same backbone on the CPU (plus the hooked rotation), at both crop sizes."""
    from dinoreg.config import load_config  # noqa: PLC0415
    from dinoreg.tools.flops import forward_flops, training_step_flops  # noqa: PLC0415
    from dinoreg.train.build import build_ssl_model  # noqa: PLC0415

    small = ["student.embed_dim=32", "student.num_heads=2", "student.depth=2", "train.batch_size_per_gpu=2",
             "crops.local_crops_number=2", "student.norm_layer=rmsnorm"]
    cfg = load_config("tiny_rope_cpu", small)
    model = build_ssl_model(cfg, load_pretrained=False)
    with torch.device("meta"):
        meta = build_ssl_model(cfg, load_pretrained=False)
    per_image = {}
    for size in (48, 24):
        per_image[size] = count_flops(model.student["backbone"], size)
        assert forward_flops(meta.student["backbone"].eval(), torch.zeros(1, 3, size, size, device="meta")) \
            == 2 * per_image[size]
    flops = training_step_flops(cfg)
    head = forward_flops(meta.student["dino_head"], torch.zeros(1, 32, device="meta"))  # iBOT shares it here
    global_images = local_images = 4  # 2 views x batch 2, 2 local crops x batch 2
    backbones = 2 * (global_images * per_image[48] + local_images * per_image[24])
    heads = head * (global_images + local_images + flops["masked_patches_expected"])
    assert flops["student_forward_flops"] == pytest.approx(backbones + heads)


# The official DINOv3 backbones' parameter counts (facebookresearch/dinov3 hub builders with pretrained=False;
# vit7b16 on the meta device): the command and output are in docs/ANALYSIS.md.
OFFICIAL_PARAMETERS = {"vits16": 21_601_152, "vits16plus": 28_697_472, "vitb16": 85_669_632, "vitl16": 303_154_176,
                       "vitl16plus": 403_915_776, "vith16plus": 840_633_600, "vit7b16": 6_716_043_264}


def test_the_presets_have_the_official_parameter_counts_and_storage_tokens():
    from dinoreg.models import ROPE_PRESETS  # noqa: PLC0415
    from dinoreg.tools.flops import build_counted_backbone, count_flops_on_meta  # noqa: PLC0415

    assert set(ROPE_PRESETS) == set(OFFICIAL_PARAMETERS)
    for arch, official in OFFICIAL_PARAMETERS.items():
        model = build_counted_backbone(arch, registers=4)
        assert count_parameters(model) == official, arch
        assert model.num_register_tokens == 4 and model.patch_size == 16
    # vitl16 at 224 px: ViT-L/16's ~61.6 G multiply-adds for 196 patches and the class token, and its 4 storage tokens
    vitl16 = build_counted_backbone("vitl16", registers=4)
    assert 62.5e9 < count_flops_on_meta(vitl16, 224) < 63.5e9


def test_flops_versus_storage_tokens_of_a_rope_preset():
    rows = {row["registers"]: row for row in flops_vs_registers("vitl16", 16, 224, [0, 4])}
    assert rows[4]["params"] - rows[0]["params"] == 4 * 1024  # only the storage tokens differ
    assert 0.01 < (rows[4]["flops"] - rows[0]["flops"]) / rows[0]["flops"] < 0.03
