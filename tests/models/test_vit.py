import collections
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinoreg.models import ARCH_DIMS, attention, build_backbone, layers
from dinoreg.models.vit import DinoVisionTransformer, vit_giant2, vit_small
from official_reference import official_forward_features, official_key_names


def tiny(**kw):
    args = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_register_tokens=4,
                init_values=1.0, interpolate_antialias=True, interpolate_offset=0.0)
    args.update(kw)
    torch.manual_seed(0)
    model = build_backbone("vit_small", **args)
    with torch.no_grad():  # make LayerScale, biases and norms non-trivial so the comparison means something
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith(".bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch", list(ARCH_DIMS))
def test_factory_dimensions_and_parameter_count(arch):
    # built on the meta device: no memory, so even ViT-g is cheap to check
    embed_dim, depth, heads = ARCH_DIMS[arch]
    with torch.device("meta"):
        model = build_backbone(arch, patch_size=14, img_size=224, num_register_tokens=4, init_values=1e-5)
    assert (model.embed_dim, model.n_blocks, model.num_heads) == (embed_dim, depth, heads)
    D = embed_dim
    ffn = 2 * D * 4 * D + 4 * D + D  # fc1 + fc2 with biases
    block = 4 * D * D + 4 * D + ffn + 4 * D + 2 * D  # qkv+proj, norms, layerscale
    expected = depth * block + 3 * 14 * 14 * D + D + (257 * D) + D + 4 * D + 2 * D + D  # patch, cls, pos, mask, reg, norm
    assert sum(p.numel() for p in model.parameters()) == expected


def test_giant_uses_official_swiglu_width():
    with torch.device("meta"):
        model = vit_giant2(patch_size=14, ffn_layer="swiglufused", init_values=1e-5)
    # official SwiGLUFFNFused: int(6144 * 2 / 3) rounded up to a multiple of 8 = 4096
    assert model.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    assert model.blocks[0].mlp.w3.weight.shape == (1536, 4096)


@pytest.mark.parametrize("size", [(16, 16), (24, 16), (8, 12), (32, 32)])
@pytest.mark.parametrize("registers", [0, 4])
def test_output_shapes(size, registers):
    model = tiny(num_register_tokens=registers)
    x = torch.randn(3, 3, *size)
    out = model.forward_features(x)
    hw = (size[0] // 4) * (size[1] // 4)
    assert out["x_norm_clstoken"].shape == (3, 32)
    assert out["x_norm_regtokens"].shape == (3, registers, 32)
    assert out["x_norm_patchtokens"].shape == (3, hw, 32)
    assert out["x_prenorm"].shape == (3, 1 + registers + hw, 32)
    assert model(x).shape == (3, 32)


@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
@pytest.mark.parametrize("antialias,offset", [(True, 0.0), (False, 0.1)])
@pytest.mark.parametrize("size", [(16, 16), (24, 20), (8, 8)])
def test_matches_official_forward(ffn, antialias, offset, size):
    model = tiny(ffn_layer=ffn, interpolate_antialias=antialias, interpolate_offset=offset)
    x = torch.randn(2, 3, *size)
    masks = torch.rand(2, (size[0] // 4) * (size[1] // 4)) < 0.4
    ours = model.forward_features(x, masks=masks)
    ref = official_forward_features(model.state_dict(), x, patch_size=4, num_heads=2, depth=2, num_register_tokens=4,
                                     antialias=antialias, offset=offset, masks=masks, ffn=ffn)
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-5)


def test_list_input_equals_separate_calls_and_official():
    model = tiny()
    glob, loc = torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)
    masks = torch.rand(4, 16) < 0.5
    outs = model.forward_features([glob, loc], masks=[masks, None])
    for out, x, m in ((outs[0], glob, masks), (outs[1], loc, None)):
        single = model.forward_features(x, masks=m)
        ref = official_forward_features(model.state_dict(), x, patch_size=4, num_heads=2, depth=2,
                                        num_register_tokens=4, antialias=True, offset=0.0, masks=m)
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"):
            torch.testing.assert_close(out[key], single[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    assert outs[1]["masks"] is None and torch.equal(outs[0]["masks"], masks)


def test_mask_token_replaces_patch_embedding_before_pos_embed():
    model = tiny()
    x = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = masks[1, 7] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    first_patch = 1 + 4
    expected = model.mask_token[0] + model.pos_embed[0, 1 + 3]
    torch.testing.assert_close(tokens[0, first_patch + 3], expected)
    unmasked = model.patch_embed(x)[0, 4] + model.pos_embed[0, 1 + 4]
    torch.testing.assert_close(tokens[0, first_patch + 4], unmasked)


def test_registers_are_never_patch_outputs():
    # With no blocks the outputs are the normalised input tokens, so every slot can be traced to its source.
    model = tiny(depth=0)
    with torch.no_grad():
        model.register_tokens.fill_(1000.0)
    x = torch.randn(2, 3, 16, 16)
    out = model.forward_features(x)
    patches = model.norm(model.patch_embed(x) + model.pos_embed[:, 1:])
    torch.testing.assert_close(out["x_norm_patchtokens"], patches)
    torch.testing.assert_close(out["x_norm_regtokens"], model.norm(model.register_tokens).expand(2, -1, -1))
    one_block = tiny(depth=1)
    (patch_out,) = one_block.get_intermediate_layers(x, n=1)
    torch.testing.assert_close(patch_out, one_block.forward_features(x)["x_norm_patchtokens"])


def test_get_intermediate_layers_official_semantics():
    model = tiny(depth=3)
    x = torch.randn(2, 3, 16, 20)
    sd = model.state_dict()
    last_two = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(last_two) == 2
    feats, cls = last_two[1]
    assert feats.shape == (2, 32, 4, 5) and cls.shape == (2, 32)
    ref = official_forward_features(sd, x, patch_size=4, num_heads=2, depth=3, num_register_tokens=4,
                                    antialias=True, offset=0.0)
    torch.testing.assert_close(cls, ref["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), ref["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    # the first block's output equals a depth-1 official forward (registers removed from patches)
    (first,) = model.get_intermediate_layers(x, n=[0], norm=False)
    ref1 = official_forward_features(sd, x, patch_size=4, num_heads=2, depth=1, num_register_tokens=4,
                                     antialias=True, offset=0.0)
    torch.testing.assert_close(first, ref1["x_prenorm"][:, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="blocks exist"):
        model.get_intermediate_layers(x, n=[7])


def test_attention_backends_agree():
    x = torch.randn(2, 3, 16, 24)
    outs = {}
    for backend in ("sdpa", "math"):
        outs[backend] = tiny(attn_backend=backend).forward_features([x, x[:, :, :8, :8]])
    for a, b in zip(outs["sdpa"], outs["math"]):
        torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], atol=1e-5, rtol=1e-5)


def test_xformers_on_cpu_warns_once_and_uses_sdpa(monkeypatch):
    monkeypatch.setattr(attention, "_warned_backend_fallback", False)
    x = torch.randn(2, 3, 16, 16)
    model = tiny(attn_backend="xformers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.forward_features(x)
        model.forward_features(x)
    fallbacks = [w for w in caught if "attention_backend='xformers'" in str(w.message)]
    assert len(fallbacks) == 1 and "SDPA" in str(fallbacks[0].message)
    torch.testing.assert_close(out["x_prenorm"], tiny().forward_features(x)["x_prenorm"])
    strict = tiny(attn_backend="xformers", attn_backend_required=True)
    with pytest.raises(RuntimeError, match="required"):
        strict.forward_features(x)


def test_attention_probabilities_are_a_distribution_over_cls_registers_patches():
    model = tiny()
    attn = model.get_self_attention(torch.randn(2, 3, 16, 16))
    assert attn.shape == (2, 2, 21, 21)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 21))


def test_eval_mode_disables_stochastic_depth_and_training_uses_it():
    model = tiny(drop_path_rate=0.5, depth=4)
    reference = tiny(drop_path_rate=0.0, depth=4)
    x = torch.randn(8, 3, 16, 16)
    torch.testing.assert_close(model(x), reference(x))
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)


def test_per_sample_drop_path_keeps_or_drops_whole_images():
    block = layers.Block(16, 2, drop_path=0.1, init_values=1.0).train()
    block.ls2.gamma.data.zero_()  # keep only the attention residual so it can be checked exactly
    torch.manual_seed(3)
    x = torch.randn(64, 5, 16)
    out = block(x)
    residual = block.ls1(block.attn(block.norm1(x.reshape(-1, 16)), [(64, 5)])).view(64, 5, 16)
    kept = [torch.allclose(out[i], x[i] + residual[i] / 0.9, atol=1e-6) for i in range(64)]
    dropped = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(k != d for k, d in zip(kept, dropped))  # every image is exactly one of the two
    assert 0 < sum(dropped) < 20  # about 10% of 64


def test_batch_subset_stochastic_depth_scales_the_kept_residual():
    block = layers.Block(16, 2, drop_path=0.75, init_values=1.0).train()
    block.ls2.gamma.data.zero_()  # keep only the attention residual so it can be checked exactly
    x = torch.randn(4, 5, 16)
    out = block(x)
    changed = [i for i in range(4) if not torch.equal(out[i], x[i])]
    assert len(changed) == 1  # max(int(4 * 0.25), 1) images get the residual
    i = changed[0]
    expected = x[i] + 4.0 * block.ls1(block.attn(block.norm1(x[i]), [(1, 5)]))
    torch.testing.assert_close(out[i], expected)


def test_state_dict_keys_are_the_official_ones_and_round_trip_strictly():
    model = tiny(depth=3)
    assert set(model.state_dict()) == official_key_names(3, registers=True, layerscale=True)
    swiglu = tiny(depth=2, num_register_tokens=0, init_values=None, ffn_layer="swiglu")
    assert set(swiglu.state_dict()) == official_key_names(2, registers=False, layerscale=False, ffn="swiglu")
    clone = DinoVisionTransformer(**model.arch_kwargs).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(clone(x), model(x))


def test_official_initialisation():
    torch.manual_seed(0)
    model = vit_small(patch_size=14, num_register_tokens=4, init_values=1e-5)
    assert model.cls_token.std() < 1e-5 and model.register_tokens.std() < 1e-5
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002 and model.pos_embed.abs().max() <= 2.0
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.001
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0 and model.mask_token.abs().sum() == 0
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)


def test_invalid_construction_is_a_clear_error():
    with pytest.raises(ValueError, match="num_register_tokens"):
        build_backbone("vit_small", num_register_tokens=-1)
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="ffn_layer"):
        build_backbone("vit_small", depth=1, ffn_layer="geglu")
    with pytest.raises(ValueError, match="attention backend"):
        build_backbone("vit_small", depth=1, attn_backend="flash")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops_and_grads(model, crops):
    """What the backward pass runs (forward ops among them are recomputations) and the gradients."""
    torch.manual_seed(5)  # the same stochastic-depth draws in every run
    outputs = model.forward_features(crops, masks=None)
    loss = sum(o["x_norm_patchtokens"].pow(2).mean() + o["x_norm_clstoken"].sum() for o in outputs)
    counter = _CountOps()
    with counter:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return counter.ops, grads


def test_activation_checkpointing_recomputes_what_it_should_and_keeps_gradients():
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2,
                                  num_register_tokens=4, drop_path_rate=0.3, init_values=1e-5).train()
    crops = [torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)]
    results = {}
    for mode in ("none", "selective", "full"):
        model.set_checkpointing(mode)
        results[mode] = _backward_ops_and_grads(model, crops)
    for mode in ("selective", "full"):
        assert results[mode][1].keys() == results["none"][1].keys()
        for name, grad in results["none"][1].items():  # the recomputation replays the same forward, draws included
            torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
    recomputed = {mode: {op: ops[op] for op in ("native_layer_norm", "gelu", "addmm",
                                                "_scaled_dot_product_flash_attention_for_cpu")}
                  for mode, (ops, _) in results.items()}
    # 3 blocks x 2 norms, 3 GELUs, 3 x 4 linear layers, 3 blocks x 2 crop groups of attention
    assert recomputed["none"] == {"native_layer_norm": 0, "gelu": 0, "addmm": 0,
                                  "_scaled_dot_product_flash_attention_for_cpu": 0}
    assert recomputed["selective"] == {"native_layer_norm": 6, "gelu": 3, "addmm": 0,  # matmuls, attention kept
                                       "_scaled_dot_product_flash_attention_for_cpu": 0}
    assert recomputed["full"] == {"native_layer_norm": 6, "gelu": 3, "addmm": 12,
                                  "_scaled_dot_product_flash_attention_for_cpu": 6}
    with pytest.raises(ValueError, match="unknown activation checkpointing 'some'; choose one of none, selective"):
        model.set_checkpointing("some")
