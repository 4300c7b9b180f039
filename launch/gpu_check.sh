#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine that has nothing installed from the network:
#
#   launch/gpu_check.sh --download-wheels   # here, with network: the wheels the GPU image lacks, into .whl/
#   launch/gpu_check.sh                     # there: install them, GPU tests, a vitl14_reg4 run, benchmarks
#   launch/gpu_check.sh --cpu-rehearsal     # anywhere: the same steps with tiny configs on the CPU
#
# Steps: (1) install the carried wheels of .whl/ (omegaconf, fvcore and its small dependencies, submitit,
# kornia and kornia_rs for Python 3.12) into a private folder and put it and this checkout on PYTHONPATH;
# (2) the tests marked gpu; (3) a short bf16 training run of vitl14_reg4 whose losses must be finite; (4)
# `dinoreg bench train --compare` of vitl14_reg4 (2x224 + 8x98 crops) at the largest per-GPU batch of
# 64/48/32 that fits, and of vitg14_reg4 at the largest of 48/32/24/16; `dinoreg bench heads` of vitl14_reg4 at
# batch 32 (the prototype heads' and losses' peak memory); `dinoreg bench memory`'s plan of vitl14_reg4 against
# the measured peak at two batches. Everything goes to $OUT (default
# ./gpu_check_out): gpu_check.json (all figures) and gpu_check.log (every command's output).
#
# OUT           output folder (default ./gpu_check_out)
# PYTHON        the interpreter (default python3)
# RUN_ITERATIONS, BENCH_ITERATIONS, BENCH_WARMUP   sizes of the run and the benchmarks (default 30, 10, 5)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$(pwd)/gpu_check_out}"
WHEELS=.whl
SITE=/tmp/dinoreg-site
# what the GPU image lacks (its Python 3.12 has torch, numpy, PyYAML, Pillow, tqdm, tensorboard): pure-Python
# wheels built or fetched here, and kornia_rs compiled for CPython 3.12 on x86-64
PURE=(omegaconf==2.4.0 fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 portalocker==4.4.2 tabulate==0.10.0
      termcolor==3.3.0 submitit==1.5.4 cloudpickle==2.1.0 kornia==0.9.0)
COMPILED=(kornia_rs==0.2.0)

case "${1:-}" in
  -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --download-wheels)
    mkdir -p "${WHEELS}"
    "${PYTHON}" -m pip wheel -q --no-deps -w "${WHEELS}" "${PURE[@]}"   # fvcore and yacs come as sources only
    "${PYTHON}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "${WHEELS}" "${COMPILED[@]}"
    ls -1 "${WHEELS}"; du -sh "${WHEELS}"; exit 0 ;;
  --cpu-rehearsal) REHEARSAL=1 ;;
  "") REHEARSAL=0 ;;
  *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

mkdir -p "${OUT}"
LOG="${OUT}/gpu_check.log"
: >"${LOG}"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "${LOG}"; }
run() { say "+ $*"; "$@" >>"${LOG}" 2>&1; }

# (1) the carried wheels, and this checkout, without touching the image's packages
if compgen -G "${WHEELS}/*.whl" >/dev/null; then
  # for the GPU image's CPython 3.12 on x86-64, whatever Python rehearses it
  run "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE}" \
    --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any "${WHEELS}"/*.whl
  # the rehearsal's Python may not be 3.12: it checks the install, then keeps its own packages
  [[ "${REHEARSAL}" == 1 ]] || export PYTHONPATH="${SITE}${PYTHONPATH:+:${PYTHONPATH}}"
else
  say "no wheels in ${WHEELS}/: using the packages installed here"
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:${PYTHONPATH}}"
run "${PYTHON}" -c "import dinoreg, omegaconf, fvcore, submitit, kornia, torch; print('dinoreg', dinoreg.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [[ "${REHEARSAL}" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""   # the CPU, whatever this machine has
  LARGE=(tiny_cpu "student.depth=2" "dino.head_n_prototypes=512" "ibot.head_n_prototypes=512" "train.num_workers=0")
  GIANT=(tiny_cpu "student.ffn_layer=swiglufused" "student.depth=2" "dino.head_n_prototypes=512" "train.num_workers=0")
  LARGE_BATCHES=(8 4); GIANT_BATCHES=(8 4)
  RUN_ITERATIONS="${RUN_ITERATIONS:-3}"; BENCH_ITERATIONS="${BENCH_ITERATIONS:-2}"; BENCH_WARMUP="${BENCH_WARMUP:-1}"
else
  LARGE=(vitl14_reg4); GIANT=(vitg14_reg4)
  LARGE_BATCHES=(64 48 32); GIANT_BATCHES=(48 32 24 16)
  RUN_ITERATIONS="${RUN_ITERATIONS:-30}"; BENCH_ITERATIONS="${BENCH_ITERATIONS:-10}"; BENCH_WARMUP="${BENCH_WARMUP:-5}"
fi

# (2) the GPU tests (skipped on the CPU, where the rehearsal still collects them)
run "${PYTHON}" -m pytest -q -p no:cacheprovider -m gpu tests/gpu || { say "GPU tests failed (see ${LOG})"; exit 1; }

# (3) a short training run: every loss finite (the loop stops on a non-finite one); kNN and monitor off
RUN_DIR="${OUT}/run"
run "${PYTHON}" -m dinoreg train --output-dir "${RUN_DIR}" --no-resume --force --config "${LARGE[0]}" "${LARGE[@]:1}" \
  "train.batch_size_per_gpu=${LARGE_BATCHES[-1]}" optim.epochs=1 "train.epoch_length=${RUN_ITERATIONS}" \
  evaluation.knn_enabled=false monitor.period=0 checkpoint.period=0 optim.warmup_epochs=0 train.log_every=1 \
  || { say "the training run failed (see ${LOG})"; exit 1; }

# (4) benchmarks at the largest batch that fits: a batch that runs out of memory is retried smaller
bench() {  # bench NAME "BATCHES" CONFIG OVERRIDES...
  local name="$1" batches="$2"; shift 2
  local config="$1"; shift
  for batch in ${batches}; do
    local attempt="${OUT}/bench_${name}_${batch}.log"
    say "+ dinoreg bench train --config ${config} $* train.batch_size_per_gpu=${batch} --compare"
    if "${PYTHON}" -m dinoreg bench train --config "${config}" "$@" "train.batch_size_per_gpu=${batch}" \
         --iterations "${BENCH_ITERATIONS}" --warmup "${BENCH_WARMUP}" --compare --json "${OUT}/bench_${name}.json" \
         >"${attempt}" 2>&1; then
      cat "${attempt}" >>"${LOG}"; say "${name}: batch ${batch} fits"; return 0
    fi
    cat "${attempt}" >>"${LOG}"
    if grep -qi "out of memory" "${attempt}"; then say "${name}: batch ${batch} ran out of memory"; continue; fi
    say "${name}: failed for another reason than memory (see ${attempt})"; return 1
  done
  say "${name}: no batch of ${batches} fits"; return 1
}
bench large "${LARGE_BATCHES[*]}" "${LARGE[@]}"
bench giant "${GIANT_BATCHES[*]}" "${GIANT[@]}"
# the prototype heads and losses alone (peak memory), at the smallest large batch
run "${PYTHON}" -m dinoreg bench heads --config "${LARGE[0]}" "${LARGE[@]:1}" "train.batch_size_per_gpu=${LARGE_BATCHES[-1]}" \
  --json "${OUT}/bench_heads.json" || { say "bench heads failed (see ${LOG})"; exit 1; }
# (5) the memory planner against measured peaks: vitl14_reg4 at the batch the benchmark ran and at half of it
FIT_BATCH="$("${PYTHON}" -c "import json, sys; print(json.load(open(sys.argv[1]))['batch_size'])" "${OUT}/bench_large.json")"
HALF_BATCH=$(( FIT_BATCH / 2 > 2 ? FIT_BATCH / 2 : 2 ))
run "${PYTHON}" -m dinoreg bench train --config "${LARGE[0]}" "${LARGE[@]:1}" "train.batch_size_per_gpu=${HALF_BATCH}" \
  --iterations 3 --warmup 2 --json "${OUT}/bench_large_half.json" || { say "bench train at batch ${HALF_BATCH} failed"; exit 1; }
for batch in "${FIT_BATCH}" "${HALF_BATCH}"; do
  run "${PYTHON}" -m dinoreg bench memory --config "${LARGE[0]}" "${LARGE[@]:1}" --gpus 1 --batch "${batch}" \
    --reserve-gib 0 --json "${OUT}/plan_large_${batch}.json" || { say "bench memory failed (see ${LOG})"; exit 1; }
done

# one JSON of everything
"${PYTHON}" - "${OUT}" "${RUN_DIR}" "${REHEARSAL}" <<'PY' | tee -a "${LOG}"
import datetime, json, math, pathlib, sys

import torch

out, run_dir, rehearsal = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
losses = [row["total_loss"] for row in rows if "total_loss" in row]
kl = [row["dino_local_crops_loss"] + row["dino_global_crops_loss"] - row["teacher_entropy"] + row["ibot_loss"]
      for row in rows if "total_loss" in row]
fifth = max(len(kl) // 5, 1)
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "rehearsal_on_cpu": rehearsal,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "run": {"iterations": len(losses), "finite": all(map(math.isfinite, losses)), "total_loss": losses,
            "dino_kl_plus_ibot_first_fifth": sum(kl[:fifth]) / fifth, "dino_kl_plus_ibot_last_fifth": sum(kl[-fifth:]) / fifth},
    "bench": {name: json.loads((out / f"bench_{name}.json").read_text()) for name in ("large", "giant")},
    "heads": json.loads((out / "bench_heads.json").read_text()),
    "planner": [],
}
for measured_file in ("bench_large.json", "bench_large_half.json"):
    measured = json.loads((out / measured_file).read_text())
    plan = json.loads((out / f"plan_large_{measured['batch_size']}.json").read_text())
    result["planner"].append({"batch_size": measured["batch_size"], "planned_bytes": plan["total_bytes"],
                              "measured_bytes": measured["peak_memory_bytes"], "measured_kind": measured["peak_memory_kind"],
                              "planned_over_measured": plan["total_bytes"] / measured["peak_memory_bytes"]})
result["run"]["falls"] = result["run"]["dino_kl_plus_ibot_last_fifth"] < result["run"]["dino_kl_plus_ibot_first_fifth"]
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
for name, bench in result["bench"].items():
    print(f"{name}: batch {bench['batch_size']}, {bench['images_per_sec']:.1f} img/s, MFU {100 * bench['mfu_of_matmul_peak']:.1f}% "
          f"of measured matmul peak, peak memory {bench['peak_memory_bytes'] / 2**30:.1f} GiB, "
          f"{bench['speedup_over_naive']:.2f}x the naive way")
for row in result["planner"]:
    print(f"planner: batch {row['batch_size']}, planned {row['planned_bytes'] / 2**30:.2f} GiB, measured "
          f"{row['measured_bytes'] / 2**30:.2f} GiB ({row['measured_kind']}): {row['planned_over_measured']:.2f}x")
heads = result["heads"]
print(f"heads: batch {heads['batch_size']}, peak memory {heads['peak_memory_bytes'] / 2**30:.2f} GiB "
      f"({heads['peak_in_fp32_logits']:.2f}x the fp32 logits of {heads['cls_rows']} + {heads['masked_patch_rows']} rows)")
print(f"run: {len(losses)} iterations, finite {result['run']['finite']}, KL + iBOT falls {result['run']['falls']}")
PY
say "done: ${OUT}/gpu_check.json"
