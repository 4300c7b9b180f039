"""`dinoreg bench memory`: the states' arithmetic, the largest batch, and the plan against measured training peaks
on this CPU (fp32, one process) within 15% (docs/BENCHMARKS.md has the recorded comparisons)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import subprocess_env

from dinoreg.cli import main
from dinoreg.tools.planner import GIB, plan_memory

HERE = Path(__file__).resolve().parent
SMALL = ["student.depth=3", "train.batch_size_per_gpu=16"]


def test_states_divide_by_the_gpus_and_the_largest_batch_is_the_last_that_fits(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["bench", "memory", "--config", "tiny_cpu", "--gpus", "4", "--gpu-memory-gib", "3", "--json",
                 str(out), *SMALL, "train.sharding=full_shard"]) == 0
    printed = capsys.readouterr().out
    assert "largest per-GPU batch that fits 3 GiB" in printed and "AdamW moments" in printed
    four = json.loads(out.read_text())
    one = plan_memory("tiny_cpu", overrides=SMALL, gpu_memory_gib=3)
    student, teacher = one["student_parameters"], one["teacher_parameters"]
    assert teacher == student  # an exact copy, heads included
    assert one["states_bytes"]["master_parameters"] == 4 * (student + teacher)
    assert one["states_bytes"]["adamw"] == 2 * one["states_bytes"]["gradients"] == 8 * student
    assert one["states_bytes"]["bf16_compute_copies"] == 2 * student  # one GPU: autocast's cached copy
    for key in ("master_parameters", "gradients", "adamw"):
        assert four["states_bytes"][key] == pytest.approx(one["states_bytes"][key] / 4)
    # the batch-dependent terms are linear: the largest batch is the last whose total fits the budget
    fixed, per_image = one["fixed_bytes"], one["bytes_per_batch_image"]
    assert one["total_bytes"] == pytest.approx(fixed + one["batch_size"] * per_image)
    assert fixed == pytest.approx(sum(one["states_bytes"].values()) + one["reserve_bytes"] + one["heads_and_losses_bytes"]
                                  - one["batch_size"] * (per_image - one["activations_bytes"] / one["batch_size"]))
    largest = one["largest_batch_that_fits"]
    assert largest > 0 and fixed + largest * per_image <= 3 * GIB < fixed + (largest + 1) * per_image


@pytest.mark.parametrize("overrides", [["train.activation_checkpointing=none"],
                                       ["train.activation_checkpointing=full"]])
def test_plan_is_within_15_percent_of_a_measured_training_peak(tmp_path, overrides):
    config = overrides  # the tiny_cpu recipe itself: the unplanned fixed costs (batch, export) are a few MB
    run = subprocess.run([sys.executable, HERE / "measure_step_memory.py", "tiny_cpu", str(tmp_path / "run"),
                          *config], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])["measured_bytes"]
    # the planner in a fresh process too, as users run it (a long-lived process's heap blurs its measurements)
    plan = subprocess.run([sys.executable, "-m", "dinoreg", "bench", "memory", "--config", "tiny_cpu", "--fp32",
                           "--reserve-gib", "0", "--json", str(tmp_path / "plan.json"), *config],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    planned = json.loads((tmp_path / "plan.json").read_text())["total_bytes"]
    assert planned == pytest.approx(measured, rel=0.15)


TINY_HEADS = ["dino.head_n_prototypes=64", "ibot.head_n_prototypes=64", "dino.head_hidden_dim=64",
              "ibot.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_bottleneck_dim=32"]


def test_a_rope_student_and_a_rope_teacher_distilled_into_a_student_with_registers(tmp_path, capsys):
    """A DINOv3-family run is planned like any other (its storage tokens are its registers); a frozen RoPE teacher
    with its heads (a DINOv3 training teacher_checkpoint's layout) is counted in the states of its student's plan."""
    import torch  # noqa: PLC0415

    from dinoreg.config import load_config  # noqa: PLC0415
    from dinoreg.train.build import build_ssl_model  # noqa: PLC0415

    rope = plan_memory("tiny_rope_cpu", overrides=["student.depth=2", "train.batch_size_per_gpu=4", *TINY_HEADS],
                       bf16=False)
    assert rope["student_family"] == "rope" and rope["frozen_parameters"] == {}
    assert rope["states_bytes"]["master_parameters"] == 4 * (rope["student_parameters"] + rope["teacher_parameters"])
    assert rope["states_bytes"]["frozen_models"] == 0
    assert rope["activation_bytes_per_image_per_block"]["global"] > rope["activation_bytes_per_image_per_block"]["local"] > 0

    teacher_cfg = load_config("tiny_rope_cpu", ["student.embed_dim=64", "student.num_heads=2", "student.depth=2",
                                                *TINY_HEADS])
    teacher = build_ssl_model(teacher_cfg, load_pretrained=False).teacher
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher.state_dict()}, path)
    student = ["student.embed_dim=32", "student.num_heads=2", "student.depth=2", "student.num_register_tokens=4",
               "train.batch_size_per_gpu=4", *TINY_HEADS]
    distill = ["distillation.enabled=true", f"distillation.teacher={path}"]
    out = tmp_path / "plan.json"
    assert main(["bench", "memory", "--config", "tiny_cpu", "--fp32", "--gpus", "2", "--json", str(out),
                 *student, *distill]) == 0
    assert "frozen models, fp32" in capsys.readouterr().out and "distillation_teacher" in out.read_text()
    plan = json.loads(out.read_text())
    teacher_parameters = sum(p.numel() for p in teacher.parameters())
    assert plan["student_family"] == "learned" and plan["frozen_families"] == {"distillation_teacher": "rope"}
    assert plan["frozen_parameters"] == {"distillation_teacher": teacher_parameters}
    assert plan["states_bytes"]["frozen_models"] == 4 * teacher_parameters / 2  # sharded like the EMA teacher
    assert plan["total_bytes"] == pytest.approx(plan["fixed_bytes"] + plan["batch_size"] * plan["bytes_per_batch_image"])
    assert plan["fixed_bytes"] > sum(plan["states_bytes"].values())  # the frozen teacher among them
