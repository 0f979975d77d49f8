"""numpy <-> torch without copies. Tensors are numpy arrays in the I/O layer (it needs no torch
unless a file is a torch one); bfloat16, which numpy lacks, travels as its uint16 bits."""
from __future__ import annotations

import numpy as np


def to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array sharing its memory (bfloat16 as uint16 bits)."""
    import torch

    t = t.detach().cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def to_torch(a: np.ndarray, dtype: str):
    """The inverse of ``to_numpy``: a torch tensor sharing the array's memory."""
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class StateDictSource:
    """A state dict of CPU torch tensors read through the reader contract (``source.py``),
    without copies: how in-memory inputs join the file merges' code (LoRA adapters)."""

    metadata: dict = {}

    def __init__(self, state: dict, path: str):
        from ..dtypes import dtype_name

        self.path, self._state = path, state
        self._meta = {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}

    def tensors(self) -> dict:
        return dict(self._meta)

    def view(self, name: str) -> np.ndarray:
        return to_numpy(self._state[name]).reshape(-1)

    def read(self, name: str) -> np.ndarray:
        return to_numpy(self._state[name]).copy()

    def files(self) -> list:
        return []

    def close(self) -> None:
        pass
