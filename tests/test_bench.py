"""`dinoreg bench train`: the FLOPs of a step against a hand count, and the report's structure (its numbers are
measurements of this machine, not asserted)."""

import importlib
import json
import subprocess
import sys
import weakref

import pytest
import torch

from dinoreg.cli import main
from dinoreg.config import load_config
from dinoreg.tools import training
from dinoreg.tools.flops import training_step_flops
from dinoreg.tools.heads import benchmark_heads
from dinoreg.tools.training import NAIVE
from dinoreg.train import loop

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


def test_meta_device_count_equals_fvcores_trace():
    """The count on the meta device (torch's FlopCounterMode) is twice fvcore's multiply-adds of the same backbone
    traced on the CPU (count_flops), for the MLP and the SwiGLU blocks, and of the heads."""
    from fvcore.nn import FlopCountAnalysis  # noqa: PLC0415

    from dinoreg.tools.flops import count_flops, forward_flops  # noqa: PLC0415
    from dinoreg.train.build import build_ssl_model  # noqa: PLC0415

    for ffn in ("mlp", "swiglufused"):
        cfg = load_config("tiny_cpu", [*TINY, f"student.ffn_layer={ffn}", "student.depth=2"])
        model = build_ssl_model(cfg, load_pretrained=False)
        with torch.device("meta"):
            meta = build_ssl_model(cfg, load_pretrained=False)
        for size in (48, 24):
            assert forward_flops(meta.student["backbone"].eval(), torch.zeros(1, 3, size, size, device="meta")) \
                == 2 * count_flops(model.student["backbone"], size)
        head = FlopCountAnalysis(model.student["dino_head"], (torch.zeros(1, 192),))
        head.unsupported_ops_warnings(False)
        assert forward_flops(meta.student["dino_head"], torch.zeros(1, 192, device="meta")) == 2 * head.total()


def test_step_flops_build_nothing_on_the_cpu(monkeypatch):
    """No second model: the count draws no weights (every initialisation it reaches is on the meta device)."""
    devices = []
    trunc_normal = torch.nn.init.trunc_normal_
    monkeypatch.setattr(torch.nn.init, "trunc_normal_",
                        lambda tensor, *a, **k: devices.append(tensor.device.type) or trunc_normal(tensor, *a, **k))
    training_step_flops(load_config("tiny_cpu", TINY))
    assert devices and set(devices) == {"meta"}


def test_bench_train_reports_throughput_mfu_memory_and_the_naive_way(tmp_path, capsys, monkeypatch):
    """A benchmark keeps nothing (no checkpoint, no teacher file, no monitor), draws its model on the device,
    reads the step's FLOPs from --flops without counting them, writes the profile of 2 further steps, and frees the
    first half's model before the naive half builds its own, even when a reference cycle holds it (as compiled
    blocks did under torch 2.11)."""
    flops = tmp_path / "flops.json"
    assert main(["bench", "flops", "--config", "tiny_cpu", "--json", str(flops), *TINY]) == 0
    counted = json.loads(flops.read_text())
    assert counted["step_flops"] == training_step_flops(load_config("tiny_cpu", TINY))["step_flops"]
    assert counted["batch_size"] == 2 and "TFLOP (student forward x 3" in capsys.readouterr().out

    def never(*args, **kwargs):
        raise AssertionError("a benchmark saved or exported")

    monkeypatch.setattr(loop, "save_checkpoint", never)
    monkeypatch.setattr(loop, "save_backbone", never)
    monkeypatch.setattr(training, "training_step_flops", lambda cfg: pytest.fail("counted FLOPs although given"))
    built, configs = [], []
    original_build, original_train = loop.build_model_and_optimizer, training.train

    def build_with_a_cycle(cfg, *args, **kwargs):
        assert all(ref() is None for ref in built), "the first half's model is still alive"
        model, optimizer = original_build(cfg, *args, **kwargs)
        model.cycle = [model]  # a reference cycle: only the garbage collector frees the model
        built.append(weakref.ref(model))
        return model, optimizer

    monkeypatch.setattr(loop, "build_model_and_optimizer", build_with_a_cycle)
    monkeypatch.setattr(training, "train", lambda cfg, **kw: configs.append(cfg) or original_train(cfg, **kw))
    out, profile = tmp_path / "bench.json", tmp_path / "kernels.txt"
    assert main(["bench", "train", "--config", "tiny_cpu", "--iterations", "2", "--warmup", "1", "--compare",
                 "--flops", str(flops), "--profile", str(profile), "--json", str(out), *TINY]) == 0
    assert len(built) == 2
    for cfg in configs:
        assert cfg.monitor.period == 0 and cfg.checkpoint.period == 0 and cfg.train.initialisation == "device"
        assert not cfg.checkpoint.save_final and not cfg.checkpoint.export_teacher
        assert not cfg.evaluation.knn_enabled
    assert "top operators and kernels of 2 training steps" in profile.read_text() and "aten::" in profile.read_text()
    printed = capsys.readouterr().out
    for words in ("iteration time  median", "TFLOP per step", "% of the measured matmul peak",
                  "no nominal peak known for this device", "peak memory", "(peak_rss)", "naive way", "all finite"):
        assert words in printed
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["iterations"] == 2
    assert result["step_flops"] == counted["step_flops"] and result["fits"] is True
    assert result["achieved_flops_per_s"] == pytest.approx(result["step_flops"] / result["iteration_time_median_s"])
    assert result["mfu_of_matmul_peak"] == pytest.approx(result["achieved_flops_per_s"]
                                                         / result["matmul_peak_flops_per_s"])
    assert result["nominal_peak_flops_per_s"] is None and result["mfu_of_nominal_peak"] is None
    assert result["stochastic_depth_savings_counted"] is False and result["peak_memory_bytes"] > 0
    assert result["iteration_time_p90_s"] >= result["iteration_time_median_s"] > 0
    assert result["losses_finite"] and len(result["total_loss"]) == 1 + 2 + 2  # warm-up, timed, profiled
    assert result["naive"]["attention_backend"] == "math" and result["naive"]["overrides"][-len(NAIVE):] == list(NAIVE)
    assert result["speedup_over_naive"] == pytest.approx(result["images_per_sec"] / result["naive"]["images_per_sec"])


def test_a_naive_half_that_runs_out_of_memory_keeps_the_fast_result(monkeypatch, capsys):
    original_train = training.train

    def naive_too_big(cfg, **kwargs):
        if cfg.student.attention_backend == "math":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.19 GiB total)")
        return original_train(cfg, **kwargs)

    monkeypatch.setattr(training, "train", naive_too_big)
    result = training.benchmark_training("tiny_cpu", iterations=1, warmup=1, overrides=TINY, compare=True)
    assert result["fits"] and result["images_per_sec"] > 0 and result["speedup_over_naive"] is None
    assert result["naive"] == {"fits": False, "batch_size": 2, "overrides": [*TINY, *NAIVE],
                               "error": "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.19 GiB total)"}
    assert "naive way       does not fit at batch 2 (CUDA out of memory." in training.format_report(result)


def test_a_flops_file_is_read_as_data(tmp_path, capsys):
    bad = tmp_path / "flops.json"
    for text in ("{not json", '{"step_flops": "__import__(\'os\')"}', "[1, 2]"):
        bad.write_text(text)
        with pytest.raises(SystemExit) as stop:
            main(["bench", "train", "--flops", str(bad)])
        assert stop.value.code == 2
        assert "write it with `dinoreg bench flops --json PATH`" in capsys.readouterr().err


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


def test_the_tools_package_exports_each_public_name_from_its_module():
    """``dinoreg.tools`` hands out its modules' public names without importing the modules it is not asked for, and
    counting a backbone's FLOPs (model-info, analyze flops) imports no training stack."""
    import dinoreg.tools as tools  # noqa: PLC0415

    for name in tools.__all__:
        value = getattr(tools, name)
        assert getattr(importlib.import_module(f"dinoreg.tools.{tools._HOME[name]}"), name) is value
    with pytest.raises(AttributeError):
        tools.not_a_tool  # noqa: B018
    probe = "import sys, dinoreg.tools.memory, dinoreg.tools.flops; sys.exit('dinoreg.train.build' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
