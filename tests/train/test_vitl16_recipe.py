"""The vitl16_im1k recipe (DINOv3's public ImageNet-1k ViT-L/16) across processes: at full width with its real heads
(65,536 prototypes each, a separate iBOT head, DINOv3's plain last layers, Sinkhorn-Knopp), reduced to one block and
to small crops (64 and 32 px, multiples of patch 16) so that the suite stays fast, it trains 2 iterations under 2 gloo
ranks, checkpoints, and a resume from the first checkpoint gives the uninterrupted run's losses and exported teacher,
bitwise. Marked ``scale`` like tests/train/test_scale.py."""

import math

import pytest
from launch_helpers import torchrun
from test_scale import _losses, assert_two_rank_resume_repeats

from dinoreg.run_dir import CHECKPOINT_DIR
from dinoreg.train.checkpoint_reader import CheckpointReader
from dinoreg.models.head import head_spec_of

pytestmark = pytest.mark.scale


def test_vitl16_recipe_trains_checkpoints_and_resumes_bitwise_on_two_ranks(tmp_path):
    command = lambda run: ["-m", "dinoreg", "train", "--config", "vitl16_im1k", "--output-dir", str(run),  # noqa: E731
                           "student.depth=1", "crops.global_crops_size=64", "crops.local_crops_size=32",
                           "train.batch_size_per_gpu=2", "train.num_workers=0", "optim.epochs=1",
                           "train.epoch_length=2", "optim.warmup_epochs=0", "evaluation.knn_enabled=false",
                           "monitor.period=0", "checkpoint.period=1", "checkpoint.keep_last=2", "train.log_every=1"]
    straight = tmp_path / "straight"
    result = torchrun(2, *command(straight), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = _losses(straight)
    assert sorted(reference) == [0, 1]
    # the DINO terms start near log K of 65,536 prototypes (2 + 2 x 8 cross-view pairs, averaged)
    first = reference[0]["dino_local_crops_loss"] + reference[0]["dino_global_crops_loss"]
    assert 0.5 * math.log(65536) < first < 1.5 * math.log(65536)
    heads = CheckpointReader(straight / CHECKPOINT_DIR / "2").weights().heads
    assert {name: head_spec_of(head) for name, head in heads.items()} == {
        name: {"n_prototypes": 65536, "bottleneck_dim": 256, "nlayers": 3, "hidden_dim": 2048, "weight_norm": False,
               "in_dim": 1024} for name in ("dino_head", "ibot_head")}

    # resume from the checkpoint after iteration 1 (as after a preemption there): the last step again
    assert_two_rank_resume_repeats(straight, tmp_path / "resumed", 1, command)
