"""The live artifact monitor: planted high-norm tokens are counted per block; the loop logs it on schedule."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.metrics.tokens import patch_norms
from dinoreg.train.monitor import artifact_metrics, maps_picture
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


def test_the_maps_picture_shows_the_planted_tokens_and_the_attention():
    model = planted_backbone(4)
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        outputs, attention = model.block_outputs(images, attention_of=(2,), num_queries=5)
    norms = patch_norms(outputs[-1:], 4)[0]  # [5, 16]
    picture = maps_picture(images, norms, attention[2], num_register_tokens=4)
    # 4 images (rows) x [image, norms, cls, reg0..reg3] (columns), 32 px each
    assert picture.shape == (3, 4 * 32, 7 * 32) and 0 <= picture.min() and picture.max() <= 1
    viridis_top, viridis_bottom = torch.tensor([0.993248, 0.906157, 0.143936]), torch.tensor([0.267004, 0.004874,
                                                                                               0.329415])
    for row in range(4):
        norm_map = picture[:, row * 32:(row + 1) * 32, 32:64]  # [3, 32, 32]: one 8 x 8 square per patch
        colours = norm_map[:, 4::8, 4::8].reshape(3, 16).T  # [16, 3]: the middle of each patch's square
        assert all(torch.allclose(colours[p], viridis_top, atol=0.05) for p in PLANTED)  # about 300: the top
        assert all(torch.allclose(colours[p], viridis_bottom, atol=0.1) for p in range(16) if p not in PLANTED)
        assert torch.equal(norm_map[:, :8, :8], colours[0].view(3, 1, 1).expand(3, 8, 8))  # one square per patch
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)  # the image column is the image, unnormalised
        assert torch.allclose(picture[:, row * 32:(row + 1) * 32, :32], (images[row] * std + mean).clamp(0, 1))
    # the [CLS] column is brightest where the last block's head-averaged cls attention over patches peaks
    cls_map = attention[2][0, :, 0, 5:].mean(0)  # [16]
    y, x = divmod(int(cls_map.argmax()), 4)
    inferno_top = torch.tensor([0.988362, 0.998364, 0.644924])
    assert torch.allclose(picture[:, y * 8 + 4, 64 + x * 8 + 4], inferno_top, atol=1e-5)


def test_the_loop_logs_the_monitor_on_schedule(tmp_path):
    run = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=10",
           "evaluation.knn_enabled=false"]
    assert main(["train", "--output-dir", str(tmp_path / "on"), *run, "monitor.period=4", "monitor.images=6"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    monitored = [row for row in rows if "monitor/seconds" in row]
    assert [row["iteration"] for row in monitored] == [0, 3, 7, 9]  # at the start, every 4 steps and the end
    assert {"monitor/high_norm_rel/b01", "monitor/norm_p99/b00", "monitor/cls_to_registers"} <= set(monitored[0])
    events = EventAccumulator(str(tmp_path / "on" / "tensorboard" / "on"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert [image.step for image in events.Images("monitor/maps")] == [0, 3, 7, 9]  # with every measurement
    assert (events.Images("monitor/maps")[0].height, events.Images("monitor/maps")[0].width) == (4 * 32, 7 * 32)
    assert [h.step for h in events.Histograms("monitor/patch_norms")] == [0, 3, 7, 9]
    assert events.Histograms("monitor/patch_norms")[0].histogram_value.num == 6 * 16  # 6 probe images, 4 x 4
    assert main(["train", "--output-dir", str(tmp_path / "off"), *run, "monitor.period=0"]) == 0
    assert "monitor/" not in (tmp_path / "off" / "metrics.jsonl").read_text()
