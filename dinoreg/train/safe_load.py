"""Reading checkpoint folders from others without running their code.

A DCP checkpoint is a folder of files anyone can craft: DCP itself reads its ``.metadata`` with a plain
``pickle.load`` and the non-tensor values of a state dict with ``torch.load(weights_only=False)``, and either can
run any code while it is read. The per-file checksums in ``meta.json`` do not help (whoever crafts the folder
recomputes them). So every read of a checkpoint folder goes through here:

- ``.metadata`` through an unpickler that admits only the classes DCP's metadata consists of (and torch's dtypes,
  layouts and ``Size``); anything else is refused before it is constructed, naming the file;
- the state dict's non-tensor values (the optimizer's hyper-parameters) with ``torch.load(weights_only=True)``;
- per-rank RNG states are written as tensors and plain numbers only, and read with ``weights_only=True``.

Tensor data DCP already reads with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from dinoreg.errors import InputError

__all__ = ["UnreadableCheckpointError", "UntrustedCheckpointError", "load_rng_state", "read_dcp_metadata", "safe_dcp_load", "save_rng_state"]

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},  # StorageMeta.checkpoint_id
    "pathlib._local": {"PosixPath", "PurePosixPath", "Path"},  # the same, pickled by Python 3.13
    "collections": {"OrderedDict"},
}
_LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}


class UntrustedCheckpointError(InputError, ValueError):
    """A checkpoint file holds something other than data (a crafted or corrupted file); nothing in it was run."""


class UnreadableCheckpointError(InputError, ValueError):
    """DCP could not read what was asked of a checkpoint; ``detail``: DCP's own first line (e.g. a missing key)."""

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _printable(text: str) -> str:
    """A name read from a crafted file, as one printable line of bounded length."""
    return str(text).encode("unicode_escape").decode()[:120]


def _refusal(path: Path, what: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"{path} holds {what}, which a dinoreg checkpoint never contains: not loaded, nothing in it was run (the "
        "folder was crafted or corrupted). Load checkpoints only from people you trust, or ask for a safetensors "
        "export (dinoreg export --format safetensors)")


class _MetadataUnpickler(pickle.Unpickler):
    """Constructs only DCP's metadata classes, torch dtypes, layouts and sizes."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # how torch pickles a layout: by its name
            return _LAYOUTS.__getitem__
        raise _refusal(self.path, f"a reference to {_printable(f'{module}.{name}')}")


def read_dcp_metadata(checkpoint: str | Path) -> Metadata:
    """The ``.metadata`` of a DCP checkpoint folder, read without running anything it holds."""
    path = Path(checkpoint) / ".metadata"
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file, path).load()
    except UntrustedCheckpointError:
        raise
    except OSError as error:
        raise UntrustedCheckpointError(f"cannot read {path} ({error.strerror}): the checkpoint is incomplete; "
                                       "resume from another checkpoint or restore the file") from None
    except Exception as error:  # noqa: BLE001 -- any unpickling failure of a damaged file means the same
        raise UntrustedCheckpointError(f"{path} is not DCP metadata ({type(error).__name__}: the file is damaged); "
                                       "resume from another checkpoint or restore the file") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise _refusal(path, f"a {type(metadata).__name__} instead of DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata) and not (
                isinstance(entry.properties.dtype, torch.dtype) and all(
                    type(size) is int and size >= 0 for size in entry.size)):  # noqa: E721 -- no bool
            raise _refusal(path, f"an impossible tensor for {_printable(key)} (size {_printable(entry.size)})")
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, handing DCP the metadata :func:`read_dcp_metadata` read."""

    def __init__(self, checkpoint: Path, metadata: Metadata) -> None:
        super().__init__(str(checkpoint))
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata: DCP writes none for our saves, so none is read
            raise FileNotFoundError(f"{self.path}: no per-rank metadata")
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    """DCP's planner, but the state dict's non-tensor values are read as data only."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            data = torch.load(value, weights_only=True)
        except Exception:  # noqa: BLE001 -- weights_only refuses anything but tensors and plain values
            raise _refusal(self.checkpoint, f"a value for {_printable(read_item.dest_index.fqn)} that is not plain "
                                            "data") from None
        safe = io.BytesIO()
        torch.save(data, safe)  # DCP's own reader then unpickles our serialisation of plain data
        safe.seek(0)
        super().load_bytes(read_item, safe)


def safe_dcp_load(state: dict[str, Any], checkpoint: str | Path, *, no_dist: bool,
                  metadata: Optional[Metadata] = None) -> None:
    """``dcp.load(state, checkpoint_id=checkpoint)`` that runs nothing the folder holds. Raises
    :class:`UntrustedCheckpointError` (one line) for a folder holding anything but data. ``metadata``: the
    folder's :func:`read_dcp_metadata`, when the caller has read it already."""
    checkpoint = Path(checkpoint)
    if metadata is None:  # before DCP: its failures come with tracebacks
        metadata = read_dcp_metadata(checkpoint)
    reader = _SafeReader(checkpoint, metadata)
    try:
        dcp.load(state, storage_reader=reader, planner=_SafePlanner(checkpoint), no_dist=no_dist)
    except dcp.CheckpointException as error:
        failures = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
        for failure in failures:
            if isinstance(failure, UntrustedCheckpointError):
                raise failure from None
        first = next((line.strip() for line in str(failures[0] if failures else error).splitlines() if line.strip()),
                     "")
        raise UnreadableCheckpointError(f"{checkpoint} could not be read ({_printable(first)}): its files do not hold "
                                        "what its metadata lists (damaged or crafted); use another checkpoint",
                                        detail=first) from None


# --------------------------------------------------------------------------------------------------
# RNG states: tensors and plain numbers only


def save_rng_state(path: Path) -> None:
    version, python_state, gauss = random.getstate()
    name, key, position, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with open(path, "wb") as file:  # through Python's file: a full disk is an OSError with its errno (torch's own
        torch.save(state, file)     # writer reports only "unexpected pos")


# Checkpoints saved before RNG states were plain data pickled the numpy state as an array: only these globals.
_OLD_FORMAT_GLOBALS = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                       "numpy._core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"}


def load_rng_state(path: Path) -> bool:
    """Restore the RNG states :func:`save_rng_state` wrote, read as data only. A file in the older pickled layout
    is not read (False: the caller goes on without restoring them); anything else but RNG states is refused, and
    then nothing is restored."""
    try:
        state = torch.load(path, weights_only=True)
        python, numpy_state = state["python"], state["numpy"]
        python = (python["version"], tuple(python["state"].tolist()), python["gauss"])
        numpy_state = (numpy_state["name"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["position"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
        devices = [state["torch"], *state.get("cuda", [])]
        if len(python[1]) != 625 or len(numpy_state[1]) != 624 or any(  # Mersenne Twister's state sizes
                not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 for t in devices):
            raise ValueError("not the RNG states' shapes")
        random.Random().setstate(python)  # checked on a throw-away generator before the real ones change
        np.random.RandomState().set_state(numpy_state)
    except Exception:  # noqa: BLE001 -- refused by weights_only, or not the layout above
        if _old_format(path):
            return False
        raise _refusal(path, "objects other than RNG states (tensors and numbers)") from None
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def _old_format(path: Path) -> bool:
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 -- not even a torch file
        return False
    return bool(needed) and needed <= _OLD_FORMAT_GLOBALS
