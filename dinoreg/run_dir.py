"""What a run writes, and how: the names and layout of a run directory, and the one atomic write.

Layout of a ``dinoreg train`` output directory (``--output-dir``)::

    config.yaml                     the resolved config (also saved inside every checkpoint)
    metrics.jsonl                   one JSON object per logged row (training, kNN, monitor)
    tensorboard/<run name>/         TensorBoard events
    checkpoints/<iteration>/        DCP checkpoints (see dinoreg.train.checkpoint), ``latest`` names the newest;
                                    each holds meta.json, config.yaml, rng/rank<r>.pt and DCP's files
    checkpoints/.tmp-<iteration>/   a checkpoint being written by every rank
    teacher_backbone.safetensors    the final teacher backbone, written when training ends
    eval_<protocol>[_random_init]/  ``dinoreg eval --run``'s default output directory
    .lock                           held (``flock``) by the process training into the folder; names its host and PID

``dinoreg eval`` writes ``results.json``, ``tensorboard/<name>/`` and its feature files (``knn_features.pt``,
``linear_features.pt``) in its output directory.

Every file a reader may open while it is being replaced goes through :func:`write_atomically` (a file) or
:func:`publish` (a file or a directory): the new content is written beside the target under a temporary
name, flushed to disk, and renamed over the target only once complete. A crash at any moment leaves either
the old content or the new, never half of either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from dinoreg.errors import InputError

__all__ = ["BACKBONE_FILE", "CHECKPOINT_DIR", "CONFIG_FILE", "FEATURES_FILES", "IN_PROGRESS_PREFIX", "LATEST_FILE",
           "LOCK_FILE", "META_FILE", "METRICS_FILE", "RESULTS_FILE", "TENSORBOARD_DIR", "RunDir", "RunInUseError",
           "RunLock", "OutputDirError", "check_not_in_use", "errno_of", "fsync_directory", "is_temporary",
           "publish", "replace_directory", "rng_state_file", "write_atomically", "write_json", "write_text"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"  # inside CHECKPOINT_DIR: the iteration of the newest published checkpoint
META_FILE = "meta.json"  # inside each checkpoint
BACKBONE_FILE = "teacher_backbone.safetensors"
RESULTS_FILE = "results.json"  # of an evaluation
FEATURES_FILES = {"knn": "knn_features.pt", "linear": "linear_features.pt"}  # of an evaluation
IN_PROGRESS_PREFIX = ".tmp-"  # checkpoints/.tmp-<iteration>: written by every rank, then renamed
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class RunDir:
    """The paths of one training run's files under ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def tensorboard_run(self) -> Path:
        """Where the events go: ``tensorboard/<name of this directory>``, so that TensorBoard shows the run by
        its name (``tensorboard --logdir RUN/tensorboard`` or, for several runs, a folder above them)."""
        return self.tensorboard / self.root.resolve().name

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def backbone(self) -> Path:
        return self.root / BACKBONE_FILE

    def checkpoint_in_progress(self, iteration: int) -> Path:
        return self.checkpoints / f"{IN_PROGRESS_PREFIX}{iteration}"

    def evaluation(self, protocol: str, *, random_init: bool = False) -> Path:
        """``dinoreg eval <protocol> --run`` writes here by default."""
        return self.root / f"eval_{protocol}{'_random_init' if random_init else ''}"

    def training_outputs(self) -> list[Path]:
        """What an earlier run left here (checkpoints, logs, the exported backbone); ``config.yaml`` aside."""
        return [path for path in (self.checkpoints, self.metrics, self.tensorboard, self.backbone) if path.exists()]


class OutputDirError(InputError, ValueError):
    """An output folder cannot be created or written (read-only, a file in the way, permissions)."""


class RunInUseError(OutputDirError):
    """Another process trains into the same output folder."""


class RunLock:
    """One run per output folder: an advisory ``flock`` on ``RUN/.lock``, held until :meth:`release` or the
    process's end (the kernel drops it then, so a ``kill -9`` leaves nothing stale to clean up). The file names
    the holder; the lock itself, not the file's existence, is what counts. Works on local filesystems and on NFS
    (where Linux maps ``flock`` to byte-range locks). Processes forked later (data loader workers) close their
    copy, so the lock never outlives the process that took it. On a filesystem without locks (Lustre mounted
    without ``-o flock``) the run goes on unlocked, with one warning."""

    def __init__(self, output_dir: str | os.PathLike, *, what: str = "dinoreg train") -> None:
        self.path, self._fd = Path(output_dir) / LOCK_FILE, -1
        try:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _take(self._fd, fcntl.LOCK_EX):
                raise RunInUseError(f"{output_dir} is in use by {_holder(self._fd)}: wait for that run to end (or "
                                    "stop it), or choose another --output-dir")
            os.register_at_fork(after_in_child=self._close_in_child)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{what} on host {socket.gethostname()}, pid {os.getpid()}, since "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as error:
            self.release()
            if error.errno in _NO_LOCKS:
                print(f"warning: {output_dir}'s filesystem has no file locks ({error.strerror}): nothing stops a "
                      "second run from using the folder at the same time", file=sys.stderr)
                return
            raise OutputDirError(f"cannot write to the output folder {output_dir} ({error.strerror}): choose a "
                                 "folder you can write to (it is created if missing)") from None
        except RunInUseError:
            self.release()
            raise

    def _close_in_child(self) -> None:
        if self._fd >= 0:  # the child's copy only: the parent's descriptor keeps the lock
            os.close(self._fd)
            self._fd = -1

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race a new holder)
            self._fd = -1


_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


def _take(fd: int, kind: int, attempts: int = 20) -> bool:
    """``flock`` without blocking, retried for a second: another process may be probing with a shared lock."""
    for _ in range(attempts):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    return False


def _holder(fd: int) -> str:
    """What the holder wrote into the lock file, as one printable line."""
    text = os.pread(fd, 200, 0).decode(errors="replace").splitlines()
    return (text[0].encode("unicode_escape").decode() if text and text[0].strip() else "") or "another process"


def check_not_in_use(output_dir: str | os.PathLike) -> None:
    """Raise :class:`RunInUseError` if a run holds ``output_dir``'s lock now. Takes a shared lock for a moment
    and writes nothing; creates nothing."""
    try:
        fd = os.open(Path(output_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file, or not readable: no run could hold it
    try:
        if not _take(fd, fcntl.LOCK_SH, attempts=1):
            raise RunInUseError(f"{output_dir} is in use by {_holder(fd)}: wait for that run to end (or stop it), or "
                                "choose another --output-dir")
    except OSError:
        pass  # a filesystem without locks: nothing to check
    finally:
        os.close(fd)


def errno_of(error: BaseException) -> int | None:
    """The operating system's error number behind ``error``: an ``OSError`` in its chain (torch.save keeps it as
    the context of its own RuntimeError), or "os error N" in the message (safetensors' writer is Rust)."""
    seen: list[BaseException] = []
    while error is not None and not any(error is other for other in seen):
        if isinstance(error, OSError) and error.errno:
            return error.errno
        found = re.search(r"os error (\d+)", str(error))
        if found:
            return int(found.group(1))
        seen.append(error)
        error = error.__cause__ or error.__context__
    return None


def rng_state_file(checkpoint: Path, rank: int) -> Path:
    """Inside a checkpoint: rank ``rank``'s python, numpy, torch and CUDA RNG states."""
    return checkpoint / "rng" / f"rank{rank}.pt"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the hidden names this module and the checkpoints write through (a checkpoint
    in progress, a file being replaced, a directory moved aside): what an interrupted write leaves behind."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)  # IN_PROGRESS_PREFIX is ".tmp-"


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries of ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]):
        with open(file, "rb+") as f:
            os.fsync(f.fileno())


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename the complete directory ``tmp`` to ``final``. An existing ``final`` is moved aside first and put
    back if the rename fails, then deleted: at every moment one complete version is at ``final`` or aside."""
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(aside, final)
            raise
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)
    fsync_directory(final.parent)


def _new_temporary(output: Path, *, directory: bool) -> Path:
    """A new, unique hidden name beside ``output``, created as an empty file or directory with the permissions
    a plain ``open`` or ``mkdir`` gives (the umask's), not ``tempfile``'s owner-only ones: colleagues on a
    shared cluster must be able to read a run's files."""
    for _ in range(100):
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if directory:
                os.mkdir(tmp)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {output}")


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only read by setting)
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _permissions_of_the_umask(root: Path) -> None:
    """What a writer made under ``root`` gets the permissions a plain ``open``/``mkdir`` gives: some libraries
    (safetensors) create their files owner-only, which would hide a run's outputs from colleagues."""
    mask = _umask()
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def publish(output: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``output`` (a directory when ``directory``) to write into; once the
    block succeeds its data is flushed to disk and it replaces ``output`` by rename. When the block fails,
    ``output`` is untouched and the temporary path is removed."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary(output, directory=directory)
    except OSError as error:  # name what was asked for, not our temporary name
        raise OSError(error.errno, f"cannot write {output}: {error.strerror}; choose a folder that exists and that "
                                   "you can write to") from None
    try:
        yield tmp
        _permissions_of_the_umask(tmp)
        _fsync_tree(tmp)
        if directory:
            replace_directory(tmp, output)
        else:
            os.replace(tmp, output)
            fsync_directory(output.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then publish it over ``path``; returns ``path``.

    A symbolic link is written through (its target is replaced). A target that exists and is no regular file
    (``/dev/stdout``, a FIFO) is written in place: it cannot be replaced, and half a file means nothing there.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # both follow links: /dev/stdout is a link to a pipe or terminal
        write(path)
        return path
    with publish(Path(os.path.realpath(path)) if path.is_symlink() else path) as tmp:
        write(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2) -> Path:
    return write_text(path, json.dumps(payload, indent=indent) + "\n")
