"""RopeVisionTransformer (the DINOv3 family) computes what the plain re-statement in rope_reference.py computes from
the same state dict, for every option of the family; its random draws in training follow the official order."""

import math

import pytest
import torch

from dinoreg.models.rope_vit import RopeVisionTransformer
from dinoreg.models.vit import DinoVisionTransformer
from rope_reference import RopeArch, outputs_of, patch_coordinates, reference_blocks, reference_forward_features

# name -> (our keyword arguments, the reference's description of the same model)
CONFIGS = {
    "base-separate-storage4-mlp-layernorm-maskk": (
        dict(n_storage_tokens=4, mask_k_bias=True, norm_layer="layernorm", ffn_layer="mlp"),
        RopeArch(patch_size=4, num_heads=2, depth=2, n_storage_tokens=4, norm="layernorm", ffn="mlp")),
    "periods-max-storage0-swiglu-bf16norm-untied": (
        dict(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=40.0,
             pos_embed_rope_normalize_coords="max", n_storage_tokens=0, norm_layer="layernormbf16", ffn_layer="swiglu",
             ffn_ratio=3.0, untie_cls_and_patch_norms=True),
        RopeArch(patch_size=4, num_heads=2, depth=2, norm="layernormbf16", ffn="swiglu", normalize_coords="max")),
    "min-storage4-swiglu64-rmsnorm-local-untied-nobias": (
        dict(pos_embed_rope_normalize_coords="min", pos_embed_rope_base=10.0, n_storage_tokens=4, norm_layer="rmsnorm",
             ffn_layer="swiglu64", untie_global_and_local_cls_norm=True, qkv_bias=False, mask_k_bias=True),
        RopeArch(patch_size=4, num_heads=2, depth=2, n_storage_tokens=4, norm="rmsnorm", ffn="swiglu",
                 normalize_coords="min")),
}
NON_SQUARE = (16, 28)  # 4 x 7 patches of 4 pixels


def build(seed=0, **kwargs):
    """A tiny RoPE ViT whose LayerScales, biases and norms are far from their initial values (so that each term
    of the forward pass shows in the outputs), in eval mode."""
    args = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, layerscale_init=1e-5, pos_embed_rope_dtype="fp32")
    args.update(kwargs)
    torch.manual_seed(seed)
    model = RopeVisionTransformer(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", ".bias")) or "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same(ours, reference, tolerance=2e-6):
    assert ours.shape == reference.shape
    assert reference.numel() == 0 or relative(ours, reference) <= tolerance


def prefix_norm_of(kwargs):
    return "cls_norm" if kwargs.get("untie_cls_and_patch_norms") else "norm"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_features_equals_the_reference_on_a_non_square_input(name):
    kwargs, arch = CONFIGS[name]
    model = build(**kwargs)
    sd = model.state_dict()
    x = torch.randn(2, 3, *NON_SQUARE)
    masks = torch.rand(2, 28) < 0.3
    for m in (None, masks):
        with torch.no_grad():
            ours = model.forward_features(x, masks=m)
        expected = reference_forward_features(sd, x, arch, prefix_norm=prefix_norm_of(kwargs), masks=m)
        assert set(ours) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_regtokens", "x_norm_patchtokens",
                             "x_prenorm", "masks"}
        for key, value in expected.items():
            assert_same(ours[key], value)
        assert torch.equal(ours["x_storage_tokens"], ours["x_norm_regtokens"])
        assert ours["x_storage_tokens"].shape == (2, arch.n_storage_tokens, 32)
        assert ours["x_norm_patchtokens"].shape == (2, 4 * 7, 32)
        assert ours["masks"] is m
        assert torch.equal(model(x, masks=m), ours["x_norm_clstoken"])


@pytest.mark.parametrize("normalize", ["separate", "max", "min"])
def test_coordinates_and_periods(normalize):
    model = build(pos_embed_rope_normalize_coords=normalize)
    assert torch.allclose(model.rope_embed.coordinates(4, 7),
                          patch_coordinates(4, 7, RopeArch(4, 2, 2, normalize_coords=normalize)), rtol=0, atol=1e-7)
    # head dim 16: 4 periods, base ** (4 i / 16); min/max: geometric from min to max
    base = torch.tensor([100.0 ** (4 * i / 16) for i in range(4)], dtype=torch.float64)
    assert torch.allclose(model.rope_embed.periods.double(), base, rtol=1e-6, atol=0)
    spanned = build(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=40.0)
    geometric = torch.tensor([0.5 * 80.0 ** (i / 3) for i in range(4)], dtype=torch.float64)
    assert torch.allclose(spanned.rope_embed.periods.double(), geometric, rtol=1e-6, atol=0)
    assert spanned.arch_kwargs["pos_embed_rope_base"] is None


def test_the_key_bias_has_no_effect():
    model = build(mask_k_bias=True, n_storage_tokens=4)
    qkv = model.blocks[0].attn.qkv
    assert torch.equal(qkv.bias_mask, torch.tensor([1.0] * 32 + [0.0] * 32 + [1.0] * 32))
    assert "blocks.0.attn.qkv.bias_mask" in model.state_dict()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model.forward_features(x)["x_prenorm"]
        qkv.bias[32:64] += 10.0  # the keys' bias
        assert torch.equal(model.forward_features(x)["x_prenorm"], before)
        qkv.bias[:32] += 1.0  # the queries' bias does count
        assert not torch.allclose(model.forward_features(x)["x_prenorm"], before)
    unmasked = build(mask_k_bias=False)
    assert "blocks.0.attn.qkv.bias_mask" not in unmasked.state_dict()


@pytest.mark.parametrize("embed_dim, ratio, layer, hidden", [
    (32, 5.0, "swiglu", 112), (32, 5.0, "swiglu32", 128), (32, 4.5, "swiglu32", 96), (32, 4.5, "swiglu64", 128),
    (32, 4.5, "swiglu128", 128), (384, 6.0, "swiglu", 1536), (4096, 3.0, "swiglu64", 8192), (32, 4.0, "mlp", 128),
])
def test_ffn_widths(embed_dim, ratio, layer, hidden):
    with torch.device("meta"):
        model = RopeVisionTransformer(embed_dim=embed_dim, num_heads=embed_dim // 16, depth=1, ffn_ratio=ratio,
                                      ffn_layer=layer)
    names = {name: tuple(p.shape) for name, p in model.blocks[0].mlp.named_parameters() if name.endswith("weight")}
    if layer == "mlp":
        assert names == {"fc1.weight": (hidden, embed_dim), "fc2.weight": (embed_dim, hidden)}
    else:  # 2/3 of the MLP width, rounded up to the alignment (the widths above computed by hand)
        assert names == {"w1.weight": (hidden, embed_dim), "w2.weight": (hidden, embed_dim),
                         "w3.weight": (embed_dim, hidden)}


def test_local_cls_norm_is_used_for_the_second_group_in_training_only():
    kwargs, arch = CONFIGS["min-storage4-swiglu64-rmsnorm-local-untied-nobias"]
    model = build(**kwargs)
    sd = model.state_dict()
    xs = [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 12)]
    prenorm = [blocks[-1] for blocks in reference_blocks(sd, xs, arch)]
    with torch.no_grad():
        evaluated = model.forward_features(xs)
        model.train()  # no stochastic depth nor coordinate augmentation: the same blocks, other norms
        trained = model.forward_features(xs)
        single = model.forward_features(xs[1])
        # the local crops passed alone (train.pack_crops=false) say where they stand among the step's crop groups
        alone = model.forward_features([xs[1]], first_group=1)[0]
    for outputs, norms in ((evaluated, ("norm", "norm")), (trained, ("norm", "local_cls_norm"))):
        for out, t, prefix_norm in zip(outputs, prenorm, norms):
            for key, value in outputs_of(sd, t, arch, prefix_norm).items():
                assert_same(out[key], value)
    assert not torch.allclose(trained[1]["x_norm_clstoken"], evaluated[1]["x_norm_clstoken"])
    assert torch.equal(trained[1]["x_norm_patchtokens"], evaluated[1]["x_norm_patchtokens"])
    assert_same(single["x_norm_clstoken"], evaluated[1]["x_norm_clstoken"])  # a lone batch is never "local"
    assert_same(alone["x_norm_clstoken"], trained[1]["x_norm_clstoken"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_get_intermediate_layers_equal_the_reference(name):
    kwargs, arch = CONFIGS[name]
    model = build(depth=3, **kwargs)
    arch = RopeArch(**{**arch.__dict__, "depth": 3})
    sd = model.state_dict()
    x = torch.randn(2, 3, *NON_SQUARE)
    blocks = reference_blocks(sd, [x], arch)[0]
    prefix = 1 + arch.n_storage_tokens
    normed = [outputs_of(sd, t, arch, prefix_norm_of(kwargs)) for t in blocks]
    for n, indices in ((2, [1, 2]), ([0, 2], [0, 2]), (1, [2])):
        for norm in (True, False):
            expected = [normed[i]["x_norm_patchtokens"] if norm else blocks[i][:, prefix:] for i in indices]
            expected_full = [torch.cat((normed[i]["x_norm_clstoken"][:, None], normed[i]["x_storage_tokens"]), 1)
                             if norm else blocks[i][:, :prefix] for i in indices]
            with torch.no_grad():
                plain = model.get_intermediate_layers(x, n=n, norm=norm)
                full = model.get_intermediate_layers(x, n=n, norm=norm, reshape=True, return_class_token=True,
                                                     return_extra_tokens=True)
                extra_only = model.get_intermediate_layers(x, n=n, norm=norm, return_extra_tokens=True)
            assert len(plain) == len(full) == len(extra_only) == len(indices)
            for out, (patches, cls, extra), (patches_only, extra2), want, want_prefix in zip(
                    plain, full, extra_only, expected, expected_full):
                assert_same(out, want)
                assert patches.shape == (2, 32, 4, 7)
                assert torch.equal(patches, out.reshape(2, 4, 7, 32).permute(0, 3, 1, 2))
                assert_same(cls, want_prefix[:, 0])
                assert extra.shape == (2, arch.n_storage_tokens, 32)
                if arch.n_storage_tokens:
                    assert_same(extra, want_prefix[:, 1:])
                assert torch.equal(extra2, extra) and torch.equal(patches_only, out)
    with pytest.raises(ValueError, match="only 1 of 2 requested blocks"):
        model.get_intermediate_layers(x, n=[2, 5])


def test_crop_groups_packed_equal_separate_calls():
    model = build(n_storage_tokens=4, mask_k_bias=True, untie_cls_and_patch_norms=True)
    xs = [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 12)]
    masks = [torch.rand(2, 16) < 0.5, None]
    with torch.no_grad():
        packed = model.forward_features(xs, masks=masks)
        alone = [model.forward_features(x, masks=m) for x, m in zip(xs, masks)]
    for together, separate in zip(packed, alone):
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            assert_same(together[key], separate[key], 1e-6)


AUGMENTED = dict(pos_embed_rope_shift_coords=0.3, pos_embed_rope_jitter_coords=1.5, pos_embed_rope_rescale_coords=2.0)


def test_coordinate_augmentations_are_off_at_evaluation():
    kwargs, arch = CONFIGS["base-separate-storage4-mlp-layernorm-maskk"]
    model = build(drop_path_rate=0.3, **kwargs, **AUGMENTED)
    x = torch.randn(2, 3, *NON_SQUARE)
    torch.manual_seed(5)
    with torch.no_grad():
        ours = model.forward_features(x)
        layers = model.get_intermediate_layers(x, n=2, norm=False)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)  # nothing was drawn
    blocks = reference_blocks(model.state_dict(), [x], arch)[0]
    assert_same(ours["x_prenorm"], blocks[-1])
    assert_same(layers[0], blocks[0][:, 5:])


@pytest.mark.parametrize("rate", [0.05, 0.4])
def test_training_draws_follow_the_official_order(rate):
    """In training each block draws, for each crop group in turn, its coordinate augmentations, then the batch
    subsets of the attention residual (each group), then those of the FFN residual: the reference, drawing in that
    order from the same seed, gives the same outputs and leaves the generator in the same state. Stochastic depth
    has one rate for every block and always uses batch subsets (DINOv3's), even at rates <= 0.1."""
    kwargs, arch = CONFIGS["base-separate-storage4-mlp-layernorm-maskk"]
    model = build(drop_path_rate=rate, **kwargs, **AUGMENTED).train()
    arch = RopeArch(**{**arch.__dict__, "shift": 0.3, "jitter": 1.5, "rescale": 2.0, "drop_path": rate})
    assert [block.drop_path_rate for block in model.blocks] == [rate, rate]
    sd = model.state_dict()
    xs = [torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 12)]
    cases = ((lambda: [o["x_prenorm"] for o in model.forward_features(xs)], xs),
             (lambda: [model.forward_features(xs[1])["x_prenorm"]], [xs[1]]),
             (lambda: list(model.get_intermediate_layers(xs[0], n=[0, 1], norm=False)), [xs[0]]))
    for case, (ours_of, groups) in enumerate(cases):
        torch.manual_seed(7)
        with torch.no_grad():
            ours = ours_of()
        ours_next = torch.rand(3)
        torch.manual_seed(7)
        expected = reference_blocks(sd, groups, arch, training=True)
        assert torch.equal(torch.rand(3), ours_next), case
        if len(ours) == len(groups):
            expected_outputs = [blocks[-1] for blocks in expected]
        else:  # the intermediate layers of one group
            expected_outputs = [block[:, 5:] for block in expected[0]]
        for out, want in zip(ours, expected_outputs):
            assert_same(out, want)
    # and the draws matter: the training outputs are not the evaluation ones
    with torch.no_grad():
        assert not torch.allclose(ours[0], model.eval().get_intermediate_layers(xs[0], n=[0], norm=False)[0])


def test_a_block_called_alone_uses_the_batch_subset_as_the_model_does():
    """DINOv3's blocks use the batch subset in training whatever the rate, also when code runs them itself (the
    DINOv2 family keeps per-sample drop path at rates <= 0.1)."""
    model = build(drop_path_rate=0.05, n_storage_tokens=4).train()
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model.forward_features(x)["x_prenorm"]
        torch.manual_seed(3)
        tokens = model.prepare_tokens_with_masks(x)
        for block, rope in zip(model.blocks, model.positions(x)):
            tokens = block(tokens, rope)
    assert torch.equal(tokens, expected)
    assert all(block.uses_batch_subset(False) for block in model.blocks)
    learned = DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.05, drop_path_uniform=True)
    assert not learned.blocks[0].uses_batch_subset(False) and learned.blocks[0].uses_batch_subset(True)


def test_dinov3_initialisation():
    torch.manual_seed(0)
    model = RopeVisionTransformer(patch_size=16, embed_dim=384, depth=2, num_heads=6, n_storage_tokens=4,
                                  mask_k_bias=True, layerscale_init=1e-5, norm_layer="layernormbf16")
    for token in (model.cls_token, model.storage_tokens):
        assert token.std().item() == pytest.approx(0.02, rel=0.15)
        assert token.abs().max().item() > 0.04  # normal, not truncated at 2 std
    assert not model.mask_token.any()
    bound = math.sqrt(1 / (3 * 16 * 16))
    for p in (model.patch_embed.proj.weight, model.patch_embed.proj.bias):
        assert p.abs().max().item() <= bound and p.abs().max().item() > 0.9 * bound
    weight = model.patch_embed.proj.weight
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform in [-bound, bound]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4
    for linear in linears:
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert not linear.bias.any()
    assert torch.equal(model.blocks[1].attn.qkv.bias_mask, torch.tensor([1.0] * 384 + [0.0] * 384 + [1.0] * 384))
    for block in model.blocks:
        assert torch.equal(block.ls1.gamma, torch.full((384,), 1e-5))
        assert block.norm1.eps == 1e-5
    assert torch.equal(model.norm.weight, torch.ones(384)) and not model.norm.bias.any()
