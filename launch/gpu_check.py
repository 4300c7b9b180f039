#!/usr/bin/env python3
"""The GPU check's phase runner (its plan and phase 1's process are in ``launch/gpu_plan.py``); ``launch/gpu_check.sh`` is the entry point (see its ``--help``).

    python launch/gpu_check.py plan --out .gpu_plan.json            # here, on the CPU: batches, FLOPs, plans
    python launch/gpu_check.py run --plan .gpu_plan.json --out DIR  # there: the phases, within the budget
    python launch/gpu_check.py rehearse --out DIR                   # anywhere: tiny plan + run on the CPU

A GPU window is short (15 minutes of device time, a machine's start included; at most 600 s a command; a few small
files back), so everything that needs no GPU happens here, before the call: the one-GPU memory plans of the two
cards (``dinoreg bench memory``), the batch of each phase, the FLOPs of its step (``dinoreg bench flops``). The
device only reads that plan.

On the device the phases run in order of value, each in its own process group under its own time limit, none past
the deadline (the budget, less a margin, from the script's start): a phase that fails or runs out of time is
recorded and the next one runs. ``gpu_check.json`` in the output folder is rewritten after every phase, so whatever
happens later, what was measured comes back. Runs, logs and FLOP files stay under a work folder in /tmp; the output
folder receives only the JSON, the tail of each phase's log and the ViT-L step's top kernels (at most 8 files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gpu_plan import CARDS, GIB, MODELS, REHEARSAL_CARD, REHEARSAL_MODELS, device_facts, make_plan  # launch/, beside

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 450  # one command: 7.5 minutes, so that a second call still fits in a 15-minute window with the start
MARGIN_S = 25  # kept free at the end: the last JSON write, the transfer of $OUT
SETUP_S = 30  # the shell's part before the phases: the wheels' install, Python's start
MAX_OUT_FILES, MAX_OUT_BYTES = 8, 16 * 2**20  # what the device tool brings back
LOG_TAIL_LINES = 150

# targets of issue 25 (images/s of vitl14_reg4 per card; MFU against the nominal bf16 peak, H200 only)
TARGETS = {"h100": {"vitl_images_per_sec": 150}, "h200": {"vitl_images_per_sec": 200, "vitl_mfu_of_nominal": 0.45}}

NAIVE = ("train.compile=none", "student.attention_backend=math", "train.activation_checkpointing=none",
         "optim.adamw_implementation=for_loop", "train.pack_crops=false")  # as dinoreg.tools.training.NAIVE


@dataclass
class Phase:
    """One step of the check: ``limit_s`` is its own timeout; it is skipped when less than ``min_s`` is left
    before the deadline. ``optional`` phases (the fifth group) run only if time remains."""

    name: str
    limit_s: int
    min_s: int
    what: str
    optional: bool = False
    log: str = ""  # the file in $OUT that gets its log's tail (several optional phases share one)

    def __post_init__(self) -> None:
        self.log = self.log or f"{self.name}.log"


# In order of value. Phases 1-4 must fit the budget by their limits alone (checked by the rehearsal and the
# tests); the optional ones share what the earlier phases left.
PHASES = [
    Phase("device", 30, 10, "device, driver, torch/CUDA/cuDNN versions, memory, the measured bf16 matmul peak"),
    Phase("vitl", 160, 60, "ViT-L/14 reg4 fast path at the planned batch: 3 warm-up and 20 timed steps, img/s, "
                           "MFU, peak memory against the plan, losses; the top kernels of 2 more steps"),
    Phase("gpu_tests", 80, 20, "the tests marked gpu, 60 s each at most"),
    Phase("vitg", 125, 60, "ViT-g/14 reg4 at its planned batch: 3 warm-up and 20 timed steps"),
    Phase("vitl_fsdp", 120, 50, "the ViT-L step under FSDP2 in one process (DTensor, fused AdamW, bf16 policy)",
          optional=True, log="extras.log"),
    Phase("vitl_naive", 90, 40, "the ViT-L step the naive way (eager, math attention, single-tensor AdamW)",
          optional=True, log="extras.log"),
    Phase("heads", 45, 20, "the prototype heads and losses of ViT-L alone: peak memory", optional=True,
          log="extras.log"),
]
# the CPU rehearsal runs the same phases with tiny models; its limits are the CPU's, not the device's
REHEARSAL_LIMITS = {"device": 60, "vitl": 240, "gpu_tests": 120, "vitg": 120, "vitl_fsdp": 120, "vitl_naive": 90,
                    "heads": 60}
REHEARSAL_BUDGET_S = 900
TIMED, WARMUP, PROFILED = 20, 3, 2


def budget_check(phases: Sequence[Phase] = tuple(PHASES), budget_s: int = BUDGET_S) -> dict[str, Any]:
    """Whether the set-up, the required phases' limits and the margin add up to at most the budget."""
    required = sum(phase.limit_s for phase in phases if not phase.optional)
    total = SETUP_S + required + MARGIN_S
    return {"budget_s": budget_s, "setup_s": SETUP_S, "required_phases_s": required, "margin_s": MARGIN_S,
            "total_s": total, "fits": total <= budget_s,
            "left_for_optional_phases_s": budget_s - total}


# --------------------------------------------------------------------------------------------------
# the phases (there)


@dataclass
class Check:
    """The state of one check: where things go, the deadline, the summary written after every phase."""

    out: Path
    work: Path
    plan: dict[str, Any]
    deadline: float  # time.monotonic() after which no phase runs
    rehearsal: bool
    python: str = sys.executable
    limits: dict[str, int] = field(default_factory=dict)  # per phase, instead of its limit_s (the rehearsal's)
    summary: dict[str, Any] = field(default_factory=dict)

    def limit(self, phase: Phase) -> int:
        return self.limits.get(phase.name, phase.limit_s)

    def write_summary(self, after: str) -> None:
        self.summary.setdefault("written_after", []).append(after)
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, phase: Phase, command: Sequence[str], *, limit_s: Optional[float] = None) -> dict[str, Any]:
        """Run ``command`` as ``phase`` in its own process group, under min(its limit, the time left); returns and
        records its status (ok, failed, timed_out, skipped), seconds, exit code and log file."""
        limit = min(limit_s or self.limit(phase), self.left())
        work_log = self.work / f"{phase.name}.log"
        if limit < phase.min_s:
            record = {"status": "skipped", "why": f"{self.left():.0f} s left, it needs {phase.min_s} s"}
            self._record(phase, record, work_log)
            return record
        started = time.monotonic()
        with open(work_log, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                code: Optional[int] = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                code = None
                _stop_group(process)
        seconds = time.monotonic() - started
        status = "timed_out" if code is None else "ok" if code == 0 else "failed"
        record = {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit), "exit_code": code,
                  "out_of_memory": "out of memory" in work_log.read_text(errors="replace").lower()}
        self._record(phase, record, work_log)
        return record

    def _record(self, phase: Phase, record: dict[str, Any], work_log: Path) -> None:
        phases = self.summary.setdefault("phases", {})
        previous = phases.get(phase.name)
        phases[phase.name] = {"what": phase.what, **record} if previous is None else {
            **previous, **record, "attempts": previous.get("attempts", 1) + 1}
        self._tail(phase, work_log)
        print(f"[gpu_check {datetime.datetime.now():%H:%M:%S}] {phase.name}: {record['status']}"
              + (f" in {record['seconds']} s" if "seconds" in record else f" ({record.get('why', '')})"), flush=True)

    def _tail(self, phase: Phase, work_log: Path) -> None:
        """The last lines of every phase that writes to ``phase.log``, into $OUT."""
        sections = []
        for other in PHASES:
            log = self.work / f"{other.name}.log"
            if other.log == phase.log and log.exists():
                lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                sections.append(f"===== {other.name} (last {len(lines)} lines) =====\n" + "\n".join(lines))
        if sections:
            (self.out / phase.log).write_text("\n".join(sections)[-MAX_OUT_BYTES // 16:] + "\n")


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the phase's process group (loader workers included), SIGKILL 5 s later."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def choose_card(plan: dict[str, Any], device: dict[str, Any]) -> str:
    """The plan's card for this device: the only one in a rehearsal's plan, else the largest whose planned memory
    the device has (the smallest when it has less than all)."""
    cards = plan["cards"]
    if len(cards) == 1:
        return next(iter(cards))
    memory = device.get("total_memory_bytes", 0) / GIB
    by_memory = sorted(cards, key=lambda card: cards[card]["memory_gib"])
    fitting = [card for card in by_memory if cards[card]["memory_gib"] <= memory]
    return fitting[-1] if fitting else by_memory[0]


def bench_command(check: Check, model: str, card: str, *extra: str, flops: bool = True, profile: bool = False,
                  batch: Optional[int] = None, iterations: int = TIMED, warmup: int = WARMUP) -> list[str]:
    spec, planned = check.plan["models"][model], check.plan["cards"][card][model]
    command = [check.python, "-m", "dinoreg", "bench", "train", "--config", spec["config"], *spec["overrides"],
               f"train.batch_size_per_gpu={batch or planned['batch']}", "--iterations", str(iterations),
               "--warmup", str(warmup), *extra]
    if flops and batch is None:
        flops_file = check.work / f"{model}_flops.json"
        flops_file.write_text(json.dumps(planned["flops"]))
        command += ["--flops", str(flops_file)]
    if profile:
        command += ["--profile", str(check.out / f"{model}_kernels.txt")]
    return command


KEPT_FIGURES = ("batch_size", "images_per_sec", "iteration_time_median_s", "iteration_time_p90_s", "step_flops",
                "achieved_flops_per_s", "matmul_peak_flops_per_s", "mfu_of_matmul_peak", "nominal_peak_flops_per_s",
                "mfu_of_nominal_peak", "peak_memory_kind", "peak_memory_bytes", "data_wait_fraction",
                "losses_finite", "dino_kl_plus_ibot_first_fifth", "dino_kl_plus_ibot_last_fifth",
                "dino_kl_plus_ibot_falls", "compile", "attention_backend", "fsdp", "adamw_implementation", "dtype",
                "device", "torch", "iterations")


def bench_phase(check: Check, phase: Phase, model: str, card: str, *extra: str, profile: bool = False,
                iterations: int = TIMED, warmup: int = WARMUP) -> None:
    """A ``dinoreg bench train`` phase at the planned batch; once more at half of it when the first attempt ran out
    of memory and the phase has time left. Keeps the figures, and the peak memory against the plan."""
    planned = check.plan["cards"][card][model]
    result_file = check.work / f"{phase.name}.json"
    batch = planned["batch"]
    if batch < 2:
        check._record(phase, {"status": "skipped", "why": "the plan fits no batch on this card"},
                      check.work / f"{phase.name}.log")
        return
    started = time.monotonic()
    record = check.run(phase, [*bench_command(check, model, card, *extra, profile=profile, iterations=iterations,
                                              warmup=warmup), "--json", str(result_file)])
    left_in_phase = check.limit(phase) - (time.monotonic() - started)
    if record["status"] == "failed" and record["out_of_memory"] and batch >= 2 and left_in_phase >= phase.min_s:
        batch //= 2
        record = check.run(phase, [*bench_command(check, model, card, *extra, batch=batch, profile=profile,
                                                  iterations=iterations, warmup=warmup),
                                   "--json", str(result_file)], limit_s=left_in_phase)
    result = _read_json(result_file) if record["status"] == "ok" else None
    entry = check.summary["phases"][phase.name]
    if result:
        figures = {key: result.get(key) for key in KEPT_FIGURES}
        if result["batch_size"] == planned["batch"]:
            figures["planned_bytes"] = planned["planned_bytes"]
        else:
            figures["planned_bytes"] = planned["fixed_bytes"] + result["batch_size"] * planned["bytes_per_batch_image"]
        figures["planned_over_measured"] = (figures["planned_bytes"] / result["peak_memory_bytes"]
                                            if result["peak_memory_bytes"] else None)
        entry["figures"] = figures
    check.write_summary(phase.name)


def phase_device(check: Check) -> dict[str, Any]:
    phase = PHASES[0]
    facts_file = check.work / "device.json"
    check.run(phase, [check.python, str(Path(__file__).resolve()), "device-facts", "--json", str(facts_file)])
    facts = _read_json(facts_file) or {}
    check.summary["phases"]["device"]["figures"] = facts
    check.write_summary("device")
    return facts


def phase_tests(check: Check) -> None:
    phase = next(p for p in PHASES if p.name == "gpu_tests")
    report = check.work / "gpu_tests.xml"
    check.run(phase, [check.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests",
                      "--timeout", "60", "--junitxml", str(report)])
    entry = check.summary["phases"]["gpu_tests"]
    try:
        root = ElementTree.parse(report).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        cases = suite.findall("testcase") if suite is not None else []
        entry["figures"] = {
            key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
        entry["figures"]["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in cases
                                      if case.find("failure") is not None or case.find("error") is not None]
    except (OSError, ElementTree.ParseError):
        entry["figures"] = {"report": "none written"}
    check.write_summary("gpu_tests")


def phase_heads(check: Check, card: str) -> None:
    phase = next(p for p in PHASES if p.name == "heads")
    spec, planned = check.plan["models"]["vitl"], check.plan["cards"][card]["vitl"]
    result_file = check.work / "heads.json"
    record = check.run(phase, [check.python, "-m", "dinoreg", "bench", "heads", "--config", spec["config"],
                               *spec["overrides"], f"train.batch_size_per_gpu={max(planned['batch'], 2)}",
                               "--json", str(result_file)])
    result = _read_json(result_file) if record["status"] == "ok" else None
    if result:
        check.summary["phases"]["heads"]["figures"] = {
            key: result.get(key) for key in ("batch_size", "peak_memory_kind", "peak_memory_bytes", "fp32_logits_bytes",
                                             "peak_in_fp32_logits", "cls_rows", "masked_patch_rows")}
    check.write_summary("heads")


def targets(check: Check, card: str) -> dict[str, Any]:
    """The issue's targets for this card, met or missed (None: not measured)."""
    vitl = check.summary["phases"].get("vitl", {}).get("figures", {})
    goal = TARGETS.get(card, {})
    met: dict[str, Any] = {}
    if "vitl_images_per_sec" in goal:
        value = vitl.get("images_per_sec")
        met["vitl_images_per_sec"] = {"target": goal["vitl_images_per_sec"], "measured": value,
                                      "met": None if value is None else value >= goal["vitl_images_per_sec"]}
    if "vitl_mfu_of_nominal" in goal:
        value = vitl.get("mfu_of_nominal_peak")
        met["vitl_mfu_of_nominal"] = {"target": goal["vitl_mfu_of_nominal"], "measured": value,
                                      "met": None if value is None else value >= goal["vitl_mfu_of_nominal"]}
    return met


def out_files_check(out: Path) -> dict[str, Any]:
    """What the device tool would bring back: at most 8 files, none over 16 MiB, none more than one folder down."""
    files = [path for path in out.rglob("*") if path.is_file()]
    too_big = [str(path.relative_to(out)) for path in files if path.stat().st_size > MAX_OUT_BYTES]
    too_deep = [str(path.relative_to(out)) for path in files if len(path.relative_to(out).parts) > 2]
    return {"files": sorted(str(path.relative_to(out)) for path in files), "count": len(files),
            "too_big": too_big, "too_deep": too_deep,
            "fits": len(files) <= MAX_OUT_FILES and not too_big and not too_deep}


def run_check(check: Check) -> int:
    """The phases in order; returns 0 when every required phase passed."""
    check.summary.update({"date": _now(), "rehearsal_on_cpu": check.rehearsal, "plan_created": check.plan["created"],
                          "budget": check.plan["budget"], "deadline_in_s": round(check.left()), "phases": {}})
    check.write_summary("start")
    device = phase_device(check)
    card = choose_card(check.plan, device)
    check.summary["card"] = card
    bench_phase(check, PHASES[1], "vitl", card, profile=True)
    phase_tests(check)
    bench_phase(check, PHASES[3], "vitg", card)
    fsdp_extra = ["train.fsdp=always"] + (["optim.adamw_implementation=fused"] if check.rehearsal else [])
    bench_phase(check, PHASES[4], "vitl", card, *fsdp_extra, iterations=10)
    bench_phase(check, PHASES[5], "vitl", card, *NAIVE, iterations=5, warmup=2)
    phase_heads(check, card)
    check.summary["targets"] = targets(check, card)
    required = [phase.name for phase in PHASES if not phase.optional]
    check.summary["required_phases_ok"] = all(check.summary["phases"][name]["status"] == "ok" for name in required)
    check.summary["seconds_left_at_the_end"] = round(check.left())
    check.write_summary("end")
    check.summary["out_files"] = out_files_check(check.out)
    check.write_summary("out_files")
    print(format_summary(check.summary), flush=True)
    return 0 if check.summary["required_phases_ok"] else 1


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"gpu_check on {summary.get('card')}: required phases {'ok' if summary['required_phases_ok'] else 'NOT ok'},"
             f" {summary['seconds_left_at_the_end']} s left before the deadline"]
    for name, entry in summary["phases"].items():
        figures = entry.get("figures") or {}
        line = f"  {name:11s} {entry['status']:9s} {entry.get('seconds', '-')!s:>6} s"
        if "images_per_sec" in figures:
            mfu = figures.get("mfu_of_nominal_peak") or figures.get("mfu_of_matmul_peak")
            line += (f"  batch {figures['batch_size']}, {figures['images_per_sec']:.1f} img/s, MFU {100 * mfu:.1f}%, "
                     f"peak {figures['peak_memory_bytes'] / GIB:.1f} GiB (plan {figures['planned_bytes'] / GIB:.1f})")
        elif name == "gpu_tests" and "tests" in figures:
            line += f"  {figures['tests']} tests, {figures['failures'] + figures['errors']} failed, {figures['skipped']} skipped"
        lines.append(line)
    for name, target in summary.get("targets", {}).items():
        lines.append(f"  target {name}: {target['target']}, measured {target['measured']}, met {target['met']}")
    lines.append(f"  $OUT: {summary['out_files']['count']} files, fits the tool's limits {summary['out_files']['fits']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="here: the batches, memory plans and FLOPs of both cards")
    plan.add_argument("--out", type=Path, default=REPO / ".gpu_plan.json", help="the plan file (default: %(default)s)")
    run = commands.add_parser("run", help="there: the phases, reading the plan")
    run.add_argument("--plan", type=Path, default=REPO / ".gpu_plan.json", help="(default: %(default)s)")
    run.add_argument("--out", type=Path, required=True, help="the folder the device tool brings back ($OUT)")
    run.add_argument("--started", type=float, default=None,
                     help="the script's start (seconds since the epoch): the budget counts from it")
    rehearse = commands.add_parser("rehearse", help="anywhere: a tiny plan and the same phases on the CPU")
    rehearse.add_argument("--out", type=Path, required=True)
    rehearse.add_argument("--started", type=float, default=None)
    facts = commands.add_parser("device-facts", help="phase 1's process")
    facts.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "device-facts":
        args.json.write_text(json.dumps(device_facts(), indent=2) + "\n")
        return 0
    if args.command == "plan":
        result = make_plan(MODELS, CARDS, budget=budget_check())
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for card, entry in result["cards"].items():
            print(f"{card}: " + ", ".join(f"{name} batch {entry[name]['batch']} (planned "
                                          f"{entry[name]['planned_bytes'] / GIB:.1f} GiB of {entry['memory_gib']:.0f})"
                                          for name in MODELS))
        print(f"wrote {args.out}")
        return 0
    started = args.started or time.time()
    elapsed = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dinoreg-gpu-check-"))
    if args.command == "rehearse":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, whatever this machine has
        plan_data = make_plan(REHEARSAL_MODELS, REHEARSAL_CARD, budget=budget_check(), bf16=False)
        budget = REHEARSAL_BUDGET_S
    else:
        plan_data = _read_json(args.plan)
        if plan_data is None or "cards" not in plan_data:
            print(f"gpu_check: no plan at {args.plan}; make it here first: launch/gpu_check.sh --prepare",
                  file=sys.stderr)
            return 2
        budget = BUDGET_S
    deadline = time.monotonic() + budget - MARGIN_S - elapsed
    check = Check(out=args.out, work=work, plan=plan_data, deadline=deadline, rehearsal=args.command == "rehearse",
                  limits=REHEARSAL_LIMITS if args.command == "rehearse" else {})
    code = run_check(check)
    if check.rehearsal:
        device_budget = budget_check()
        problems = [] if device_budget["fits"] else [f"the device phases' limits add up to {device_budget['total_s']} s,"
                                                     f" over the budget of {BUDGET_S} s"]
        if not check.summary["out_files"]["fits"]:
            problems.append(f"$OUT does not fit the device tool's limits: {check.summary['out_files']}")
        for problem in problems:
            print(f"gpu_check rehearsal: {problem}", file=sys.stderr)
        code = code or (1 if problems else 0)
    print(f"work folder (runs, full logs): {work}")
    return code


if __name__ == "__main__":
    sys.exit(main())
