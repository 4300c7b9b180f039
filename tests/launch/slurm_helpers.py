"""What the SLURM job tests share: submitting with `dinoreg submit --json`, reading a job's logs and metrics."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import submitit
from launch_helpers import wait_for_training_rows

from dinoreg.launch import wait_for_job

TIMING_KEYS = {"images_per_sec", "data_wait", "monitor/seconds"}  # the only figures allowed to differ


def _submit_command(tmp_path, *args):
    return [sys.executable, "-m", "dinoreg", "submit", "--output-dir", str(tmp_path / "run" / "%j"),
            "--json", str(tmp_path / "job.json"), *args]


def submit_job(env, tmp_path, *args, timeout):
    """``dinoreg submit ARGS`` from ``tmp_path``, runs under ``tmp_path/run/%j``: (completed process, the
    job's --json record or None when nothing was submitted)."""
    result = subprocess.run(_submit_command(tmp_path, *args), env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=timeout)
    info = json.loads((tmp_path / "job.json").read_text()) if (tmp_path / "job.json").exists() else None
    return result, info


def submit_job_and_wait_aside(env, tmp_path, *args, timeout):
    """``dinoreg submit --wait ARGS`` as :func:`submit_job`, left waiting for the job: (the running process, the
    job's --json record, once submitted)."""
    process = subprocess.Popen(_submit_command(tmp_path, "--wait", *args), env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (tmp_path / "job.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("nothing submitted: " + "".join(process.communicate()))
        time.sleep(0.1)
    return process, json.loads((tmp_path / "job.json").read_text())


def job_handle(info, tasks=2):
    return submitit.SlurmJob(folder=info["log_dir"], job_id=info["job_id"], tasks=list(range(tasks)))


def metric_rows(output_dir):
    """iteration -> logged figures, the training row and the monitor's merged (the last value wins: a run
    resumed from a periodic checkpoint repeats some iterations)."""
    rows = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["iteration"], {}).update({k: v for k, v in row.items() if k not in TIMING_KEYS})
    return rows


def log(info, task=0, kind="err"):
    return Path(info["log_dir"], f"{info['job_id']}_{task}_log.{kind}").read_text()


def preempt(env, info, *, after_rows, timeout):
    """``scancel --signal=USR2`` to a 2-task job once it logged ``after_rows`` training rows, then wait for its results
    through the requeue: (results, the states seen, the run directory it saved in, the iteration it saved)."""
    wait_for_training_rows(info["output_dir"], after_rows, timeout=timeout)
    subprocess.run(["scancel", "--signal=USR2", info["job_id"]], env=env, check=True, timeout=60)
    states = []
    results = wait_for_job(job_handle(info), timeout_s=timeout, poll_s=0.5, on_state=states.append)
    stopped = re.search(r"stopped on SIGUSR2 after saving (\S+)/checkpoints/(\d+)", log(info))
    assert stopped, log(info)
    return results, states, stopped.group(1), int(stopped.group(2))
