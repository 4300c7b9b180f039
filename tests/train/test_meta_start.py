"""Meta-device start-up: the model built on the meta device, sharded, then materialised step by step has the
values of a one-process CPU build, bitwise, for any number of ranks, and leaves the random generator where that
build leaves it (so the default run's numbers stand)."""

import copy
from pathlib import Path

import pytest
import torch
from launch_helpers import TINY, torchrun

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.weights import save_backbone
from dinoreg.train.build import build_model_and_optimizer, build_ssl_model, construct_ssl_model, initialisation_steps
from dinoreg.train.parallel import materialise

HERE = Path(__file__).parent


def cpu_build(config, overrides):
    """(state dict, the generator's next draws) of the one-process build training uses."""
    torch.manual_seed(0)
    model, _ = build_model_and_optimizer(load_config(config, overrides), DistributedEnvironment(), torch.device("cpu"))
    return model.state_dict(), torch.rand(4)


def constructed(config, overrides):
    """The same of the constructors' own draws on the CPU: the values of the one-process build before every build
    started on the meta device (issue 26), which the replay keeps."""
    torch.manual_seed(0)
    model = construct_ssl_model(load_config(config, overrides))
    return model.state_dict(), torch.rand(4)


@pytest.mark.parametrize("config, overrides", [
    ("tiny_cpu", ["student.num_register_tokens=4", "student.layerscale=1e-5"]),
    ("tiny_cpu", ["student.num_register_tokens=0", "ibot.separate_head=true", "student.ffn_layer=swiglufused"]),
    ("tiny_cpu", ["ibot.separate_head=false", "dino.head_nlayers=1"]),
    ("vitg14_reg4", ["student.depth=1", "crops.global_crops_size=56", "crops.local_crops_size=28"]),
])
def test_replayed_steps_equal_a_cpu_build(config, overrides):
    reference, after_reference = constructed(config, overrides)
    trained, after_trained = cpu_build(config, overrides)  # training's build: the same values and draws
    assert [name for name, value in trained.items() if not torch.equal(value, reference[name])] == []
    assert torch.equal(after_trained, after_reference)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_ssl_model(load_config(config, overrides))
    template = copy.deepcopy(model)
    model.to_empty(device="cpu")
    materialise(model, initialisation_steps(template))
    assert torch.equal(torch.rand(4), after_reference)  # the same draws, in the same order
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert [name for name in state if not torch.equal(state[name], reference[name])] == []
    # and it is a real start: the teacher is the student, the weights are drawn, the centres are zero
    assert torch.equal(state["teacher.dino_head.last_layer.parametrizations.weight.original1"],
                       state["student.dino_head.last_layer.parametrizations.weight.original1"])
    assert state["student.backbone.blocks.0.attn.qkv.weight"].std() == pytest.approx(0.02, rel=0.2)
    assert not state["dino_loss.center"].any()


def test_a_step_that_leaves_a_tensor_unset_is_an_error():
    with torch.device("meta"):
        model = build_ssl_model(load_config("tiny_cpu", TINY))
    template = copy.deepcopy(model)
    model.to_empty(device="cpu")
    steps = initialisation_steps(template)
    layer = template.student["backbone"].blocks[0].attn.qkv
    half = [(module, (lambda m: torch.nn.init.zeros_(m.weight)) if module is layer else initialise, targets)
            for module, initialise, targets in steps]
    with pytest.raises(RuntimeError, match=r"leaves \['bias'\] of Linear unset"):
        materialise(model, half)
    with pytest.raises(RuntimeError, match=r"no initialisation step sets \['dino_loss.center'\]"):
        materialise(model, [step for step in steps if step[2] != ("dino_loss",)])


def sharded_start(tmp_path, nproc, *overrides):
    out = tmp_path / f"start_{nproc}.pt"
    result = torchrun(nproc, str(HERE / "start_worker.py"), str(out), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("nproc, sharding", [(2, "full_shard"), (3, "full_shard"), (2, "no_shard")])
def test_sharded_start_gathered_equals_one_process(tmp_path, nproc, sharding):
    overrides = [*TINY, "student.num_register_tokens=4", "ibot.separate_head=true", f"train.sharding={sharding}"]
    reference, after_reference = cpu_build("tiny_cpu", overrides)
    started = sharded_start(tmp_path, nproc, *overrides)
    assert started["state"].keys() == reference.keys()
    assert [name for name in reference if not torch.equal(started["state"][name], reference[name])] == []
    assert all(torch.equal(value, reference[name]) for name, value in started["buffers"].items())
    assert torch.equal(started["after"], after_reference)
    total = sum(value.numel() for name, value in reference.items() if not name.endswith("center"))
    if sharding == "full_shard":  # 3 ranks: uneven shards (torch.chunk), still equal to the whole
        assert sum(started["local_numel"]) == total and max(started["local_numel"]) < 1.1 * total / nproc
    else:
        assert started["local_numel"] == [total] * nproc


def test_sharded_start_loads_pretrained_weights(tmp_path):
    torch.manual_seed(7)
    source = build_ssl_model(load_config("tiny_cpu", TINY)).student["backbone"]
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)  # unlike any initialisation
    save_backbone(source, tmp_path / "backbone.safetensors")
    overrides = [*TINY, f"student.pretrained_weights={tmp_path / 'backbone.safetensors'}"]
    reference, _ = cpu_build("tiny_cpu", overrides)
    started = sharded_start(tmp_path, 2, *overrides)
    assert [name for name in reference if not torch.equal(started["state"][name], reference[name])] == []
    for name, value in source.state_dict().items():
        for copy_ in ("student", "teacher"):
            assert torch.equal(started["state"][f"{copy_}.backbone.{name}"], value), (copy_, name)
