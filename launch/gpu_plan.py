"""The GPU check's two helpers that are not the phase runner (``launch/gpu_check.py`` imports them):

- the plan, made here on the CPU before the call (``gpu_check.py plan``): the one-GPU memory plan of each model,
  the batch it gets on each card, the FLOPs of its step at that batch;
- phase 1's process on the device (``gpu_check.py device-facts``): device, driver, versions, memory, the measured
  bf16 matmul peak.
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import time
from typing import Any

GIB = 2**30
USABLE_SHARE = 0.9  # a planned batch keeps 10% of the card free: the planner's activations are a CPU prediction

# the cards a window may lend, by what torch reports: usable memory for the plan
CARDS = {"h100": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.0},
         "h200": {"name": "NVIDIA H200", "memory_gib": 139.0}}
# the models of the check: the real recipes, or tiny stand-ins for the CPU rehearsal that exercise the same paths
# (compile with inductor and bf16 autocast in the ViT-L phase, fused SwiGLU in the ViT-g phase, fused AdamW on the
# one-process FSDP2 path)
MODELS = {
    "vitl": {"config": "vitl14_reg4", "overrides": []},
    "vitg": {"config": "vitg14_reg4", "overrides": []},
}
TINY = ["student.depth=2", "dino.head_n_prototypes=512", "ibot.head_n_prototypes=512", "train.num_workers=0",
        "crops.local_crops_number=2", "train.batch_size_per_gpu=4"]
REHEARSAL_MODELS = {
    "vitl": {"config": "tiny_cpu", "overrides": [*TINY, "train.compile=blocks", "train.precision=bf16"]},
    "vitg": {"config": "tiny_cpu", "overrides": [*TINY, "student.ffn_layer=swiglufused"]},
}
REHEARSAL_CARD = {"cpu": {"name": "cpu", "memory_gib": 8.0}}
def planned_batch(plan: dict[str, Any], memory_gib: float, recipe_batch: int) -> int:
    """The recipe's per-GPU batch when its planned total fits ``USABLE_SHARE`` of the card, else the largest
    multiple of 4 (or, below 4, the largest batch) that does; 0 when not even 2 images (KoLeo's least) fit."""
    usable = USABLE_SHARE * memory_gib * GIB
    fitting = math.floor((usable - plan["fixed_bytes"]) / plan["bytes_per_batch_image"])
    if fitting >= recipe_batch:
        return recipe_batch
    return fitting // 4 * 4 if fitting >= 4 else fitting if fitting >= 2 else 0


def make_plan(models: dict[str, dict[str, Any]], cards: dict[str, dict[str, Any]], *, budget: dict[str, Any],
              bf16: bool = True) -> dict[str, Any]:
    """For each model, its one-GPU memory plan (once: fixed bytes and bytes per image do not depend on the card)
    and, per card, the planned batch, its planned bytes and the FLOPs of a step at that batch."""
    from dinoreg.tools.flops import count_step_flops  # noqa: PLC0415 (heavy imports)
    from dinoreg.config import load_config  # noqa: PLC0415
    from dinoreg.tools.planner import plan_memory  # noqa: PLC0415

    result: dict[str, Any] = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "budget": budget, "cards": {}, "models": models}
    plans = {}
    for name, model in models.items():
        started = time.perf_counter()
        plans[name] = plan_memory(model["config"], gpus=1, overrides=model["overrides"], bf16=bf16)
        print(f"planned {name} ({model['config']}) in {time.perf_counter() - started:.0f} s", flush=True)
    for card, facts in cards.items():
        entry: dict[str, Any] = {"memory_gib": facts["memory_gib"], "name": facts["name"]}
        for name, model in models.items():
            plan = plans[name]
            recipe_batch = load_config(model["config"], model["overrides"]).train.batch_size_per_gpu
            batch = planned_batch(plan, facts["memory_gib"], recipe_batch)
            flops = count_step_flops(model["config"], overrides=[*model["overrides"],
                                                                 f"train.batch_size_per_gpu={max(batch, 2)}"])
            entry[name] = {"batch": batch, "recipe_batch": recipe_batch,
                           "planned_bytes": plan["fixed_bytes"] + batch * plan["bytes_per_batch_image"],
                           "fixed_bytes": plan["fixed_bytes"], "bytes_per_batch_image": plan["bytes_per_batch_image"],
                           "flops": flops}
        result["cards"][card] = entry
    return result


def device_facts() -> dict[str, Any]:
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    facts: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import dinoreg  # noqa: PLC0415
        facts["dinoreg"] = dinoreg.__version__
    except ImportError as error:
        facts["dinoreg"] = f"not importable: {error}"
    if not torch.cuda.is_available():
        facts.update(name="cpu", cpu_count=os.cpu_count())
        return facts
    from dinoreg.tools.training import matmul_peak  # noqa: PLC0415

    properties = torch.cuda.get_device_properties(0)
    facts.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                 multiprocessors=properties.multi_processor_count, total_memory_bytes=properties.total_memory,
                 cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        facts["nvidia_smi"] = f"not run: {error}"
    facts["bf16_matmul_peak_flops_per_s"] = matmul_peak(torch.device("cuda", 0), torch.bfloat16)
    return facts


__all__ = ["CARDS", "GIB", "MODELS", "REHEARSAL_CARD", "REHEARSAL_MODELS", "TINY", "USABLE_SHARE", "device_facts",
           "make_plan", "planned_batch"]
