"""Save on signal with DataLoader workers, as SLURM delivers signals: to every process of the run, again and again.

SLURM signals the whole job step, loader workers included. The workers used to die on the signal (under `dinoreg train`
the default action of SIGUSR1/2 kills, and torch's own handler kills on a SIGTERM not sent by the main process; under
`dinoreg submit` they ran submitit's requeue handler on SIGUSR2), and the main
process then stopped with `DataLoader worker ... exited unexpectedly`; a signal that came again during the save
interrupted it the same way, and the message blamed free space. Now the workers ignore the job's signals, the main
process records the first signal only, finishes its save and exits 75.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from launch_helpers import TINY, subprocess_env, wait_for_training_rows

from dinoreg.run_dir import IN_PROGRESS_PREFIX


@pytest.mark.parametrize("name", ["SIGUSR2", "SIGTERM"])  # preemption / time limit; SLURM's cancel or requeue
def test_signals_again_and_again_to_every_process_still_save_once_and_exit_75(name, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "dinoreg", "train", "--output-dir", str(run), *TINY, "train.batch_size_per_gpu=8",
         "train.num_workers=2", "optim.epochs=50", "train.epoch_length=10", "evaluation.knn_enabled=false",
         "checkpoint.period=0"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: the run and its workers, as a SLURM job step
    try:
        wait_for_training_rows(run, 3, timeout=240, process=process)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:  # before, during and after the save
            os.killpg(process.pid, getattr(signal, name))
            time.sleep(0.01)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 75, output[-3000:]
    assert "DataLoader worker" not in output and "could not save" not in output, output[-3000:]
    saved = [line for line in output.splitlines() if line.startswith(f"{name}: saved ")]
    assert len(saved) == 1, output[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert saved[0].startswith(f"{name}: saved {run}/checkpoints/{latest}; exiting with code 75")
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    assert meta["iteration"] == int(latest) >= 3
    assert not list((run / "checkpoints").glob(f"{IN_PROGRESS_PREFIX}*"))  # no partial save left
