#!/usr/bin/env bash
# Continued pretraining from a trained tiny RoPE backbone (configs/tiny_rope_cpu.yaml): what the head warm-up and
# training only the last blocks (with an lr ramp) buy, read off the teacher's kNN top-1 (the run's own evaluation).
#
#   launch/measure_continue.sh [OUT [STEP]]   # OUT: where the runs go (default runs/continue)
#                                             # STEP: base, plain, warmup, last2, last2_cold, plot (default: all)
#
# base: tiny_rope_cpu as it is (600 iterations from scratch); its teacher_backbone.safetensors is the start of the
# four variants, each tiny_rope_cpu again from that backbone with fresh heads (student.pretrained_weights), the
# teacher's kNN every 50 iterations (0, 50, ..., 600; the recipe's 10,000-image memory bank, k 20):
#   plain       nothing else
#   warmup      optim.head_warmup_iterations=50
#   last2       the warm-up, then only the last 2 of the 6 blocks (and the final norm) train, their lr ramped up
#               over 50 iterations (optim.train_last_blocks=2 optim.unfreeze_ramp_iterations=50)
#   last2_cold  the last 2 blocks from the first iteration, no warm-up, no ramp
# Finished steps are skipped (a stopped run resumes). The variants may run side by side once base has finished:
#   for v in plain warmup last2 last2_cold; do launch/measure_continue.sh OUT $v & done; wait
#   launch/measure_continue.sh OUT plot
# EXTRA="key=value ..." is added to every run (e.g. a smoke test of this script with a shorter recipe).
set -euo pipefail
OUT=${1:-runs/continue}
STEP=${2:-all}
read -r -a EXTRA <<< "${EXTRA:-}"
BASE=$OUT/base/teacher_backbone.safetensors

run() {  # run NAME OVERRIDES...: one run of tiny_rope_cpu, unless it finished
    local name=$1; shift
    [[ -f $OUT/$name/teacher_backbone.safetensors ]] && return 0
    dinoreg train --config tiny_rope_cpu --output-dir "$OUT/$name" "$@" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
}

mkdir -p "$OUT"
CONTINUE=(student.pretrained_weights="$BASE" evaluation.eval_period_iterations=50)
case $STEP in all|base) run base ;; esac
case $STEP in all|plain) run plain "${CONTINUE[@]}" ;; esac
case $STEP in all|warmup) run warmup "${CONTINUE[@]}" optim.head_warmup_iterations=50 ;; esac
case $STEP in all|last2) run last2 "${CONTINUE[@]}" optim.head_warmup_iterations=50 optim.train_last_blocks=2 \
                                  optim.unfreeze_ramp_iterations=50 ;; esac
case $STEP in all|last2_cold) run last2_cold "${CONTINUE[@]}" optim.train_last_blocks=2 ;; esac
case $STEP in all|plot)
    python launch/plot_curves.py "$OUT/plain=fresh heads" "$OUT/warmup=head warm-up 50" \
        "$OUT/last2=warm-up 50, last 2 of 6 blocks, ramp 50" "$OUT/last2_cold=last 2 of 6 blocks" \
        --out "$OUT/continue_knn.png" --keys knn_top1 ;;
esac
