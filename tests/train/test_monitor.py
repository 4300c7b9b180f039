"""The live artifact monitor: planted high-norm tokens are counted per block; the loop logs it on schedule."""

import json

import pytest
import torch

from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.train.monitor import artifact_metrics
from launch_helpers import TINY

PLANTED = (0, 11)  # patch indices on the 4x4 grid


def planted_backbone(registers):
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=3, num_register_tokens=registers,
                           init_values=1.0).eval()
    with torch.no_grad():
        for patch in PLANTED:  # a huge vector in these positions' embeddings rides the residual stream
            model.pos_embed[0, 1 + patch] += 300.0 * torch.nn.functional.normalize(torch.randn(192), dim=0)
    return model


@pytest.mark.parametrize("registers", [0, 4])
def test_planted_tokens_are_counted_in_every_block(registers):
    model = planted_backbone(registers)
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        outputs, attention = model.block_outputs(images, attention_of=(2,))
    metrics = artifact_metrics(outputs, attention[2], num_register_tokens=registers, relative_threshold=4.0,
                               absolute_threshold=150.0)
    for block in range(3):
        assert metrics[f"monitor/high_norm_rel/b{block:02d}"] == pytest.approx(2 / 16)
        assert metrics[f"monitor/high_norm_abs/b{block:02d}"] == pytest.approx(2 / 16)
        assert metrics[f"monitor/norm_max/b{block:02d}"] > 150 > metrics[f"monitor/norm_p50/b{block:02d}"]
    # the last block's cls -> register attention, recomputed by hand from its qkv weights
    block = model.blocks[2]
    with torch.no_grad():
        tokens = outputs[1]
        q, k, _ = block.attn.qkv(block.norm1(tokens)).view(5, -1, 3, 3, 64).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) / 8.0).softmax(-1)  # head_dim 64
    expected = probs[:, :, 0, 1:1 + registers].sum(-1).mean().item()
    assert metrics["monitor/cls_to_registers"] == pytest.approx(expected, abs=1e-6)
    assert (metrics["monitor/cls_to_registers"] > 0) == (registers > 0)


def test_unedited_model_has_no_high_norm_tokens():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, num_register_tokens=4).eval()
    with torch.no_grad():
        outputs, attention = model.block_outputs(torch.rand(4, 3, 32, 32), attention_of=(1,))
    metrics = artifact_metrics(outputs, attention[1], num_register_tokens=4, relative_threshold=4.0,
                               absolute_threshold=150.0)
    assert all(metrics[f"monitor/high_norm_{kind}/b{b:02d}"] == 0.0 for kind in ("rel", "abs") for b in (0, 1))


def test_the_loop_logs_the_monitor_on_schedule(tmp_path):
    run = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=10",
           "evaluation.knn_enabled=false"]
    assert main(["train", "--output-dir", str(tmp_path / "on"), *run, "monitor.period=4", "monitor.images=6"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    monitored = [row for row in rows if "monitor/seconds" in row]
    assert [row["iteration"] for row in monitored] == [0, 3, 7, 9]  # at the start, every 4 steps and the end
    assert {"monitor/high_norm_rel/b01", "monitor/norm_p99/b00", "monitor/cls_to_registers"} <= set(monitored[0])
    assert main(["train", "--output-dir", str(tmp_path / "off"), *run, "monitor.period=0"]) == 0
    assert "monitor/" not in (tmp_path / "off" / "metrics.jsonl").read_text()
