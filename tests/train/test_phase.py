"""A training phase that continues a run at a larger crop size (DINOv2's high-resolution adaptation): everything is
carried over strictly, the position embeddings resampled once with the antialiased interpolation, the AdamW moments
carried or fresh, an exact resume inside the phase, an export at the new native size."""

import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError
from launch_helpers import TINY
from test_checkpoint import losses_by_iteration
from test_continue import dinoreg

from dinoreg import load_backbone
from dinoreg.config import ConfigError, load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.pos_embed import resample_pos_embed
from dinoreg.models.strict import CheckpointMismatchError
from dinoreg.run_dir import CHECKPOINT_DIR
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint_reader import CheckpointReader
from dinoreg.train.resolve import resolve_run_config

RUN = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=6",
       "evaluation.knn_enabled=false", "monitor.period=0"]
PHASE = ["crops.global_crops_size=48", "crops.local_crops_size=24", "optim.warmup_epochs=0", "optim.min_lr=0.0001",
         "optim.base_lr=0.0001", "optim.scaling_rule=none", "teacher.warmup_teacher_temp_epochs=0",
         "checkpoint.period=1", "checkpoint.keep_last=10"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 32 px run (its centres and moments are no longer zero)."""
    root = tmp_path_factory.mktemp("phase")
    dinoreg("train", "--output-dir", root / "low", *RUN)
    return root / "low"


def build(*overrides):
    cfg = load_config("tiny_cpu", [*RUN, *overrides])
    torch.manual_seed(0)
    return build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))


def test_a_phase_starts_from_the_whole_state_with_resampled_position_embeddings(source):
    saved = CheckpointReader(source / CHECKPOINT_DIR / "6").tensors("model.")
    model, optimizer = build(*PHASE, f"phase.start_from={source}", "phase.optimizer=carry")
    state = model.state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        if key.endswith("backbone.pos_embed"):  # 1 + 4 x 4 -> 1 + 6 x 6, antialiased bicubic, no offset
            assert state[key].shape == (1, 1 + 36, 32)
            assert torch.equal(state[key], resample_pos_embed(value, (6, 6), antialias=True, offset=0.0))
        else:
            assert torch.equal(state[key], value), key
    assert saved["dino_loss.center"].abs().sum() > 0  # the centres were carried, not reset
    # carried moments, except the position embeddings' (their grid changed): those start fresh
    moments = CheckpointReader(source / CHECKPOINT_DIR / "6").tensors("optimizer.state.")
    names = {parameter: name for name, parameter in model.named_parameters()}
    by_name = {names[parameter]: values for parameter, values in optimizer.state.items()}
    assert torch.equal(by_name["student.backbone.blocks.0.attn.qkv.weight"]["exp_avg"],
                       moments["student.backbone.blocks.0.attn.qkv.weight.exp_avg"])
    assert "student.backbone.pos_embed" not in by_name
    fresh_model, fresh_optimizer = build(*PHASE, f"phase.start_from={source}")  # phase.optimizer=fresh
    assert not fresh_optimizer.state
    assert torch.equal(fresh_model.state_dict()["student.dino_head.mlp.0.weight"], saved["student.dino_head.mlp.0.weight"])


def test_a_phase_resumes_bitwise_and_exports_at_its_new_size(source, tmp_path):
    phase = tmp_path / "high"
    dinoreg("train", "--output-dir", phase, *RUN, *PHASE, f"phase.start_from={source}", "phase.optimizer=carry")
    resumed = tmp_path / "resumed"
    shutil.copytree(phase, resumed)
    for it in (4, 5, 6):
        shutil.rmtree(resumed / CHECKPOINT_DIR / str(it))
    (resumed / CHECKPOINT_DIR / "latest").write_text("3\n")
    # the source may even be gone: a resume reads the phase's own checkpoint
    moved = tmp_path / "moved"
    shutil.move(source, moved)
    try:
        dinoreg("train", "--output-dir", resumed, *RUN, *PHASE, f"phase.start_from={source}", "phase.optimizer=carry")
    finally:
        shutil.move(moved, source)
    assert losses_by_iteration(resumed) == losses_by_iteration(phase)
    export = tmp_path / "high.safetensors"
    dinoreg("export", phase, "--format", "safetensors", "--output", export)
    backbone = load_backbone(export)
    assert backbone.arch_kwargs["img_size"] == 48 and backbone.pos_embed.shape == (1, 37, 32)


def test_a_phase_that_changes_the_model_is_refused_with_what_does_not_fit(source):
    with pytest.raises(CheckpointMismatchError, match=r"(?s)phase.start_from .* does not fit the configured model"
                                                      r".*dino_head.*keep student.\*, dino.\*"):
        build(*PHASE, f"phase.start_from={source}", "dino.head_n_prototypes=32")
    with pytest.raises(ConfigError, match="give one start, not phase.start_from and train.init_from"):
        load_config("tiny_cpu", [f"phase.start_from={source}", f"train.init_from={source}"])
    with pytest.raises(ValueError, match="phase.start_from: .* holds no intact checkpoint"):
        build(*PHASE, f"phase.start_from={source.parent}")


@pytest.mark.parametrize("size", ["l", "g"])
def test_the_highres_recipes_continue_their_pretraining_recipe_at_518_px(size):
    with pytest.raises(ConfigError, match=r"phase.start_from: the recipe requires a value"):
        load_config(f"vit{size}14_reg4_highres")
    phase = load_config(f"vit{size}14_reg4_highres", ["phase.start_from=runs/pretrained"])
    base = load_config(f"vit{size}14_reg4")
    for section in ("student", "dino", "ibot"):  # the model is the pretraining's: its checkpoint fits strictly
        assert phase[section] == base[section], section
    assert phase.crops.global_crops_size == 518 and phase.optim.epochs * phase.train.epoch_length == 10000
    assert phase.optim.lr == phase.optim.min_lr == 1e-5 and phase.optim.warmup_epochs == 0


def test_the_run_config_is_resolved_once_and_read_only(source):
    """resolve_run_config: the learning rate scaled for the world size, phase.start_from resolved to its checkpoint on
    a fresh start only, the loaded config untouched, the result frozen (a builder writing to it fails at once)."""
    cfg = load_config("tiny_cpu", [*RUN, f"phase.start_from={source}", "optim.base_lr=0.004",
                                   "optim.scaling_rule=sqrt_wrt_1024"])
    loaded = OmegaConf.to_container(cfg)
    resolved, checkpoint, phase_source = resolve_run_config(cfg, world_size=4)
    assert checkpoint is None and OmegaConf.to_container(cfg) == loaded
    assert phase_source.checkpoint == source / CHECKPOINT_DIR / "6"  # opened once, handed to the build
    assert resolved.optim.lr == pytest.approx(0.004 * math.sqrt(8 * 4 / 1024))
    assert resolved.phase.start_from == str(source / CHECKPOINT_DIR / "6")
    with pytest.raises(ReadonlyConfigError):
        resolved.optim.lr = 1.0
    seen = []
    resumed, checkpoint, phase_source = resolve_run_config(cfg, world_size=2, find_checkpoint=lambda scaled: seen.append(
        scaled.optim.lr) or source / CHECKPOINT_DIR / "3")
    assert seen == [pytest.approx(0.004 * math.sqrt(8 * 2 / 1024))]  # the resume compares the scaled config
    assert checkpoint == source / CHECKPOINT_DIR / "3" and resumed.phase.start_from == str(source)
    assert phase_source is None
