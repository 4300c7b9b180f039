#!/usr/bin/env bash
# Four short runs of one checkout's dinoreg, reduced to what must not change in a behaviour-preserving refactor:
# metrics.jsonl without its timings, and the SHA-256 of teacher_backbone.safetensors.
#
#   tests/bitwise_runs.sh REPO OUT      # e.g. a `git worktree add` of the commit before, then of the one after
#   for r in default gram distill warmup; do cmp A/$r.metrics.json B/$r.metrics.json; cmp A/$r.teacher.sha B/$r.teacher.sha; done
#
# The runs (30 iterations each; checkpoints every 10, kNN every 15, the monitor every 10): the default recipe
# shrunk, Gram anchoring, distillation from the first run, and a head warm-up from its backbone. Equal on one
# machine only (CPU kernels round differently elsewhere). About a minute on 2 idle cores.
set -eu
REPO=$(cd "$1" && pwd); OUT=$2
rm -rf "${OUT}"; mkdir -p "${OUT}"; OUT=$(cd "${OUT}" && pwd)
export PYTHONPATH="${REPO}" OMP_NUM_THREADS=1
cd "${REPO}"
train() { python -m dinoreg train --no-resume --output-dir "${OUT}/$1" "${@:2}" > "${OUT}/$1.log" 2>&1; }
SMALL=(student.depth=2 crops.local_crops_number=2 train.batch_size_per_gpu=8 train.num_workers=0
       dino.head_n_prototypes=256 ibot.head_n_prototypes=256 evaluation.knn_train_images=200
       evaluation.knn_eval_images=100 monitor.period=10 optim.epochs=3 train.epoch_length=10 checkpoint.period=10
       evaluation.eval_period_iterations=15)
train default "${SMALL[@]}"
train gram "${SMALL[@]}" gram.use_loss=true gram.it_load_ema_teacher=3 gram.update_frequency=5 gram.it_first_update=5 \
  gram.max_updates=null
train distill "${SMALL[@]}" distillation.enabled=true "distillation.teacher=${OUT}/default"
train warmup "${SMALL[@]}" optim.head_warmup_iterations=10 "student.pretrained_weights=${OUT}/default/teacher_backbone.safetensors"
for run in default gram distill warmup; do
  python - "${OUT}/${run}" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
timings = {"images_per_sec", "data_wait"}
rows = [{k: v for k, v in row.items() if k not in timings and "seconds" not in k} for row in rows]
(run.parent / f"{run.name}.metrics.json").write_text(json.dumps(rows, indent=0, sort_keys=True))
PY
  sha256sum "${OUT}/${run}/teacher_backbone.safetensors" | cut -d' ' -f1 > "${OUT}/${run}.teacher.sha"
done
echo "wrote ${OUT}/{default,gram,distill,warmup}.{metrics.json,teacher.sha}"
