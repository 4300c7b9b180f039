"""A real single-node SLURM cluster for the tests that submit jobs (launch/slurm_cluster.sh, never a mock)."""

import os
import subprocess
from pathlib import Path

import pytest

from launch_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launch" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_env():
    """Start the cluster (installing SLURM with apt-get if needed) and return the environment that submits to
    it. Stopped at the end of the session, unless it was already running before."""
    was_running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    started = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"could not start the local SLURM cluster:\n{started.stderr}")
    conf = started.stdout.strip().splitlines()[-1].split("=", 1)[1]  # "export SLURM_CONF=<path>"
    assert Path(conf).is_file(), started.stdout
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # for the squeue/scontrol calls made inside the test process
    yield {**subprocess_env(), "SLURM_CONF": conf, "PYTHONUNBUFFERED": "1"}
    if previous is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120, env=os.environ)
