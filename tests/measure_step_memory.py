"""Run by tests/test_memory.py in a fresh process: the resident-set high-water mark of 3 training iterations
(num_workers 0, kNN and monitor off) above the resident set before them, measured as dinoreg bench heads
measures (glibc's mmap threshold fixed at 64 KiB, the heap trimmed first).

usage: python measure_step_memory.py CONFIG OUTPUT_DIR [key=value ...]   -> prints {"measured_bytes": N}
"""

import json
import sys

from dinoreg.config import load_config
from dinoreg.tools.memory import release_freed_memory, reset_resident_peak, resident_bytes
from dinoreg.train.loop import train

config, out, *overrides = sys.argv[1:]
cfg = load_config(config, [*overrides, "train.num_workers=0", "optim.epochs=1", "train.epoch_length=3",
                           "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "monitor.period=0",
                           "checkpoint.period=0", f"train.output_dir={out}"])
release_freed_memory()
before = resident_bytes()
reset_resident_peak()
train(cfg)
print(json.dumps({"measured_bytes": resident_bytes("VmHWM:") - before}))
