"""Real SLURM clusters for the tests that submit jobs (launch/slurm_cluster.sh, never a mock): the single-node one,
and a two-node one whose slurmd each run in their own network namespace."""

import os
import subprocess
from pathlib import Path

import pytest

from launch_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launch" / "slurm_cluster.sh"
# The two-node cluster runs beside the single-node one: its own directory, ports and subnet, no accounting.
TWO_NODES = {"DINOREG_SLURM_DIR": "/tmp/dinoreg-slurm-2nodes", "DINOREG_SLURM_PORT": "6927",
             "DINOREG_SLURM_ACCOUNTING": "0"}


def _cluster(settings, *start_args):
    """Start the cluster (installing SLURM with apt-get if needed), yield the environment that submits to it,
    and stop it at the end unless it was already running before."""
    environ = {**os.environ, **settings}
    was_running = subprocess.run([CLUSTER, "status"], env=environ, capture_output=True).returncode == 0
    started = subprocess.run([CLUSTER, "start", *start_args], env=environ, capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:
        pytest.fail(f"could not start the local SLURM cluster ({' '.join(start_args)}):\n{started.stderr}")
    conf = started.stdout.strip().splitlines()[-1].split("=", 1)[1]  # "export SLURM_CONF=<path>"
    assert Path(conf).is_file(), started.stdout
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # for the squeue/scontrol calls made inside the test process
    yield {**subprocess_env(), **settings, "SLURM_CONF": conf, "PYTHONUNBUFFERED": "1"}
    if previous is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        subprocess.run([CLUSTER, "stop"], env=environ, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_env():
    yield from _cluster({})


@pytest.fixture(scope="module")
def two_node_slurm_env():
    yield from _cluster(TWO_NODES, "--nodes", "2")
