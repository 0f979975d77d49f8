"""The reader contract every checkpoint format implements, and the registry that picks one.

A ``TensorSource`` is an open checkpoint. Tensors are numpy arrays (bfloat16 as its uint16
bits) and dtypes go by name (``modelstock/dtypes.py``):

  path                  the path it was opened from (errors name it)
  metadata              the format's free-form string metadata (safetensors' ``__metadata__``)
  tensors()             {name: (dtype name, shape)}, in state-dict order
  view(name)            the tensor's data, flat, read-only, without a copy where the format
                        allows (a memory map); freed with the array
  read(name)            the tensor in its shape, in memory the caller owns
  read_into(name, dest, at=0)
                        ``dest.nbytes`` bytes of the tensor from byte ``at`` on into ``dest``;
                        threads may read parts of one tensor at once
  files()               every file it reads (a merge's outputs keep clear of them)
  close()

A format is one module with a reader class, ``detect(path)`` and ``open(path)``, registered
in ``modelstock/io/__init__.py``: ``open_checkpoint`` asks each registered format in order
whether the path is one of its own. ``tests/test_readers.py`` holds every format to the
contract.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


class TensorSource:
    """The contract, with the parts every format shares written once."""

    path: str
    metadata: dict[str, str]

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def view(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        return self.view(name).reshape(self.tensors()[name][1]).copy()

    def read_into(self, name: str, dest: np.ndarray, at: int = 0) -> None:
        flat = dest.reshape(-1).view(np.uint8)
        flat[:] = self.view(name).reshape(-1).view(np.uint8)[at: at + flat.nbytes]

    def files(self) -> list[str]:
        return [self.path]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], bool]   # is this path one of the format's own? (cheap: names, stat)
    open: Callable[[Path], TensorSource]
    single_file: bool                # a file holding tensors (may be an index's shard)


_FORMATS: list[Format] = []


def register(name: str, detect, open, *, single_file: bool, before: str | None = None) -> None:  # noqa: A002
    """Add a format to the registry, last or ahead of the format named ``before``."""
    fmt = Format(name, detect, open, single_file)
    at = next((i for i, f in enumerate(_FORMATS) if f.name == before), len(_FORMATS))
    _FORMATS.insert(at, fmt)


def formats() -> list[Format]:
    return list(_FORMATS)


def open_checkpoint(path: str | os.PathLike, *, files_only: bool = False) -> TensorSource:
    """Open a checkpoint for reading, with the first registered format that claims the path
    (``files_only``: among formats of single files, for a shard named by an index)."""
    p = Path(path)
    for fmt in _FORMATS:
        if (fmt.single_file or not files_only) and fmt.detect(p):
            return fmt.open(p)
    raise AssertionError("the last registered format claims every path")
