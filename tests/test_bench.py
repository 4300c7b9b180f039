"""`dinoreg bench train`: the FLOPs of a step against a hand count, and the report's structure (its numbers are
measurements of this machine, not asserted)."""

import json

import pytest

from dinoreg.bench import NAIVE, benchmark_heads, training_step_flops
from dinoreg.cli import main
from dinoreg.config import load_config

TINY = ["student.depth=1", "train.batch_size_per_gpu=2", "crops.local_crops_number=2", "dino.head_n_prototypes=64",
        "ibot.head_n_prototypes=64", "train.num_workers=0"]


def vit_macs(size, *, dim=192, heads=3, patch=8, registers=4, depth=1):
    """Multiply-adds of one image through tiny_cpu's ViT, operator by operator (fvcore's units: layer norm 5
    per element; the position-embedding resampling and element-wise work free)."""
    patches = (size // patch) ** 2
    n = 1 + registers + patches
    per_block = n * dim * 3 * dim + n * dim * dim + 2 * n * dim * 4 * dim + 2 * n * n * dim + 2 * n * dim * 5
    return patches * dim * 3 * patch * patch + depth * per_block + n * dim * 5


def head_macs(dim=192, hidden=512, bottleneck=128, prototypes=64):
    return dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * prototypes


def test_step_flops_match_a_hand_count():
    cfg = load_config("tiny_cpu", TINY)
    flops = training_step_flops(cfg)
    global_images, local_images = 4, 4  # 2 views x batch 2, 2 local crops x batch 2
    masked = global_images * 0.5 * 0.3 * 36  # mask probability x mean ratio x patches, the expected count
    student = (vit_macs(48) * global_images + vit_macs(24) * local_images
               + head_macs() * (global_images + local_images + masked))  # one head: iBOT shares the DINO head
    teacher = vit_macs(48) * global_images + head_macs() * (global_images + masked)
    assert flops["masked_patches_expected"] == pytest.approx(masked)
    assert flops["student_forward_flops"] == pytest.approx(2 * student)  # 2 FLOPs per multiply-add
    assert flops["teacher_forward_flops"] == pytest.approx(2 * teacher)
    assert flops["step_flops"] == pytest.approx(2 * (3 * student + teacher))  # backward = 2 forwards


def test_bench_train_reports_throughput_mfu_memory_and_the_naive_way(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--config", "tiny_cpu", "--iterations", "2", "--warmup", "1", "--compare",
                 "--json", str(out), *TINY, "evaluation.knn_enabled=false", "monitor.period=0"]) == 0
    printed = capsys.readouterr().out
    for words in ("iteration time  median", "TFLOP per step", "% of the measured matmul peak",
                  "no nominal peak known for this device", "peak memory", "(peak_rss)", "naive way"):
        assert words in printed
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["iterations"] == 2
    assert result["step_flops"] == training_step_flops(load_config("tiny_cpu", TINY))["step_flops"]
    assert result["achieved_flops_per_s"] == pytest.approx(result["step_flops"] / result["iteration_time_median_s"])
    assert result["mfu_of_matmul_peak"] == pytest.approx(result["achieved_flops_per_s"]
                                                         / result["matmul_peak_flops_per_s"])
    assert result["nominal_peak_flops_per_s"] is None and result["mfu_of_nominal_peak"] is None
    assert result["stochastic_depth_savings_counted"] is False and result["peak_memory_bytes"] > 0
    assert result["iteration_time_p90_s"] >= result["iteration_time_median_s"] > 0
    assert result["naive"]["attention_backend"] == "math" and result["naive"]["overrides"][-len(NAIVE):] == list(NAIVE)
    assert result["speedup_over_naive"] == pytest.approx(result["images_per_sec"] / result["naive"]["images_per_sec"])


def test_bench_heads_counts_the_rows_of_every_head(tmp_path, capsys):
    """The heads alone: 2 global + 2 local crops x batch 2 cls rows over the DINO head, the iBOT masks' patches
    over the separate iBOT head; the peak is reported against the fp32 logits of those rows, which the step holds
    at least once (student logits, teacher probabilities and the logits' gradient live together)."""
    out = tmp_path / "heads.json"
    heads = [*TINY, "ibot.separate_head=true", "dino.head_n_prototypes=8192", "ibot.head_n_prototypes=4096"]
    assert main(["bench", "heads", "--config", "tiny_cpu", "--json", str(out), *heads]) == 0
    assert "x the fp32 logits of those rows" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["cls_rows"] == 8 and result["dino_prototypes"] == 8192 and result["ibot_prototypes"] == 4096
    cfg = load_config("tiny_cpu", heads)
    from dinoreg.train.build import BatchMasks  # noqa: PLC0415
    assert result["masked_patch_rows"] == BatchMasks(cfg)(4, 0)["mask_indices"].shape[0] > 0
    assert result["fp32_logits_bytes"] == 4 * (8 * 8192 + result["masked_patch_rows"] * 4096)
    assert result["peak_memory_kind"] == "peak_rss" and result["peak_memory_bytes"] >= result["fp32_logits_bytes"]
    assert result["peak_in_fp32_logits"] == pytest.approx(result["peak_memory_bytes"] / result["fp32_logits_bytes"])
    assert benchmark_heads("tiny_cpu", overrides=TINY)["separate_ibot_head"] is False
