#!/usr/bin/env bash
# Distillation from a DINOv3-family (RoPE, patch 16) teacher into a smaller patch-14 student with registers, against
# the same student trained from scratch for the same iterations, on the CPU and the embedded synthetic dataset.
#
#   launch/measure_distill_dinov3.sh [OUT]      (default OUT: runs/distill_dinov3)
#   EPOCHS=2 launch/measure_distill_dinov3.sh OUT    (100 iterations a run instead of 300)
#
# Sized for a CPU shared by several people (2 cores): batch 16, 2 local crops, 300 iterations a run (EPOCHS=6
# "epochs" of 50, the first one warm-up), kNN with a 1000-image memory bank and 500 queries.
# 1. the teacher: tiny_rope_cpu (RoPE, 4 storage tokens, width 192) at 4 blocks and patch 16, crops 64/32 px (4x4
#    and 2x2 patches);
# 2. the student: tiny_cpu's DINOv2-family ViT (learned positions, 4 registers, width 192) at 2 blocks and patch 14,
#    crops 56/28 px (the same 4x4 and 2x2 grids), distilled from the teacher (which sees each global crop resized to
#    64 px, bicubic, antialiased) ...
# 3. ... and from scratch, with the same recipe and seed (run beside the teacher, which it does not need).
# Every run evaluates its (EMA) teacher by kNN on the synthetic split at iteration 0 and every 50 iterations.
# Each run resumes where it stopped when run again; a finished one is only re-read. The table at the end comes from
# the runs' metrics.jsonl.
set -euo pipefail
OUT=${1:-runs/distill_dinov3}
mkdir -p "$OUT"
PY=${PYTHON:-python}
# one thread a process: two runs side by side on a shared CPU, no OpenMP threads spinning against each other
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(monitor.period=0 train.num_workers=2 train.batch_size_per_gpu=16 crops.local_crops_number=2
        train.epoch_length=50 optim.epochs=${EPOCHS:-6} teacher.warmup_teacher_temp_epochs=1 evaluation.knn_train_images=1000
        evaluation.knn_eval_images=500 evaluation.eval_period_iterations=50 checkpoint.period=50)
STUDENT=(student.patch_size=14 student.depth=2 crops.global_crops_size=56 crops.local_crops_size=28)

"$PY" -m dinoreg train --config tiny_cpu --output-dir "$OUT/scratch" "${COMMON[@]}" "${STUDENT[@]}" \
  > "$OUT/scratch.log" 2>&1 &
scratch=$!
"$PY" -m dinoreg train --config tiny_rope_cpu --output-dir "$OUT/teacher" "${COMMON[@]}" \
  student.depth=4 student.patch_size=16 crops.global_crops_size=64 crops.local_crops_size=32 > "$OUT/teacher.log" 2>&1
"$PY" -m dinoreg train --config tiny_cpu --output-dir "$OUT/distilled" "${COMMON[@]}" "${STUDENT[@]}" \
  distillation.enabled=true distillation.teacher="$OUT/teacher" > "$OUT/distilled.log" 2>&1
wait "$scratch"

"${PYTHON:-python}" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def knn(run):
    rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    return {row["iteration"]: row["knn_top1"] for row in rows if "knn_top1" in row}
teacher, distilled, scratch = knn("teacher"), knn("distilled"), knn("scratch")
print(f"teacher (tiny_rope_cpu, patch 16): kNN top-1 {teacher}")
print("| iteration | distilled from the RoPE/16 teacher | from scratch |")
print("|---:|---:|---:|")
for it in sorted(set(distilled) | set(scratch)):
    print(f"| {it} | {distilled.get(it, float('nan')):.4f} | {scratch.get(it, float('nan')):.4f} |")
EOF
