"""A job across two "hosts": `dinoreg submit --nodes 2` on the two-node local cluster, whose slurmd each run in
their own network namespace with their own hostname and address (launch/slurm_cluster.sh start --nodes 2).

One task per node, gloo over the bridge between the namespaces; the rendezvous is the first host of the node
list. A job preempted with `scancel --signal=USR2` saves, requeues, resumes and logs bitwise the figures of the
uninterrupted two-node job.
"""

import re
import subprocess

import pytest
from launch_helpers import TINY
from slurm_helpers import job_handle, log, metric_rows, preempt, submit_job

RESOURCES = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout-min", "30"]
RECIPE = [*TINY, "optim.epochs=2", "train.epoch_length=30", "train.batch_size_per_gpu=8", "train.num_workers=0",
          "evaluation.knn_enabled=false"]
ITERATIONS = 60
JOB_TIMEOUT_S = 300


def submit(env, tmp_path, *args):
    """``args``: submit options, then overrides after the recipe's."""
    return submit_job(env, tmp_path, *RESOURCES, *RECIPE, *args, timeout=JOB_TIMEOUT_S)


def node_addresses(env):
    """node name -> NodeAddr, as the controller knows them."""
    shown = subprocess.run(["scontrol", "-o", "show", "nodes"], env=env, capture_output=True, text=True,
                           check=True, timeout=60).stdout
    return dict(re.findall(r"NodeName=(\S+) .*?NodeAddr=(\S+)", shown))


@pytest.fixture(scope="module")
def uninterrupted(two_node_slurm_env, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("two-nodes")
    result, info = submit(two_node_slurm_env, tmp_path, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    return result, info, metric_rows(info["output_dir"])


def test_the_nodes_are_separate_hosts_on_one_bridge(two_node_slurm_env):
    addresses = node_addresses(two_node_slurm_env)
    assert sorted(addresses) == ["node1", "node2"]
    assert addresses["node1"] != addresses["node2"]
    assert all(address.startswith("10.") and not address.startswith("127.") for address in addresses.values())
    # Each task sees its own hostname, and resolves the other node to the address the controller has for it.
    seen = subprocess.run(["srun", "--nodes", "2", "--ntasks-per-node", "1", "--label", "sh", "-c",
                           "echo $(hostname) $(getent hosts node1 | cut -d' ' -f1) $(getent hosts node2 | cut -d' ' -f1)"],
                          env=two_node_slurm_env, capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0, seen.stderr
    lines = sorted(line.split(": ", 1)[1].split() for line in seen.stdout.splitlines())
    assert lines == [[node, addresses["node1"], addresses["node2"]] for node in ("node1", "node2")]


def test_a_job_spans_both_nodes_and_meets_at_the_first(uninterrupted):
    result, info, rows = uninterrupted
    assert f"submitted job {info['job_id']}: 2 node(s) x 1 task(s)" in result.stdout
    assert sorted(rows) == list(range(ITERATIONS))
    for task, node in ((0, "node1"), (1, "node2")):
        placed = re.search(rf"task {task}/2 on (\S+) \(rendezvous (\S+):(\d+)\)", log(info, task=task))
        assert placed, log(info, task=task)
        assert placed.group(1) == node and placed.group(2) == "node1"  # the master is the node list's first host
    results = job_handle(info).results()
    assert [r["exit_code"] for r in results] == [0, 0] and results[0] == results[1]


def test_preempted_two_node_job_requeues_and_resumes_bitwise(uninterrupted, two_node_slurm_env, tmp_path):
    """With 2 loader workers per task, which SLURM signals too: only the main processes save, on both nodes."""
    _, _, reference = uninterrupted
    result, info = submit(two_node_slurm_env, tmp_path, "train.num_workers=2")
    assert result.returncode == 0, result.stderr
    results, states, run_dir, saved_at = preempt(two_node_slurm_env, info, after_rows=6, timeout=JOB_TIMEOUT_S)
    assert 6 <= saved_at < ITERATIONS
    assert "requeueing: requeue 1 of at most 10" in log(info)
    for task in (0, 1):  # both nodes came back, and no worker ran a handler or died
        assert "requeued 1 times so far" in log(info, task=task)
        assert "DataLoader worker" not in log(info, task=task) and "temporary saved file" not in log(info, task=task)
    assert f"resumed from {run_dir}/checkpoints/{saved_at}" in log(info, kind="out")
    assert "PENDING" in states[1:] or "REQUEUED" in states
    assert metric_rows(info["output_dir"]) == reference
    assert results[0]["final"]["total_loss"] == reference[ITERATIONS - 1]["total_loss"]
