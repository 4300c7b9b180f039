#!/usr/bin/env bash
# Run a dinoreg command on every GPU of this machine, without SLURM: torchrun with one process per GPU.
#
#   launch/torchrun.sh train --config vitl14_reg4 --output-dir runs/vitl train.dataset_path=/data/imagenet/train
#   NPROC=4 launch/torchrun.sh train --config vitb14_reg4 --output-dir runs/vitb     # 4 of the GPUs
#   NPROC=2 launch/torchrun.sh train --output-dir runs/tiny                           # CPU: 2 processes (gloo)
#
# NPROC      processes (default: the number of GPUs nvidia-smi lists; 1 without GPUs)
# OMP_NUM_THREADS  threads per process (default: CPU cores / NPROC, at least 1)
#
# torchrun reports a worker's exit code 75 (stopped by a signal after saving a checkpoint) as 1. Run the
# same command again to resume from the newest checkpoint in the output directory. Stop a run cleanly with
#   pkill -USR1 -f -- "-u -m dinoreg"     (the workers; torchrun itself would die of SIGUSR1)
set -euo pipefail

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "${NPROC}" -ge 1 ]] || NPROC=1
fi
[[ "${NPROC}" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun.sh: NPROC must be a positive integer, got '${NPROC}'" >&2; exit 2; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"

PYTHON="${PYTHON:-python}"
# Keep the current folder off sys.path, in torchrun and in every worker it starts (Python >= 3.11): a folder
# named dinoreg/ here, such as a clone of this repository, would otherwise shadow the installed package.
export PYTHONSAFEPATH=1
# --standalone: a local rendezvous on a free port, so several runs can share the machine.
exec "${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node="${NPROC}" -m dinoreg "$@"
