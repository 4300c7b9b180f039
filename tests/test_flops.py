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
