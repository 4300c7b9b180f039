"""`dinoreg submit` against a real single-node SLURM cluster: results, preemption and requeue, failures.

Every job is a 2-task CPU (gloo) run of the tiny recipe; each test has its own submitit folder and output
directory. Every wait is bounded, so a job killed before writing its result cannot hang the suite.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from launch_helpers import TINY, wait_for_training_rows
from PIL import Image
from slurm_helpers import job_handle, log, metric_rows, preempt, submit_job, submit_job_and_wait_aside
from submitit.core.utils import FailedJobError

from dinoreg.launch import wait_for_job

RESOURCES = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout-min", "30"]
RECIPE = [*TINY, "optim.epochs=4", "train.epoch_length=30", "train.batch_size_per_gpu=8", "train.num_workers=0",
          "evaluation.knn_enabled=false"]
ITERATIONS = 120
JOB_TIMEOUT_S = 300
# The recipes' loader: worker processes, which SLURM signals with the rest of the job (the figures do not depend on
# the worker count, so these jobs still match the reference bitwise).
WORKERS = ["train.num_workers=2"]


def dinoreg_submit(env, tmp_path, *args, timeout=JOB_TIMEOUT_S):
    return submit_job(env, tmp_path, *RESOURCES, *args, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory):
    """The reference: one job run to the end with --wait."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result, info = dinoreg_submit(slurm_env, tmp_path, "--wait", *RECIPE)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, info, metric_rows(info["output_dir"])


def test_submit_two_task_job_and_get_its_result(uninterrupted, slurm_env, tmp_path):
    result, info, rows = uninterrupted
    assert f"submitted job {info['job_id']}: 1 node(s) x 2 task(s)" in result.stdout
    assert info["output_dir"].endswith(f"/run/{info['job_id']}")  # %j substituted
    assert f"job {info['job_id']} done: total_loss" in result.stdout
    assert sorted(rows) == list(range(ITERATIONS))
    # The log the printed `tail -f` hint names is the one that holds the training progress.
    followed = next(line.split("tail -f ", 1)[1].split()[0] for line in result.stdout.splitlines() if "tail -f" in line)
    assert followed == str(Path(info["log_dir"], f"{info['job_id']}_0_log.out"))
    assert f"[{ITERATIONS}/{ITERATIONS}] eta 0:00:00 loss" in Path(followed).read_text()
    # Both tasks returned the same result, which is what the run logged.
    results = job_handle(info).results()
    assert [r["exit_code"] for r in results] == [0, 0]
    assert results[0] == results[1]
    assert results[0]["final"]["iteration"] == ITERATIONS - 1
    assert results[0]["final"]["total_loss"] == rows[ITERATIONS - 1]["total_loss"]
    meta = json.loads((Path(info["output_dir"]) / "checkpoints" / str(ITERATIONS) / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert "task 1/2" in log(info, task=1)

    # --dry-run prints exactly the #SBATCH lines of the script that was submitted.
    dry = subprocess.run([sys.executable, "-m", "dinoreg", "submit", "--dry-run", *RESOURCES, "--output-dir",
                          str(Path(info["output_dir"]).parent / "%j"), *RECIPE],
                         env=slurm_env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    printed = [line for line in dry.stdout.splitlines() if line.startswith("#SBATCH")]
    submitted = Path(info["submission_file"]).read_text().splitlines()
    assert printed == [line for line in submitted if line.startswith("#SBATCH")]
    assert info["command"] in dry.stdout


def test_preempted_job_requeues_resumes_and_matches(uninterrupted, slurm_env, tmp_path):
    """With loader workers, which SLURM signals too: only the main processes save, then the job requeues itself and
    resumes bitwise; `dinoreg submit --wait` follows it through the requeue to its end."""
    _, _, reference = uninterrupted
    waiting, info = submit_job_and_wait_aside(slurm_env, tmp_path, *RESOURCES, *RECIPE, *WORKERS,
                                              timeout=JOB_TIMEOUT_S)
    try:
        results, states, run_dir, saved_at = preempt(slurm_env, info, after_rows=6, timeout=JOB_TIMEOUT_S)
        out, err = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    assert 6 <= saved_at < ITERATIONS
    assert f"SIGUSR2: saved {run_dir}/checkpoints/{saved_at}; exiting with code 75" in log(info, kind="out")
    assert "requeueing: requeue 1 of at most 10" in log(info)
    assert "requeued 1 times so far" in log(info)
    assert f"resumed from {run_dir}/checkpoints/{saved_at} (iteration {saved_at})" in log(info, kind="out")
    assert "PENDING" in states[1:] or "REQUEUED" in states  # it went back to the queue
    for task in (0, 1):  # no worker ran a handler (submitit's requeue) or died
        assert "DataLoader worker" not in log(info, task=task) and "temporary saved file" not in log(info, task=task)
    # The same figures, bitwise, as the run that was never interrupted (which had no workers).
    assert metric_rows(info["output_dir"]) == reference
    assert results[0]["final"]["total_loss"] == reference[ITERATIONS - 1]["total_loss"]
    # --wait saw the requeue and reported the end, not a failure
    assert waiting.returncode == 0, out + err
    printed = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"job {info['job_id']}: ")]
    assert "RUNNING" in printed and ("PENDING" in printed[printed.index("RUNNING"):] or "REQUEUED" in printed)
    assert f"job {info['job_id']} done: total_loss" in out and "failed" not in err


def test_wait_follows_a_requeued_job_past_its_earlier_errors(slurm_env, tmp_path):
    """--wait took the errors its tasks wrote in an earlier run for the job's end, and reported `job ... failed` while
    the job had been requeued and went on to end COMPLETED. An error counts once SLURM says the job is over; a requeue
    makes it stale. Here the first run fails (no images yet), the job is requeued once the images exist, and waiting
    then returns the second run's results."""
    images = tmp_path / "images"
    result, info = dinoreg_submit(slurm_env, tmp_path, "--tasks-per-node", "1", *RECIPE, "optim.epochs=1",
                                  "train.epoch_length=2", f"train.dataset_path={images}")
    assert result.returncode == 0, result.stderr
    job = job_handle(info, tasks=1)
    with pytest.raises(FailedJobError, match=re.escape(str(images))):  # a job that ended failing is reported
        wait_for_job(job, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    assert job.task(0).paths.result_pickle.exists()  # the error of the first run
    for index in range(8):
        (images / "shapes").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (30 * index, 255 - 30 * index, 90)).save(images / "shapes" / f"{index}.png")
    subprocess.run(["scontrol", "requeue", info["job_id"]], env=slurm_env, check=True, timeout=60)
    states = []
    results = wait_for_job(job, timeout_s=JOB_TIMEOUT_S, poll_s=0.5, on_state=states.append)
    assert [r["exit_code"] for r in results] == [0] and results[0]["final"]["iteration"] == 1
    assert states[0] in ("PENDING", "REQUEUED") and "requeued 1 times so far" in log(info)


def test_external_requeue_resumes_from_the_periodic_checkpoint(uninterrupted, slurm_env, tmp_path):
    _, _, reference = uninterrupted
    # No SIGTERM handling: SLURM's kill is not saved on, so the job restarts from a periodic checkpoint.
    result, info = dinoreg_submit(slurm_env, tmp_path, *RECIPE, "checkpoint.period=4",
                                  "checkpoint.save_on_signals=[SIGUSR1,SIGUSR2]")
    assert result.returncode == 0, result.stderr
    wait_for_training_rows(info["output_dir"], 10, timeout=JOB_TIMEOUT_S)
    subprocess.run(["scontrol", "requeue", info["job_id"]], env=slurm_env, check=True, timeout=60)
    wait_for_job(job_handle(info), timeout_s=JOB_TIMEOUT_S, poll_s=0.5)

    resumed = re.search(r"resumed from \S+/checkpoints/(\d+)", log(info, kind="out"))
    assert resumed, log(info, kind="out")
    assert int(resumed.group(1)) % 4 == 0 and int(resumed.group(1)) >= 8
    assert "requeued 1 times so far" in log(info)
    assert metric_rows(info["output_dir"]) == reference


def test_requeues_are_bounded(slurm_env, tmp_path):
    result, info = dinoreg_submit(slurm_env, tmp_path, "--max-requeues", "0", *RECIPE)
    assert result.returncode == 0, result.stderr
    wait_for_training_rows(info["output_dir"], 4, timeout=JOB_TIMEOUT_S)
    subprocess.run(["scancel", "--signal=USR2", info["job_id"]], env=slurm_env, check=True, timeout=60)
    with pytest.raises(FailedJobError, match=r"not requeued: the job was already requeued 0 times "
                                             r"\(--max-requeues 0\); submit the same command"):
        wait_for_job(job_handle(info), timeout_s=JOB_TIMEOUT_S, poll_s=0.5, grace_s=3)
    assert (Path(info["output_dir"]) / "checkpoints" / "latest").exists()  # the work is kept


def test_failing_job_reports_its_error(slurm_env, tmp_path):
    missing = tmp_path / "no-such-images"
    result, info = dinoreg_submit(slurm_env, tmp_path, "--wait", *RECIPE, f"train.dataset_path={missing}")
    assert result.returncode == 1
    assert f"job {info['job_id']} failed" in result.stderr and str(missing) in result.stderr
    with pytest.raises(FailedJobError, match="no-such-images"):
        job_handle(info).result()


def test_unknown_partition_shows_sbatch_message(slurm_env, tmp_path):
    result, info = dinoreg_submit(slurm_env, tmp_path, "--partition", "no-such-partition", *RECIPE)
    assert result.returncode == 1 and info is None
    assert "sbatch refused the job" in result.stderr and "invalid partition" in result.stderr.lower()
    assert "sinfo" in result.stderr


def test_unknown_account_shows_sbatch_message(slurm_env, tmp_path):
    # The local cluster enforces accounting associations, as real clusters do: only account "dinoreg" exists.
    result, info = dinoreg_submit(slurm_env, tmp_path, "--account", "no-such-account", *RECIPE)
    assert result.returncode == 1 and info is None
    assert "sbatch refused the job" in result.stderr and "invalid account" in result.stderr.lower()
    accepted = subprocess.run([sys.executable, "-m", "dinoreg", "submit", *RESOURCES, "--account", "dinoreg",
                               "--output-dir", str(tmp_path / "ok" / "%j"), "--wait", *RECIPE, "optim.epochs=1",
                               "train.epoch_length=2"],
                              env=slurm_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert accepted.returncode == 0, accepted.stderr


def test_any_dinoreg_command_runs_as_a_job(slurm_env, tmp_path):
    report = tmp_path / "flops.json"
    result = subprocess.run(
        [sys.executable, "-m", "dinoreg", "submit", "--gpus-per-node", "0", "--tasks-per-node", "1",
         "--timeout-min", "30", "--log-dir", str(tmp_path / "logs" / "%j"), "--json", str(tmp_path / "job.json"),
         "--wait", "--", "analyze", "flops", "--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32",
         "--registers", "0,4", "--json", str(report)],
        env=slurm_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "job.json").read_text())
    assert info["log_dir"] == str(tmp_path / "logs" / info["job_id"]) and info["output_dir"] is None
    assert [row["registers"] for row in json.loads(report.read_text())] == [0, 4]
    job_result = submitit.SlurmJob(folder=info["log_dir"], job_id=info["job_id"]).result()
    assert job_result["exit_code"] == 0 and job_result["command"][:2] == ["analyze", "flops"]
    assert "GFLOPs" in log(info, kind="out")


def test_a_job_submitted_beside_a_dinoreg_folder_still_imports_the_package(slurm_env, tmp_path):
    """Clone into ~/dinoreg, submit from ~: the job's Python starts in the submission folder, where the clone
    (a folder named dinoreg/ without __init__.py) would shadow the installed package."""
    (tmp_path / "dinoreg").mkdir()
    report = tmp_path / "flops.json"
    dinoreg = shutil.which("dinoreg")  # the console script, as a user types it: it is not shadowed itself
    assert dinoreg, "the dinoreg console script is not on PATH"
    result = subprocess.run(
        [dinoreg, "submit", "--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout-min", "30",
         "--log-dir", str(tmp_path / "logs" / "%j"), "--json", str(tmp_path / "job.json"), "--wait", "--",
         "analyze", "flops", "--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32", "--registers", "0",
         "--json", str(report)],
        env=slurm_env, cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [row["registers"] for row in json.loads(report.read_text())] == [0]


def test_a_distillation_run_is_submitted_like_any_run(uninterrupted, slurm_env, tmp_path):
    # the teacher: the reference job's teacher with its heads; the student: 1 block, its EMA evaluated by kNN and
    # watched by the live monitor, on 2 tasks (the frozen teacher sharded)
    _, reference_info, _ = uninterrupted
    teacher = tmp_path / "teacher.safetensors"
    subprocess.run([sys.executable, "-m", "dinoreg", "export", reference_info["output_dir"], "--format", "safetensors",
                    "--with-heads", "--output", str(teacher)], check=True, capture_output=True, timeout=120)
    recipe = [*TINY, "optim.epochs=1", "train.epoch_length=6", "train.batch_size_per_gpu=8", "train.num_workers=0",
              "evaluation.knn_train_images=64", "evaluation.knn_eval_images=32", "evaluation.eval_period_iterations=3",
              "monitor.period=3", "student.depth=1", "distillation.enabled=true", f"distillation.teacher={teacher}"]
    result, info = dinoreg_submit(slurm_env, tmp_path, "--wait", *recipe)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = metric_rows(info["output_dir"])
    assert sorted(rows) == list(range(6))
    assert all("knn_top1" in rows[it] and any(k.startswith("monitor/") for k in rows[it]) for it in (0, 2, 5))
    meta = json.loads((Path(info["output_dir"]) / "checkpoints" / "6" / "meta.json").read_text())
    assert meta["world_size"] == 2 and any(k.startswith("distillation_teacher.") for k in meta["model_keys"])
