"""``torch.save`` checkpoints (``.pt/.pth/.bin/.ckpt``): read with ``torch.load(weights_only=True)``
only (a checkpoint never runs code), unwrapping the dicts training scripts save; written by
collecting the tensors and saving them once."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..dtypes import NUMPY_DTYPES, dtype_name
from ..errors import InputError
from .arrays import to_numpy, to_torch
from .atomic import AtomicFile, Sink
from .source import TensorSource

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# The entries training scripts keep the model's state dict under, in the order they are tried.
MODEL_KEYS = ("state_dict", "model")


class TorchFile(TensorSource):
    """A ``torch.save`` checkpoint, loaded with ``weights_only=True`` (memory-mapped when the
    file is in the zip format, so tensors are paged in as they are read)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise InputError("no such file", self.path)
        import torch

        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) format cannot be mapped
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights_only errors all mean the same to a user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise InputError("refused: the file holds Python objects, not only tensors "
                                 "(loaded with weights_only=True)", self.path) from None
            raise InputError(f"not a checkpoint, or corrupt ({first})", self.path) from None
        self._sd = unwrap_state_dict(obj, self.path)
        self.metadata: dict[str, str] = {}

    def tensors(self):
        return {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in self._sd.items()}

    def view(self, name):
        return to_numpy(self._sd[name].reshape(-1))

    def close(self):
        self._sd = {}


def unwrap_state_dict(obj, source: str) -> dict:
    """The state dict inside what training scripts save: open_clip's ``{"epoch", "name",
    "state_dict", "optimizer"}`` and the common ``{"model": ...}`` wrapper."""
    from torch import Tensor

    if isinstance(obj, Mapping):
        for key in MODEL_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise InputError("not a checkpoint (no mapping of names to tensors)", source)
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise InputError(f"not a state dict: '{bad[0]}' is a {type(obj[bad[0]]).__name__}, not a tensor", source)
    unsupported = [k for k, v in obj.items() if dtype_name(v.dtype) not in NUMPY_DTYPES]
    if unsupported:
        raise InputError(f"dtype {dtype_name(obj[unsupported[0]].dtype)} is not supported", source, unsupported[0])
    return dict(obj)


class TorchSink(Sink):
    """A ``.pt`` output: the tensors collected (copies), then ``torch.save`` into one atomic file."""

    def __init__(self, path: Path, entries, durable: bool):
        super().__init__()
        self.path, self._entries, self._durable = path, entries, durable
        self._sd: dict = {}

    def write(self, i: int, array: np.ndarray) -> None:
        name, dtype, _ = self._entries[i]
        self._sd[name] = to_torch(array.copy(), dtype)

    def finish(self) -> list[AtomicFile]:
        import torch

        self._files = [AtomicFile(self.path, self._durable)]
        out = _Recording(self._files[0].f)
        try:
            torch.save(self._sd, out)
        except RuntimeError:
            # torch's zip writer turns the file's error (a full disk) into its own, or hides it
            # behind a second one on the way out: the file's error is the one to tell
            if out.error is not None:
                raise out.error from None
            raise
        return super().finish()


class _Recording:
    """A file whose write errors are kept for the caller (see ``TorchSink.finish``)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def detect(path: Path) -> bool:
    return path.suffix in TORCH_SUFFIXES


def reader(path: Path) -> TorchFile:
    return TorchFile(path)
