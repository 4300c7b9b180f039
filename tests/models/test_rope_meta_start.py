"""A RoPE backbone built on the meta device and given its values by replaying its ``initialisation_steps`` (as the
meta-device start does, module by module) equals a CPU build bitwise, and leaves the generator where the CPU build
leaves it."""

import copy

import pytest
import torch

from dinoreg.models.rope_vit import RopeVisionTransformer, build_rope_backbone
from dinoreg.train.parallel import materialise

TINY = dict(patch_size=4, embed_dim=32, num_heads=2, depth=2)


@pytest.mark.parametrize("build", [
    lambda: build_rope_backbone("vits16", **TINY),  # the released settings: mask_k_bias, 4 storage tokens, LayerScale
    lambda: RopeVisionTransformer(**TINY, n_storage_tokens=0, ffn_layer="swiglu64", norm_layer="rmsnorm",
                                  pos_embed_rope_base=None, pos_embed_rope_min_period=0.5,
                                  pos_embed_rope_max_period=20.0, untie_cls_and_patch_norms=True,
                                  untie_global_and_local_cls_norm=True, qkv_bias=False, layerscale_init=None),
], ids=["vits16-released", "swiglu64-rmsnorm-periods-untied"])
def test_replayed_steps_equal_a_cpu_build(build):
    torch.manual_seed(0)
    reference = build().state_dict()
    after_reference = torch.rand(4)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build()
    template = copy.deepcopy(model)
    model.to_empty(device="cpu")
    names = {id(module): name for name, module in template.named_modules()}
    materialise(model, [(module, initialise, (names[id(module)],))
                        for module, initialise in template.initialisation_steps()])
    assert torch.equal(torch.rand(4), after_reference)
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert [name for name in state if not torch.equal(state[name], reference[name])] == []
    assert state["cls_token"].any() and not state["mask_token"].any()  # drawn, and the mask token zero
