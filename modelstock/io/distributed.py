"""``torch.distributed.checkpoint`` folders: a ``.metadata`` beside the ``*.distcp`` files the
ranks wrote (what ``dcp.save`` writes; FSDP2 trainers such as torchtitan save this way).

Read one tensor at a time through the checkpoint's own reader (``FileSystemReader``, driven by
a ``DefaultLoadPlanner`` as ``dcp.load`` drives them, without a process group): a tensor is
assembled from the chunks the ranks saved into memory the reader owns, so resident memory holds
a tensor or two, never the state. The ``.metadata`` is unpickled with only the checkpoint's own
metadata classes allowed (a checkpoint never runs code), so names, dtypes and shapes are known
before a byte of weights is read.

Only the model's weights are taken, as from a ``.pt`` training checkpoint: the tensors under a
``model`` (or ``state_dict``) entry, named without it, if there is one; else the top-level
tensors (torchtitan keeps the model's there, beside ``optimizer``, ``lr_scheduler``,
``dataloader`` and ``train_state``). Nested entries are told apart by the checkpoint's own
record of each key's path (``Metadata.planner_data``); non-tensor entries are skipped.
"""
from __future__ import annotations

import math
import os
import pickle
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ..dtypes import NUMPY_DTYPES, dtype_name
from ..errors import InputError
from .arrays import to_numpy
from .index import is_plain_file_name
from .source import TensorSource
from .torch_file import MODEL_KEYS

METADATA = ".metadata"
# Trainer state beside the model's tensors, told apart by name only when the checkpoint does
# not record its keys' paths (torchtitan's entries, and the common spellings).
TRAINER_KEYS = ("optimizer", "optim", "lr_scheduler", "scheduler", "dataloader", "train_state")


class DistributedCheckpoint(TensorSource):
    """A ``dcp.save`` folder, read a tensor at a time (see the module)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = str(folder)
        self.metadata: dict[str, str] = {}
        try:
            from torch.distributed.checkpoint import FileSystemReader
        except ImportError:
            raise InputError("a distributed checkpoint needs torch.distributed, which this torch lacks",
                             self.path) from None
        self._md = _read_metadata(Path(self.path))
        self._fqns = _model_keys(self._md, self.path)
        self._tensors = {}
        for name, fqn in self._fqns.items():
            props = self._md.state_dict_metadata[fqn]
            dtype = dtype_name(props.properties.dtype)
            if dtype not in NUMPY_DTYPES:
                raise InputError(f"dtype {dtype} is not supported", self.path, name)
            self._tensors[name] = (dtype, tuple(int(s) for s in props.size))
        self._files = _data_files(self._md, self._fqns, Path(self.path))
        self._reader = FileSystemReader(self.path)
        self._reader.set_up_storage_reader(self._md, True)
        # read_into's tensor: threads read pieces of one tensor, which is loaded once
        self._lock = threading.Lock()
        self._last: tuple[str | None, np.ndarray | None] = (None, None)

    def tensors(self):
        return dict(self._tensors)

    def view(self, name):
        data = self._load(name)
        data.flags.writeable = False
        return data

    def read(self, name):
        return self._load(name).reshape(self._tensors[name][1])

    def read_into(self, name, dest, at=0):
        with self._lock:
            if self._last[0] != name:
                self._last = (None, None)  # the previous tensor goes before the next is loaded
                self._last = (name, self._load(name))
            data = self._last[1]
        flat = dest.reshape(-1).view(np.uint8)
        flat[:] = data.view(np.uint8)[at: at + flat.nbytes]

    def files(self):
        return [str(Path(self.path) / METADATA)] + [str(p) for p in self._files]

    def close(self):
        self._last = (None, None)

    def _load(self, name: str) -> np.ndarray:
        """One tensor, flat, in memory of its own: its chunks read by the checkpoint's reader
        as ``dcp.load`` reads them, the metadata read once for all (``dcp.load`` reads it again
        each call)."""
        import torch
        from torch.distributed.checkpoint import DefaultLoadPlanner

        dtype, shape = self._tensors[name]
        target = torch.empty(shape, dtype=getattr(torch, dtype))
        # the keys are the checkpoint's flat ones already: nothing to flatten, and no pass over
        # every key of the checkpoint per load (which flattening makes)
        planner = DefaultLoadPlanner(flatten_state_dict=False)
        planner.set_up_planner({self._fqns[name]: target}, self._md, True)
        try:
            plan = self._reader.prepare_local_plan(planner.create_local_plan())
            plan = self._reader.prepare_global_plan(planner.create_global_plan([plan]))[0]
            self._reader.read_data(planner.finish_plan(plan), planner).wait()
        except Exception as e:  # a truncated or rewritten .distcp: torch.load's or the reader's error
            raise InputError(f"cannot be read from the checkpoint's files ({_first_line(e)})", self.path,
                             name) from None
        return to_numpy(target.reshape(-1))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Refused(pickle.UnpicklingError):
    pass


# Besides the metadata module's data classes and torch's Size and dtypes: where a chunk lies,
# the layout of a tensor, and a mapping.
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """``.metadata`` is a pickle (``FileSystemReader.read_metadata`` loads it with plain
    ``pickle.load``, which runs whatever it names): here only the metadata's own classes and the
    torch values they hold may be named."""

    def find_class(self, module, name):
        import torch

        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch.distributed.checkpoint.metadata":
            value = super().find_class(module, name)
            if isinstance(value, type) and value.__module__ == module:
                return value
        elif module == "torch":
            value = getattr(torch, name, None)
            if value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        elif module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            # the folder it was saved to, a record only: kept as a pure path on any system
            return PureWindowsPath if "Windows" in name else PurePosixPath
        raise _Refused(f"{module}.{name}")


def _read_metadata(folder: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(folder / METADATA, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise InputError(f"refused: its {METADATA} names {e}, which is no part of a checkpoint's metadata "
                         "(it is read without running code)", str(folder)) from None
    except Exception as e:
        raise InputError(f"not a distributed checkpoint, or its {METADATA} is corrupt ({_first_line(e)})",
                         str(folder)) from None
    if not (isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict)
            and isinstance(md.storage_data, dict)):
        raise InputError(f"not a distributed checkpoint ({METADATA} holds no file system checkpoint's metadata)",
                         str(folder))
    return md


def _model_keys(md, source: str) -> dict[str, str]:
    """{name: the checkpoint's key} for the model's tensors, in the state dict's order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths = md.planner_data if isinstance(md.planner_data, dict) else {}
    # planner_data keeps the order the saving rank's state dict had; the metadata's own order
    # follows which rank wrote each tensor
    keys = [k for k in paths if k in md.state_dict_metadata]
    keys += [k for k in md.state_dict_metadata if k not in paths]
    tensors = [k for k in keys if isinstance(md.state_dict_metadata[k], TensorStorageMetadata)]

    def entry(key: str) -> str | None:
        """The top-level entry a key lies in, or None for a top-level tensor."""
        path = paths.get(key)
        if isinstance(path, tuple) and path:
            return str(path[0]) if len(path) > 1 else None
        head = key.split(".", 1)[0]  # no record of the path: the known entries, by name
        return head if "." in key and head in MODEL_KEYS + TRAINER_KEYS else None

    entries = {k: entry(k) for k in tensors}
    for wrapper in MODEL_KEYS:
        inner = {k[len(wrapper) + 1:]: k for k in tensors if entries[k] == wrapper}
        if inner:
            return inner
    top = {k: k for k in tensors if entries[k] is None}
    if not top:
        raise InputError("holds no model weights: no tensors at its top level or under 'model' or 'state_dict' "
                         "(only optimizer or trainer state)", source)
    return top


def _data_files(md, fqns: dict[str, str], folder: Path) -> list[Path]:
    """Every data file the metadata names; those holding the model's tensors must be there,
    with every chunk of each tensor recorded and the chunks filling it."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    named = {}
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not is_plain_file_name(rel):
            raise InputError(f"{METADATA} names the file {rel!r}: a data file must be a file name in the "
                             "checkpoint's folder", str(folder))
        named[rel] = folder / rel
    needed = set()
    for name, fqn in fqns.items():
        meta = md.state_dict_metadata[fqn]
        covered = 0
        for chunk in meta.chunks:
            info = md.storage_data.get(MetadataIndex(fqn, chunk.offsets))
            inside = len(chunk.sizes) == len(meta.size) and all(
                0 <= o and o + s <= n for o, s, n in zip(chunk.offsets, chunk.sizes, meta.size))
            if info is None or not inside:
                raise InputError(f"{METADATA} does not record where each part of it lies", str(folder), name)
            needed.add(info.relative_path)
            covered += math.prod(chunk.sizes)
        if covered != math.prod(meta.size):
            raise InputError(f"its parts in {METADATA} cover {covered} of its {math.prod(meta.size)} elements",
                             str(folder), name)
    for rel in sorted(needed):
        if not named[rel].is_file():
            raise InputError(f"{rel} is missing (it holds part of the model's weights)", str(folder))
    return sorted(named.values())


def detect(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def reader(path: Path) -> DistributedCheckpoint:
    return DistributedCheckpoint(path)
