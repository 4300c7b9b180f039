"""Run by tests/test_memory.py in a fresh process: the resident-set high-water mark of 3 training iterations
(num_workers 0, kNN and monitor off) above the resident set before them, with glibc's mmap threshold fixed at
64 KiB and the heap trimmed first (as dinoreg bench heads measures).

usage: python measure_step_memory.py CONFIG OUTPUT_DIR [key=value ...]   -> prints {"measured_bytes": N}
"""
import json
import sys

from dinoreg.config import load_config
from dinoreg.train.loop import train


def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key): return int(line.split()[1]) * 1024
config, out, *overrides = sys.argv[1:]
cfg = load_config(config, [*overrides, "train.num_workers=0", "optim.epochs=1", "train.epoch_length=3", "optim.warmup_epochs=0",
    "evaluation.knn_enabled=false", "monitor.period=0", "checkpoint.period=0", f"train.output_dir={out}"])
import ctypes; libc = ctypes.CDLL(None); libc.mallopt(-3, 64*1024); libc.malloc_trim(0)
base = rss("VmRSS:"); open("/proc/self/clear_refs", "w").write("5")
train(cfg)
print(json.dumps({"measured_bytes": rss("VmHWM:") - base}))
