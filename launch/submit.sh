#!/usr/bin/env bash
# Submit dinoreg training (or any dinoreg command after --) to SLURM; `dinoreg submit --help` lists every
# option. The job saves, requeues itself and resumes when it is preempted or reaches its time limit.
#
#   launch/submit.sh --config vitl14_reg4 --nodes 4 --gpus-per-node 8 --partition gpu \
#       --output-dir /checkpoint/$USER/vitl/%j train.dataset_path=/datasets/imagenet/train
#   launch/submit.sh --dry-run --nodes 2 --config vitg14_reg4        # print the sbatch request only
#   launch/submit.sh --gpus-per-node 1 -- analyze flops --arch vit_giant
#
# PYTHON  the interpreter with dinoreg installed (default: python)
set -euo pipefail
# Keep the current folder off sys.path (Python >= 3.11): a folder named dinoreg/ here, such as a clone of
# this repository, would otherwise shadow the installed package.
export PYTHONSAFEPATH=1
exec "${PYTHON:-python}" -m dinoreg submit "$@"
