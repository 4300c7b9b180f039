#!/usr/bin/env bash
# Continued pretraining from a trained tiny RoPE backbone (configs/tiny_rope_cpu.yaml): what the head warm-up and
# training only the last blocks (with an lr ramp) buy, read off the teacher's kNN top-1 (the run's own evaluation).
#
#   launch/measure_continue.sh [OUT]          # OUT: where the runs go (default runs/continue)
#   launch/measure_continue.sh OUT base       # one step only: base, plain, warmup, last2 (the variants need base)
#
# The recipe is tiny_rope_cpu's, shortened for a 2-core machine shared by six people (a step of it took 12-30 s
# there): batch 16. The base: 150 iterations (epochs of 50) from scratch; its teacher after 50 iterations (checkpoint
# 50: the end of its lr warm-up; the run was stopped there for time) is the start. Each variant: 50 iterations
# (epochs of 25: lr warm-up 25, last layer frozen 25, teacher temperature warm-up 50) from that backbone with fresh
# heads; the teacher's kNN top-1 (1,000-image memory bank, 1,000 test images, k 20) every 25 iterations.
# Steps that finished are skipped; the three variants may run side by side:
#   for v in plain warmup last2; do launch/measure_continue.sh OUT $v & done; wait; launch/measure_continue.sh OUT plot
set -euo pipefail
OUT=${1:-runs/continue}
STEP=${2:-all}
COMMON=(train.batch_size_per_gpu=16 monitor.period=0)
BASE=$OUT/base50.safetensors

run() {  # run NAME OVERRIDES...: one run of tiny_rope_cpu, unless it finished
    local name=$1; shift
    [[ -f $OUT/$name/teacher_backbone.safetensors ]] && return 0
    dinoreg train --config tiny_rope_cpu --output-dir "$OUT/$name" "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1
}

mkdir -p "$OUT"
case $STEP in all|base)
    run base train.epoch_length=50 optim.epochs=3 evaluation.knn_train_images=2000 \
        evaluation.eval_period_iterations=150 checkpoint.period=50
    [[ -f $BASE ]] || dinoreg export "$OUT/base/checkpoints/50" --format safetensors --output "$BASE" ;;
esac
CONTINUE=(student.pretrained_weights="$BASE" train.epoch_length=25 optim.epochs=2 train.num_workers=1
          evaluation.knn_train_images=1000 evaluation.eval_period_iterations=25 checkpoint.period=25)
case $STEP in all|plain) run plain "${CONTINUE[@]}" ;; esac
case $STEP in all|warmup) run warmup "${CONTINUE[@]}" optim.head_warmup_iterations=25 ;; esac
case $STEP in all|last2) run last2 "${CONTINUE[@]}" optim.head_warmup_iterations=25 optim.train_last_blocks=2 \
                                  optim.unfreeze_ramp_iterations=25 ;; esac
case $STEP in all|plot)
    python launch/plot_curves.py --out "$OUT/continue_knn.png" --keys knn_top1 "$OUT/plain=plain (fresh heads)" \
        "$OUT/warmup=head warm-up 25" "$OUT/last2=warm-up 25 + last 2 of 6 blocks + ramp 25" ;;
esac
