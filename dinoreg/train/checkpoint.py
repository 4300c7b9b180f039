"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, atomic, resumable anywhere.

Layout of ``RUN/checkpoints/``::

    <iteration>/            a published checkpoint (DCP files + meta.json + config.yaml + rng/rank<r>.pt)
    .tmp-<iteration>/       being written; never read; removed on the next start
    .old-*, .*.old-*, .*.tmp-*
                            what an interrupted deletion or replacement leaves (retention, a save over an older one
                            of its iteration, ``latest``); never read; removed on the next start
    damaged-<iteration>/    skipped as damaged when the run resumed from an older one; never read, kept for inspection
    latest                  the iteration of the newest published checkpoint (updated after publishing; set back to
                            the checkpoint resumed from when newer ones are moved aside as damaged)

A checkpoint directory exists under its final name only once every rank has finished writing it: it is
written under ``.tmp-<iteration>`` and renamed (an atomic ``rename`` on one filesystem). A crash, a
``kill -9`` or a second signal at any moment leaves either the previous checkpoints untouched or the new
one complete. DCP stores each parameter's shards with their global offsets, so a checkpoint saved by N
ranks loads on M ranks (or one process without FSDP).

What is saved: the model's whole state (student and teacher with the DINO/iBOT centres, and the training
features' frozen models: ``model.frozen_names``), optimizer state, and in ``meta.json`` the
iteration, the data stream position, the world size, the model's state keys, every file's size and CRC-32
(checked before a checkpoint is read: :func:`verify_checkpoint`), the parameters without optimizer state yet
and the time of the save; per rank the python, numpy, torch CPU and CUDA RNG states (restored at the same
world size only); the resolved config.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
import zlib
import warnings
from errno import EACCES, EDQUOT, EISDIR, ENOSPC, ENOTDIR, EPERM, EROFS
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from dinoreg import distributed
from dinoreg.config import DinoRegConfig, save_config
from dinoreg.config_schema import RETIRED_KEYS
from dinoreg.errors import InputError
from dinoreg.models.weights import CheckpointMismatchError
from dinoreg.run_dir import (CHECKPOINT_DIR, CONFIG_FILE, LATEST_FILE, META_FILE, RunDir, errno_of, fsync_directory,
                             is_temporary, replace_directory, rng_state_file, write_json, write_text)
from dinoreg.train.safe_load import UnreadableCheckpointError, load_rng_state, safe_dcp_load, save_rng_state

__all__ = ["CHECKPOINT_DIR", "CheckpointError", "CheckpointSaveError", "checkpoint_dirs",
           "config_differences", "load_checkpoint", "read_meta", "save_checkpoint", "verify_checkpoint"]

# Config keys whose change between save and resume alters neither the model nor the data order.
BENIGN_KEYS = ("train.output_dir", "train.log_every", "train.num_workers", "evaluation.", "checkpoint.", "monitor.",
               "optim.adamw_implementation", "train.compile", "train.activation_checkpointing",
               "train.pack_crops", "train.loss_chunk_elements", "train.fsdp",  # how, not what
               "phase.", "train.initialisation")  # read only when a run starts fresh: a resume takes everything
#                                                    from its checkpoint


DAMAGED_PREFIX = "damaged-"  # checkpoints/damaged-<iteration>/: skipped as damaged on resume, kept for inspection


class CheckpointError(InputError, RuntimeError):
    """A checkpoint cannot be resumed from (unreadable, or incompatible with the current run)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, permission); the partial one was removed and the
    checkpoints published before are intact."""


# --------------------------------------------------------------------------------------------------
# finding checkpoints


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Published checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def check_no_foreign_entries(run_dir: str | Path) -> None:
    """Refuse a ``checkpoints/<iteration>`` that is not a directory (a file someone put there): the save of that
    iteration could not publish over it, and the run could not finish."""
    root = Path(run_dir) / CHECKPOINT_DIR
    foreign = sorted(p for p in root.iterdir() if p.name.isdigit() and not p.is_dir()) if root.is_dir() else []
    if foreign:
        raise CheckpointError(f"{foreign[0]} is not a checkpoint directory but a file, where this run would save "
                              f"checkpoint {foreign[0].name}: move or delete it, then start again")


def set_aside_checkpoints_after(run_dir: str | Path, iteration: int) -> list[Path]:
    """Rename each published checkpoint newer than ``iteration`` to ``checkpoints/damaged-<its iteration>`` (with
    ``-1``, ``-2``, ... if that name is taken) and point ``latest`` at ``iteration``; returns the new paths (call on
    one rank, when resuming from ``iteration``: the newer ones were skipped as damaged). Retention keeps the newest
    published checkpoints, so a damaged one left in place would outlive the good ones written after it."""
    moved = []
    for path in checkpoint_dirs(run_dir):
        if int(path.name) > iteration:
            aside, suffix = path.with_name(f"{DAMAGED_PREFIX}{path.name}"), 1
            while aside.exists():
                aside, suffix = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{suffix}"), suffix + 1
            path.rename(aside)
            moved.append(aside)
    if moved:  # `latest` named one of them: it names the checkpoint resumed from until the next save
        write_text(Path(run_dir) / CHECKPOINT_DIR / LATEST_FILE, f"{iteration}\n")
    return moved


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete the leftovers of interrupted saves (call on one rank, before training): checkpoints that were
    being written (``.tmp-<iteration>``), moved aside, or a ``latest`` being replaced."""
    root = Path(run_dir) / CHECKPOINT_DIR
    leftovers = sorted(path for path in root.iterdir() if is_temporary(path.name)) if root.is_dir() else []
    for path in leftovers:
        with contextlib.suppress(OSError):  # e.g. a file still open elsewhere on NFS: it is never read anyway
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return leftovers


# --------------------------------------------------------------------------------------------------
# state


def _model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


@contextlib.contextmanager
def single_process_is_intended():
    """DCP warns on every save/load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _without_optimizer_state(model: torch.nn.Module, optimizer_state: dict[str, Any]) -> list[str]:
    """The optimized parameters that have no AdamW state yet: they never had a gradient (a head warm-up's frozen
    backbones, the mask token of a student that is never masked). A fresh AdamW state is equivalent to none."""
    optimized = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return sorted(optimized - set(optimizer_state["state"]))


def save_checkpoint(run_dir: str | Path, *, iteration: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, stream_position: int, cfg: DictConfig,
                    keep_last: int = 3, keep_every: int = 0) -> Path:
    """Save on every rank (collective); returns the published directory ``checkpoints/<iteration>``.

    ``iteration`` is the number of completed iterations (the resumed run starts there). Retention keeps the
    ``keep_last`` newest checkpoints plus every one whose iteration is a multiple of ``keep_every`` (> 0).
    A failure on any rank (disk full, quota, permission) removes the partial checkpoint and raises
    :class:`CheckpointSaveError` on every rank; the checkpoints published before are untouched.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final, tmp = root / str(iteration), RunDir(run_dir).checkpoint_in_progress(iteration)
    rank = distributed.rank()
    main = rank == 0

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        rng_state_file(tmp, 0).parent.mkdir()

    def write_shards() -> None:
        with single_process_is_intended():
            dcp.save(state, checkpoint_id=tmp, no_dist=not distributed.is_distributed())
        save_rng_state(rng_state_file(tmp, rank))

    def publish() -> None:
        save_config(cfg, tmp / CONFIG_FILE)
        # every file with its size and a content checksum: a missing, truncated or overwritten file is named
        # at load time (DCP itself would crash deep inside its reader, or read the damage silently)
        files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "crc32": file_crc32(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        meta = {"iteration": iteration, "stream_position": stream_position, "world_size": distributed.world_size(),
                "model_keys": sorted(state["model"]), "files": files, "saved_at": time.time(),
                "parameters_without_optimizer_state": _without_optimizer_state(model, state["optimizer"])}
        write_json(tmp / META_FILE, meta, indent=1)
        fsync_directory(tmp)
        replace_directory(tmp, final)  # over an older save of this iteration (resumed past a damaged one)
        write_text(root / LATEST_FILE, f"{iteration}\n")
        _apply_retention(root, keep_last=keep_last, keep_every=keep_every, protect=final)

    _on_every_rank(prepare if main else None, final, tmp)
    state = _model_and_optimizer_state(model, optimizer)
    _on_every_rank(write_shards, final, tmp)
    _on_every_rank(publish if main else None, final, tmp)
    return final


def _on_every_rank(step: Optional[Any], final: Path, tmp: Path) -> None:
    """Run ``step`` here (None: nothing to do on this rank), then agree with every rank on whether all went
    well (the barrier between the steps of a save). When one failed, remove the partial checkpoint and raise
    :class:`CheckpointSaveError` everywhere, instead of leaving the other ranks waiting."""
    failure: Optional[BaseException] = None
    try:
        if step is not None:
            step()
    except KeyboardInterrupt:  # Ctrl-C (SIGINT not in checkpoint.save_on_signals): the CLI's one line, exit 130
        if not distributed.is_distributed():  # under several processes the others are inside DCP's collectives
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (Exception, dcp.CheckpointException) as error:  # noqa: BLE001 -- disk full, quota, permission: each
        failure = error  # surfaces differently (DCP's CheckpointException is a BaseException)
    if not distributed.broadcast_flag(failure is not None):
        return
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointSaveError(_save_failure_message(final, tmp, failure)) from failure


def _save_failure_message(final: Path, tmp: Path, failure: Optional[BaseException]) -> str:
    if failure is None:
        cause = "another rank could not write its part (see its message)"
    else:
        if isinstance(failure, dcp.CheckpointException) and failure.failures:  # the first rank's own error
            failure = next(iter(failure.failures.values()))[0]
        cause = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0] if str(failure).strip() else ''}"
    errno = errno_of(failure) if failure is not None else None
    if str(failure).startswith("DataLoader worker"):  # torch's message when a loader worker dies meanwhile
        cause = f"a data loader worker process died during the save ({cause}); the save was interrupted"
    if errno in (ENOSPC, EDQUOT):
        with contextlib.suppress(OSError):
            cause += f" ({shutil.disk_usage(final.parent).free / 2**20:.1f} MiB free on that filesystem)"
    earlier = [path for path in checkpoint_dirs(final.parent.parent) if path != final]
    previous = (f"the previous checkpoint {earlier[-1]} is intact and the run resumes from it when started again"
                if earlier else "no earlier checkpoint exists: the run starts from the beginning when started again")
    fix = {ENOSPC: "Free space first.", EDQUOT: "Raise the quota or free space first.",
           EACCES: "Fix the folder's permissions first.", EPERM: "Fix the folder's permissions first.",
           EROFS: "The filesystem is read-only: choose a writable --output-dir.",
           ENOTDIR: "Something that is not a folder stands in the way: move it.",
           EISDIR: "Something stands in the way: move it."}.get(
        errno, "See the cause above (a process that died or was killed, a rank that stopped) and fix it first.")
    return f"could not save checkpoint {final}: {cause}. The partial {tmp.name} was removed; {previous}. {fix}"


def _apply_retention(root: Path, *, keep_last: int, keep_every: int, protect: Path) -> None:
    published = checkpoint_dirs(root.parent)
    keep = set(published[-keep_last:]) if keep_last > 0 else set()
    keep.add(protect)
    for path in published:
        if path not in keep and not (keep_every > 0 and int(path.name) % keep_every == 0):
            # renamed first: a kill during the deletion leaves a hidden leftover the next start removes
            doomed = path.with_name(f".old-{path.name}-{secrets.token_hex(4)}")
            path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


# What meta.json must hold, by key: anything else (a list, {}, a string where a number belongs) is a damaged file.
_META_TYPES = {"iteration": int, "stream_position": int, "world_size": int, "model_keys": list,
               "files": dict}  # "files": absent from the first checkpoints dinoreg saved (sizes came later)


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{checkpoint} is not a dinoreg checkpoint ({error}); point to a directory "
                              f"RUN/{CHECKPOINT_DIR}/<iteration>") from None
    wrong = ([f"{key} (a {type(meta.get(key)).__name__}, not a {kind.__name__})" for key, kind in _META_TYPES.items()
              if type(meta.get(key)) is not kind and not (key == "files" and key not in meta)]  # noqa: E721
             if isinstance(meta, dict) else [f"a JSON {type(meta).__name__} instead of an object"])
    if wrong:
        raise CheckpointError(f"{path} is damaged: {', '.join(wrong)}. Resume from an older checkpoint (delete this "
                              "directory), or restore the file")
    return meta


def file_crc32(path: Path, chunk_bytes: int = 16 * 2**20) -> str:
    """CRC-32 of a file's content as 8 hex digits: fast (GB/s), and it catches every burst of damage."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def verify_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """``meta.json`` of ``checkpoint`` after checking every file it lists is there with its saved size and
    content checksum; raises :class:`CheckpointError` naming the missing, truncated or overwritten files.
    (Checkpoints saved before checksums were recorded list sizes only, and are checked by size.)"""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    problems = []
    for name, saved in meta.get("files", {}).items():
        size, crc = (saved, None) if isinstance(saved, int) else (saved.get("bytes"), saved.get("crc32")) \
            if isinstance(saved, dict) else (None, None)
        path = checkpoint / name
        if not isinstance(size, int) or Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"meta.json's entry for {name[:80]!r} is damaged")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were saved (truncated or overwritten)")
        elif crc is not None and (found := file_crc32(path)) != crc:
            problems.append(f"{name} has the saved size but not the saved content (checksum {found}, "
                            f"saved {crc}: bytes overwritten or corrupted)")
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: " + "; ".join(problems) +
                              ". Resume from an older checkpoint (delete this directory), or restore the files.")
    return meta


def load_checkpoint(checkpoint: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    missing_ok: Mapping[str, Optional[str]] = MappingProxyType({}),
                    verified_meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load model, optimizer and (same world size) RNG states in place, strictly; returns ``meta.json`` with
    ``rng_restored`` added (and, when False, ``rng_unrestored_because``).

    Missing or unexpected model keys are a :class:`CheckpointMismatchError` listing them; only model keys starting
    with a prefix that ``missing_ok`` maps to None may be absent from the checkpoint (they keep their values: the
    caller sets them later); a prefix mapped to a sentence adds it to the error when its keys are missing (the
    training features' :meth:`~dinoreg.ssl.feature.TrainingFeature.missing_on_resume`). ``verified_meta``: its
    ``meta.json`` as a :class:`~dinoreg.train.checkpoint_reader.CheckpointReader` verified it (None: verify here).
    """
    checkpoint = Path(checkpoint)
    meta = dict(verified_meta) if verified_meta is not None else verify_checkpoint(checkpoint)
    state = _model_and_optimizer_state(model, optimizer)
    for name in meta.get("parameters_without_optimizer_state", []):  # as saved: without state (see above)
        state["optimizer"]["state"].pop(name, None)
    absent_ok = tuple(prefix for prefix, why in missing_ok.items() if why is None)
    absent = [k for k in state["model"] if k.startswith(absent_ok) and k not in meta["model_keys"]] if absent_ok else []
    for name in absent:
        del state["model"][name]
    saved, wanted = set(meta["model_keys"]), set(state["model"])
    if saved != wanted:
        missing = sorted(wanted - saved)
        hints = "".join(f" {why}" for prefix, why in missing_ok.items()
                        if why is not None and any(k.startswith(prefix) for k in missing))
        raise CheckpointMismatchError(
            f"{checkpoint} does not fit this model: missing {missing[:20]}, unexpected "
            f"{sorted(saved - wanted)[:20]}.{hints} "
            f"Resume with the config the run was started with ({checkpoint / CONFIG_FILE}).")
    try:
        with single_process_is_intended():
            safe_dcp_load(state, checkpoint, no_dist=not distributed.is_distributed())
    except UnreadableCheckpointError as error:
        if "Missing key" not in error.detail:
            raise
        raise CheckpointError(
            f"{checkpoint} does not fit this run's optimizer or model: {error.detail}. The parameter groups follow "
            "optim.layerwise_decay and the model's structure: resume with the config the run was saved with "
            f"({checkpoint / CONFIG_FILE}).") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not absent))
    # strict=False only lets the recorded stateless parameters through: DCP has checked every other key above
    stateless = bool(meta.get("parameters_without_optimizer_state"))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=not stateless))
    rng_file = rng_state_file(checkpoint, distributed.rank())
    meta["rng_restored"] = False
    if meta["world_size"] != distributed.world_size():
        meta["rng_unrestored_because"] = (f"it was saved by {meta['world_size']} processes and this run has "
                                          f"{distributed.world_size()}")
    elif not rng_file.is_file():
        meta["rng_unrestored_because"] = f"it holds no {rng_file.relative_to(checkpoint)}"
    elif not load_rng_state(rng_file):
        meta["rng_unrestored_because"] = ("it holds its RNG states in the older pickled layout, which is not read "
                                          "(unpickling a file can run code)")
    else:
        meta["rng_restored"] = True
    return meta


def config_differences(saved: DictConfig, current: DictConfig) -> tuple[list[str], list[str]]:
    """``(breaking, benign)``: ``key: saved -> current`` lines for every differing leaf. A key the checkpoint's
    config lacks and the current config holds at the schema's default is benign: a key newer than the checkpoint,
    whose default keeps the behaviour the run had; so is a key dinoreg retired (``RETIRED_KEYS``: none had an
    effect)."""
    saved_flat, current_flat = _flatten(OmegaConf.to_container(saved)), _flatten(OmegaConf.to_container(current))
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(DinoRegConfig)))
    breaking, benign = [], []
    for key in sorted(set(saved_flat) | set(current_flat)):
        before, after = saved_flat.get(key, "<absent>"), current_flat.get(key, "<absent>")
        if before != after:
            line = f"{key}: {before!r} -> {after!r}"
            newer = key not in saved_flat and key in defaults and after == defaults[key]
            (benign if key.startswith(BENIGN_KEYS) or newer or key in RETIRED_KEYS else breaking).append(line)
    return breaking, benign


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
