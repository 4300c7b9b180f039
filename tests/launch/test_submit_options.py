"""`dinoreg submit` without a cluster: the sbatch request, its validation, bad input, the job wrapper's pieces."""

import json
import os
import subprocess
import sys

import pytest

from dinoreg.cli import main
from dinoreg.launch import SlurmRequest, SubmitError, final_metrics, format_sbatch, sbatch_parameters


def test_gpu_request_is_one_task_per_gpu():
    params = sbatch_parameters(SlurmRequest(nodes=4, gpus_per_node=8, cpus_per_task=10, mem_gb=320,
                                            timeout_min=2800, partition="gpu", account="vision", qos="high",
                                            constraint="h100", exclude="node[01-02]", comment="vitl run"))
    assert format_sbatch(params, "/runs/%j/slurm") == [
        "#SBATCH --account=vision", "#SBATCH --comment='vitl run'", "#SBATCH --constraint=h100",
        "#SBATCH --cpus-per-task=10", "#SBATCH --error=/runs/%j/slurm/%j_0_log.err",
        "#SBATCH --exclude='node[01-02]'", "#SBATCH --gpus-per-node=8", "#SBATCH --job-name=dinoreg",
        "#SBATCH --mem=320GB", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --open-mode=append",
        "#SBATCH --output=/runs/%j/slurm/%j_0_log.out", "#SBATCH --partition=gpu", "#SBATCH --qos=high",
        "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --time=2800"]


def test_cpu_request_and_fractional_memory():
    params = sbatch_parameters(SlurmRequest(gpus_per_node=0, tasks_per_node=2, mem_gb=1.5, timeout_min=30,
                                            signal_delay_s=60, srun_args=["--cpu-bind=none"]))
    assert params["ntasks_per_node"] == 2 and "gpus_per_node" not in params
    assert params["mem"] == "1536MB" and params["srun_args"] == ["--cpu-bind=none"]
    assert "#SBATCH --signal=USR2@60" in format_sbatch(params, "logs")


@pytest.mark.parametrize("request_, message", [
    (SlurmRequest(gpus_per_node=0), "zero tasks"),
    (SlurmRequest(gpus_per_node=8, tasks_per_node=2), "one task per GPU"),
    (SlurmRequest(gpus_per_node=0, tasks_per_node=1, timeout_min=1, signal_delay_s=120), "--signal-delay-s"),
    (SlurmRequest(max_requeues=-1), "--max-requeues"),
])
def test_invalid_requests_name_the_option(request_, message):
    with pytest.raises(SubmitError, match=message):
        sbatch_parameters(request_)


def test_dry_run_prints_the_request_and_command(tmp_path, capsys):
    code = main(["submit", "--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout-min", "30",
                 "--output-dir", str(tmp_path / "%j"), "optim.epochs=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --ntasks-per-node=2" in out and "#SBATCH --time=30" in out and "--gpus-per-node" not in out
    assert f"dinoreg train --config tiny_cpu --output-dir {tmp_path}/%j optim.epochs=1" in out
    assert not any(tmp_path.iterdir())  # nothing written, nothing submitted


def test_dry_run_of_another_command(tmp_path, capsys):
    assert main(["submit", "--dry-run", "--gpus-per-node", "1", "--log-dir", str(tmp_path), "--",
                 "analyze", "flops", "--arch", "vit_small"]) == 0
    out = capsys.readouterr().out
    assert "runs: dinoreg analyze flops --arch vit_small" in out
    assert "#SBATCH --gpus-per-node=1" in out and "#SBATCH --cpus-per-task=10" in out and "#SBATCH --mem=40GB" in out


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["optim.epochs=zero"], "optim.epochs"),
    (["--gpus-per-node", "0"], "zero tasks"),
    (["--mem-gb", "nan"], "--mem-gb"),
    (["--wait-timeout-min", "nan"], "--wait-timeout-min must be a positive number of minutes"),
    (["--wait-timeout-min", "-1"], "--wait-timeout-min must be a positive number of minutes"),
    (["checkpoint.save_on_signals=[SIGUSR1]"], "lacks SIGUSR2"),
    (["--", "analyze", "flops", "--arch", "vit_huge"], "is invalid"),
    (["optim.epochs=1", "--", "analyze", "flops"], "apply to training"),
])
def test_bad_input_is_refused_before_submitting(args, message, capsys):
    assert main(["submit", "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err  # one line, the parser's refusal folded in


def test_a_folder_a_run_is_training_into_is_refused_naming_the_holder(tmp_path, capsys):
    from dinoreg.run_dir import RunLock  # noqa: PLC0415

    holder = RunLock(tmp_path / "run")  # as a training process holds it
    try:
        assert main(["submit", "--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "1", "--output-dir",
                     str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dinoreg submit: {tmp_path / 'run'} is in use by dinoreg train on host ")
        assert f"pid {os.getpid()}" in err and len(err.splitlines()) == 1
    finally:
        holder.release()
    assert main(["submit", "--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "1", "--output-dir",
                     str(tmp_path / "run")]) == 0


def test_no_sbatch_suggests_torchrun(tmp_path):
    # A PATH holding only this Python: a machine that is not a SLURM submission host.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bin_dir)}
    result = subprocess.run([sys.executable, "-m", "dinoreg", "submit", "--output-dir", str(tmp_path / "%j")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "sbatch/srun not found" in result.stderr and "launch/torchrun.sh train" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_final_metrics_merges_the_last_training_and_knn_rows(tmp_path):
    rows = [{"iteration": 0, "total_loss": 3.0}, {"iteration": 0, "knn_top1": 0.2},
            {"iteration": 1, "total_loss": 2.5, "lr": 0.1}, {"iteration": 1, "knn_top1": 0.4, "knn_top5": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert final_metrics(tmp_path) == {"iteration": 1, "total_loss": 2.5, "lr": 0.1, "knn_top1": 0.4,
                                       "knn_top5": 0.9}
    assert final_metrics(tmp_path / "missing") == {}
