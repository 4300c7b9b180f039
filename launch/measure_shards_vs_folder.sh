#!/usr/bin/env bash
# Issue 28's check that shards change nothing: index and pack a folder of JPEGs, train tiny_cpu for 30 iterations
# from the folder and from the shards, and compare the losses of every iteration and the teacher files.
#   python launch/make_jpegs.py --count 2500 --classes 10 --output /tmp/jpegs
#   launch/measure_shards_vs_folder.sh /tmp/jpegs /tmp/m28
# docs/BENCHMARKS.md "Data at scale" has the figures of 2026-12-06.
set -euo pipefail
images=${1:?usage: $0 IMAGE_FOLDER WORK_DIR}
work=${2:?usage: $0 IMAGE_FOLDER WORK_DIR}
mkdir -p "$work" && cd "$work"
rm -rf idx shards run_folder run_shards
uptime
/usr/bin/time -f "index: %e s wall, %M KiB max RSS" dinoreg data index "$images" --output idx --workers 2
/usr/bin/time -f "pack: %e s wall, %M KiB max RSS" dinoreg data pack "$images" --output shards --shard-size 64MiB --workers 8
du -sb shards
common=(optim.epochs=1 train.epoch_length=30 evaluation.knn_enabled=false monitor.period=0 checkpoint.period=1000
        train.log_every=1)
uptime
dinoreg train --output-dir run_folder "train.dataset_path=$images" "${common[@]}" > folder.log 2>&1
dinoreg train --output-dir run_shards "train.dataset_path=$work/shards" "${common[@]}" > shards.log 2>&1
python - <<'PY'
import json
def losses(run):
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    return {r["iteration"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in rows if "total_loss" in r}
folder, shards = losses("run_folder"), losses("run_shards")
print(f"{len(folder)} and {len(shards)} iterations; losses bitwise equal: {folder == shards}")
PY
cmp run_folder/teacher_backbone.safetensors run_shards/teacher_backbone.safetensors && echo "teacher files identical"
uptime
