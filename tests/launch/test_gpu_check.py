"""launch/gpu_check.sh and launch/gpu_check.py: the GPU check fits its window and returns what it measured.

The rehearsal runs the device's phases end to end on the CPU with tiny models (inductor, bf16 autocast, fused
SwiGLU, FSDP2 in one process with fused AdamW, the naive way, the heads); the unit tests show that a failing or
hanging phase is recorded and the next one runs, and that the plan's batches follow the memory plan."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
sys.path.insert(0, str(LAUNCH))  # gpu_check.py imports gpu_plan.py beside it, as when run as a script
import gpu_plan  # noqa: E402

spec = importlib.util.spec_from_file_location("gpu_check", LAUNCH / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
spec.loader.exec_module(gpu_check)

ALL_PHASES = ["device", "vitl", "gpu_tests", "vitg", "vitl_fsdp", "vitl_naive", "heads"]


def test_the_rehearsal_runs_every_phase_and_checks_the_budget_and_out(tmp_path):
    env = {**subprocess_env(), "PYTHON": sys.executable, "OUT": str(tmp_path)}
    result = subprocess.run([LAUNCH / "gpu_check.sh", "--cpu-rehearsal"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert check["rehearsal_on_cpu"] is True and check["card"] == "cpu" and check["required_phases_ok"]
    assert list(check["phases"]) == ALL_PHASES and all(p["status"] == "ok" for p in check["phases"].values())
    assert check["written_after"] == ["start", *ALL_PHASES, "end", "out_files"]  # after every phase
    phases = {name: check["phases"][name].get("figures", {}) for name in ALL_PHASES}
    assert phases["device"]["name"] == "cpu" and phases["device"]["torch"]
    large = phases["vitl"]
    assert large["compile"] == "blocks" and large["dtype"] == "bfloat16" and large["iterations"] == 20
    assert large["losses_finite"] and large["step_flops"] > 0 and 0 < large["mfu_of_matmul_peak"] < 1
    assert large["planned_bytes"] > 0 and large["planned_over_measured"] > 0
    assert phases["vitg"]["batch_size"] == 4 and phases["vitg"]["iterations"] == 20
    assert phases["vitl_fsdp"]["fsdp"] == "always" and phases["vitl_fsdp"]["adamw_implementation"] == "fused"
    assert phases["vitl_naive"]["attention_backend"] == "math" and phases["vitl_naive"]["compile"] == "none"
    assert phases["heads"]["peak_memory_bytes"] > 0 and phases["heads"]["batch_size"] == 4
    assert check["phases"]["gpu_tests"]["figures"]["failures"] == 0 and check["phases"]["gpu_tests"]["figures"]["tests"]
    assert check["budget"] == {"budget_s": 450, "setup_s": 30, "required_phases_s": 395, "margin_s": 25,
                               "total_s": 450, "fits": True, "left_for_optional_phases_s": 0}
    out = check["out_files"]
    assert out["fits"] and out["files"] == sorted(["gpu_check.json", "device.log", "vitl.log", "vitl_kernels.txt",
                                                   "gpu_tests.log", "vitg.log", "extras.log"])
    assert "aten::" in (tmp_path / "vitl_kernels.txt").read_text()
    assert "===== vitl_naive" in (tmp_path / "extras.log").read_text()
    assert "gpu_check on cpu: required phases ok" in result.stdout
    help_text = subprocess.run([LAUNCH / "gpu_check.sh", "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "--cpu-rehearsal" in help_text and "--prepare" in help_text and "30 + 395 + 25 = 450" in help_text


def test_a_failing_or_hanging_phase_is_recorded_and_the_next_one_runs(tmp_path):
    """A phase past its limit is stopped with its whole process group; a failing one is recorded; the summary is
    rewritten after each; a phase the deadline leaves no time for is skipped."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    check = gpu_check.Check(out=out, work=work, plan={}, deadline=time.monotonic() + 60, rehearsal=True)
    check.summary["phases"] = {}
    pid_file = tmp_path / "grandchild"
    hang = gpu_check.Phase("vitl", 2, 1, "hangs")
    started = time.monotonic()
    record = check.run(hang, ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo working; wait"])
    check.write_summary("vitl")
    assert record["status"] == "timed_out" and time.monotonic() - started < 15
    state = Path(f"/proc/{pid_file.read_text().strip()}/status")
    assert not state.exists() or "zombie" in state.read_text()  # the loader-like grandchild is gone too
    assert json.loads((out / "gpu_check.json").read_text())["phases"]["vitl"]["status"] == "timed_out"
    assert "working" in (out / "vitl.log").read_text()
    fail = gpu_check.Phase("gpu_tests", 30, 1, "fails")
    assert check.run(fail, [sys.executable, "-c", "raise SystemExit(3)"])["status"] == "failed"
    check.write_summary("gpu_tests")
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["phases"]["gpu_tests"]["exit_code"] == 3 and summary["written_after"] == ["vitl", "gpu_tests"]
    check.deadline = time.monotonic() + 5
    record = check.run(gpu_check.Phase("vitg", 100, 30, "needs 30 s"), [sys.executable, "-c", "pass"])
    assert record["status"] == "skipped" and "it needs 30 s" in record["why"]


GIB = 2**30


@pytest.mark.parametrize("memory, expected", [
    (79.0, 12),  # 71.1 GiB usable: 14 images fit, the recipe's 12 is kept
    (60.0, 8),   # 54 usable: 9 fit -> the multiple of 4 below
    (40.0, 3),   # 36 usable: 3 fit (below 4: as it is)
    (35.0, 0),   # 31.5 usable: 1 fits, under KoLeo's 2
])
def test_the_planned_batch_is_the_recipes_or_the_largest_that_fits(memory, expected):
    plan = {"fixed_bytes": 27 * GIB, "bytes_per_batch_image": 3 * GIB}
    assert gpu_plan.planned_batch(plan, memory, 12) == expected


def test_the_card_is_the_plans_by_memory():
    plan = {"cards": {"h100": {"memory_gib": 79.0}, "h200": {"memory_gib": 139.0}}}
    assert gpu_check.choose_card(plan, {"name": "NVIDIA H100 80GB HBM3", "total_memory_bytes": 81559 * 2**20}) == "h100"
    assert gpu_check.choose_card(plan, {"name": "NVIDIA H200", "total_memory_bytes": 143771 * 2**20}) == "h200"
    assert gpu_check.choose_card(plan, {"name": "NVIDIA GH200 480GB", "total_memory_bytes": 96 * GIB}) == "h100"
    assert gpu_check.choose_card(plan, {"name": "NVIDIA A100-SXM4-40GB", "total_memory_bytes": 40 * GIB}) == "h100"
    assert gpu_check.choose_card({"cards": {"cpu": {"memory_gib": 8.0}}}, {"name": "cpu"}) == "cpu"


def test_the_naive_phase_is_the_benchmarks_naive_way():
    """gpu_check.py keeps its own copy so that the phase runner imports neither torch nor dinoreg."""
    from dinoreg.tools.training import NAIVE  # noqa: PLC0415

    assert gpu_check.NAIVE == NAIVE
