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
