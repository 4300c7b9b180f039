"""Reading and releasing this process's memory, for the tools that measure it: the resident set and its
high-water mark (``/proc/self/status``), the peak of a run (resident set on the CPU, max allocated on CUDA), and
the releases that make a measurement start clean (glibc's freed heap, compiled graphs, CUDA's cached blocks).
Linux only on the CPU (procfs, glibc)."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

import torch


def resident_bytes(key: str = "VmRSS:") -> int:
    """This process's resident set (``VmRSS:``) or its high-water mark (``VmHWM:``), from /proc/self/status."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def release_freed_memory() -> None:
    """Make the resident set follow the live tensors (glibc): blocks of 64 KiB and more are mmapped and returned
    when freed (M_MMAP_THRESHOLD), and the heap's free pages are released now, so reusing them counts again."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 64 * 1024)
    libc.malloc_trim(0)


def reset_resident_peak() -> None:
    """Reset this process's resident-set high-water mark (``VmHWM:``) to its current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> tuple[str, int]:
    """The peak memory of this process so far, and its kind: CUDA's max allocated on ``device``, or the
    resident set's high-water mark (``ru_maxrss``) elsewhere."""
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device)
    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def release_device_memory() -> None:
    """Free what a finished measurement left behind before the next one: compiled graphs (which keep their
    modules' parameters alive), reference cycles, and CUDA's cached blocks."""
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
