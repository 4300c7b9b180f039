"""DINOv3's head layout (``dino.head_weight_norm=false``, ``ibot.head_weight_norm=false``): a plain ``last_layer``
Linear, as ``dinov3/layers/dino_head.py``. Its outputs and initialisation, the meta-device start, the last layer's
parameter group (frozen first, with weight decay), and a start from an official DINOv3 ``teacher_checkpoint.pth``
(``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``) with ``train.init_from``, strictly."""

import warnings

import pytest
import torch
from dist_step_worker import global_batch, rank_share
from launch_helpers import TINY
from test_continue import OfficialDINOHead
from test_meta_start import constructed, cpu_build
from torch import nn

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models import DINOHead
from dinoreg.models.head import HeadLayoutError, head_spec_of, head_to_official
from dinoreg.models.weights import CheckpointMismatchError, read_heads
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.loop import train_step

# a tiny RoPE student with patch 16 (DINOv3's) and DINOv3's heads: separate iBOT head, plain last layers
ROPE = [*TINY, "student.patch_size=16", "student.num_register_tokens=4", "ibot.separate_head=true",
        "ibot.head_n_prototypes=48", "dino.head_weight_norm=false", "ibot.head_weight_norm=false",
        "train.batch_size_per_gpu=8", "train.num_workers=0"]


class OfficialDINOv3Head(OfficialDINOHead):
    """dinov3/layers/dino_head.py, restated: DINOv2's MLP and L2 normalisation, then a plain Linear onto the
    prototypes, every Linear initialised by its init_weights (truncated normal 0.02, zero bias)."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        with warnings.catch_warnings():  # the DINOv2 head's weight_norm hook, replaced right away
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(in_dim, out_dim, nlayers, hidden_dim, bottleneck_dim)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def build(*overrides):
    torch.manual_seed(0)
    return build_model_and_optimizer(load_config("tiny_rope_cpu", [*ROPE, *overrides]), DistributedEnvironment(),
                                     torch.device("cpu"))


def test_plain_head_has_dinov3s_layout_outputs_and_initialisation():
    torch.manual_seed(0)
    head = DINOHead(32, 500, nlayers=3, hidden_dim=64, bottleneck_dim=16, weight_norm=False)
    official = OfficialDINOv3Head(32, 500, hidden_dim=64, bottleneck_dim=16)
    assert head.state_dict().keys() == official.state_dict().keys()
    assert type(head.last_layer) is nn.Linear and head.last_layer.bias is None
    assert head.last_layer.weight.std().item() == pytest.approx(0.02, rel=0.1)  # not Linear's Kaiming uniform
    official.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(5, 32)
    torch.testing.assert_close(head(x), official(x), rtol=0, atol=0)
    assert head_to_official(head.state_dict()).keys() == head.state_dict().keys()  # DINOv3's names are ours
    assert head_spec_of(head.state_dict()) == {"n_prototypes": 500, "bottleneck_dim": 16, "nlayers": 3,
                                               "hidden_dim": 64, "weight_norm": False, "in_dim": 32}
    assert head_spec_of(DINOHead(32, 7, hidden_dim=64, bottleneck_dim=16).state_dict())["weight_norm"] is True
    with pytest.raises(HeadLayoutError, match=r"needs mlp.*weight and a last layer.*it holds mlp.bias, mlp.weight$"):
        head_spec_of({k: v for k, v in DINOHead(4, 3, nlayers=1, bottleneck_dim=2).state_dict().items()
                      if k.startswith("mlp")})


def test_meta_device_start_with_plain_heads_equals_the_cpu_build():
    reference, after_reference = constructed("tiny_rope_cpu", ROPE)
    trained, after = cpu_build("tiny_rope_cpu", ROPE)
    assert [name for name, value in trained.items() if not torch.equal(value, reference[name])] == []
    assert torch.equal(after, after_reference)
    assert torch.equal(trained["teacher.ibot_head.last_layer.weight"], trained["student.ibot_head.last_layer.weight"])
    assert trained["student.dino_head.last_layer.weight"].shape == (64, 32)


def test_the_plain_last_layer_is_frozen_first_and_decays():
    model, optimizer = build()
    flagged = {name for group in optimizer.param_groups if group["is_last_layer"] for name in group["names"]}
    assert flagged == {"dino_head.last_layer.weight", "ibot_head.last_layer.weight"}
    assert {group["wd_multiplier"] for group in optimizer.param_groups if group["is_last_layer"]} == {1.0}
    cfg = load_config("tiny_rope_cpu", ROPE)
    values = {"lr": 1e-3, "last_layer_lr": 0.0, "weight_decay": 0.04, "momentum": 0.9, "teacher_temp": 0.04}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer, rank_share(global_batch(0, cfg), 0, 1), values, clip_grad=3.0)
    after = model.state_dict()
    for head in ("dino_head", "ibot_head"):  # optim.freeze_last_layer_epochs: lr 0 (and so no weight decay)
        assert torch.equal(after[f"student.{head}.last_layer.weight"], before[f"student.{head}.last_layer.weight"])
        assert not torch.equal(after[f"student.{head}.mlp.0.weight"], before[f"student.{head}.mlp.0.weight"])
    train_step(model, optimizer, rank_share(global_batch(1, cfg), 0, 1), {**values, "last_layer_lr": 1e-3},
               clip_grad=3.0)
    assert not torch.equal(model.student["dino_head"].last_layer.weight, before["student.dino_head.last_layer.weight"])


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """An official DINOv3 teacher checkpoint of a tiny model: its backbone in DINOv3's names (those of
    RopeVisionTransformer, moved off any initialisation) and the heads of dinov3/layers/dino_head.py."""
    model, _ = build()
    torch.manual_seed(3)
    backbone = {f"backbone.{k}": v + 0.01 * torch.randn_like(v) if v.is_floating_point() and "periods" not in k else v
                for k, v in model.student["backbone"].state_dict().items()}
    heads = {"dino_head": OfficialDINOv3Head(32, 64, hidden_dim=64, bottleneck_dim=32),
             "ibot_head": OfficialDINOv3Head(32, 48, hidden_dim=64, bottleneck_dim=32)}
    teacher = {**backbone, **{f"{name}.{k}": v for name, head in heads.items() for k, v in head.state_dict().items()}}
    path = tmp_path_factory.mktemp("dinov3") / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    return path, teacher, heads


def test_init_from_an_official_dinov3_teacher_checkpoint_starts_backbone_and_heads(official_checkpoint):
    path, teacher, heads = official_checkpoint
    assert {name: head_spec_of(state)["weight_norm"] for name, state in read_heads(path).items()} == \
        {"dino_head": False, "ibot_head": False}
    model, _ = build(f"train.init_from={path}")
    x = torch.randn(6, 32)
    with torch.no_grad():
        for part in (model.student, model.teacher):
            state = part.state_dict()
            assert [k for k, v in teacher.items() if not torch.equal(state[k], v)] == []
            for name, head in heads.items():
                torch.testing.assert_close(part[name](x), head(x), rtol=0, atol=0)


@pytest.mark.parametrize("change, named", [
    ("missing", "missing (1): ibot_head.mlp.2.bias"),
    ("extra", "unexpected (1): dino_head.last_layer.bias"),
    ("dinov2 layout", "the file's dino_head and ibot_head last layer is in the other layout: set "
                      "dino.head_weight_norm=false ibot.head_weight_norm=false"),
])
def test_a_misfitting_dinov3_head_is_refused_in_one_line(official_checkpoint, tmp_path, change, named):
    _, teacher, _ = official_checkpoint
    overrides = []
    if change == "missing":
        teacher = {k: v for k, v in teacher.items() if k != "ibot_head.mlp.2.bias"}
    elif change == "extra":
        teacher = {**teacher, "dino_head.last_layer.bias": torch.zeros(64)}
    else:
        overrides = ["dino.head_weight_norm=true", "ibot.head_weight_norm=true"]
    torch.save({"teacher": teacher}, tmp_path / "changed.pth")
    with pytest.raises(CheckpointMismatchError) as error:
        build(f"train.init_from={tmp_path / 'changed.pth'}", *overrides)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith("train.init_from does not fit the configured heads")
    assert named in message
