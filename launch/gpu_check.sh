#!/usr/bin/env bash
# The GPU check: one command of at most 7.5 minutes on an H100 or an H200, prepared here on the CPU.
#
#   launch/gpu_check.sh --prepare          # here, with network: wheels into .whl/, the plan into .gpu_plan.json
#   launch/gpu_check.sh                    # there: the phases below, reading the plan; results in $OUT
#   launch/gpu_check.sh --cpu-rehearsal    # anywhere: the same phases with tiny models on the CPU, and the checks
#                                          # that the device's time limits fit the budget and $OUT the tool's limits
#   (--download-wheels and --plan do one half of --prepare)
#
# Phases, in order of value, each under its own time limit and never past the deadline (450 s from this script's
# start, less a 25 s margin); a phase that fails or times out is recorded and the next one runs:
#   1 device    device, driver, torch/CUDA/cuDNN versions, memory, measured bf16 matmul peak        (30 s)
#   2 vitl      vitl14_reg4 fast path at the planned batch: 3 warm-up + 20 timed steps, img/s, MFU,
#               peak memory against the plan, losses finite and falling; top kernels of 2 more steps (160 s)
#   3 gpu_tests the tests marked gpu, 60 s each at most                                            (80 s)
#   4 vitg      vitg14_reg4 at its planned batch                                                   (125 s)
#   5 if time remains: vitl_fsdp (FSDP2 in one process), vitl_naive (eager, math attention), heads
# Set-up (the wheels' install, Python's start) has 30 s: 30 + 395 + 25 = 450 s.
#
# $OUT (default ./gpu_check_out) receives at most 8 small files: gpu_check.json (rewritten after every phase),
# the tail of each phase's log (device.log, vitl.log, gpu_tests.log, vitg.log, extras.log) and vitl_kernels.txt.
# Runs, full logs and checkpoints (none are written) stay under /tmp/dinoreg-gpu-check-*.
#
# OUT           output folder (default ./gpu_check_out)
# PYTHON        the interpreter (default python3)
# The device call (docs/BENCHMARKS.md): carry .whl and .gpu_plan.json, timeout_s 480.
set -uo pipefail

STARTED="$(date +%s)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$(pwd)/gpu_check_out}"
WHEELS=.whl
PLAN=.gpu_plan.json
SITE=/tmp/dinoreg-site
export PYTHONUNBUFFERED=1
# what the GPU image lacks (its Python 3.12 has torch, numpy, PyYAML, Pillow, tqdm, tensorboard, pytest and
# pytest-timeout): pure-Python wheels built or fetched here, and kornia_rs compiled for CPython 3.12 on x86-64
PURE=(omegaconf==2.4.0 fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 portalocker==4.4.2 tabulate==0.10.0
      termcolor==3.3.0 submitit==1.5.4 cloudpickle==2.1.0 kornia==0.9.0)
COMPILED=(kornia_rs==0.2.0)

download_wheels() {
  mkdir -p "${WHEELS}" || return 1
  "${PYTHON}" -m pip wheel -q --no-deps -w "${WHEELS}" "${PURE[@]}" || return 1  # fvcore and yacs: sources only
  "${PYTHON}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "${WHEELS}" "${COMPILED[@]}" || return 1
  ls -1 "${WHEELS}"; du -sh "${WHEELS}"
}

make_plan() {
  "${PYTHON}" launch/gpu_check.py plan --out "${PLAN}"
}

case "${1:-}" in
  -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --download-wheels) download_wheels; exit $? ;;
  --plan) make_plan; exit $? ;;
  --prepare) download_wheels && make_plan; exit $? ;;
  --cpu-rehearsal) REHEARSAL=1 ;;
  "") REHEARSAL=0 ;;
  *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

mkdir -p "${OUT}"
if [[ "${REHEARSAL}" == 0 && ! -f "${PLAN}" ]]; then
  echo "gpu_check.sh: no ${PLAN}: make it here first (launch/gpu_check.sh --prepare) and carry it" >&2; exit 2
fi
# the carried wheels, and this checkout, without touching the image's packages
if compgen -G "${WHEELS}/*.whl" >/dev/null; then
  # for the GPU image's CPython 3.12 on x86-64, whatever Python rehearses it
  timeout 60 "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE}" \
    --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any "${WHEELS}"/*.whl \
    || { echo "gpu_check.sh: pip did not install the wheels: unpacking them instead (none has a .data folder)"
         for wheel in "${WHEELS}"/*.whl; do "${PYTHON}" -m zipfile -e "${wheel}" "${SITE}"; done; }
  # a rehearsal by another Python than the image's CPython 3.12 on x86-64 checks the install, then keeps its own
  # packages; by that Python, it uses the carried wheels as the device will
  if [[ "${REHEARSAL}" == 0 ]] || "${PYTHON}" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 12)
      and platform.python_implementation() == "CPython" and platform.machine() == "x86_64"))'; then
    export PYTHONPATH="${SITE}${PYTHONPATH:+:${PYTHONPATH}}"
  fi
else
  echo "gpu_check.sh: no wheels in ${WHEELS}/: using the packages installed here"
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:${PYTHONPATH}}"

if [[ "${REHEARSAL}" == 1 ]]; then
  exec "${PYTHON}" launch/gpu_check.py rehearse --out "${OUT}" --started "${STARTED}"
fi
exec "${PYTHON}" launch/gpu_check.py run --plan "${PLAN}" --out "${OUT}" --started "${STARTED}"
