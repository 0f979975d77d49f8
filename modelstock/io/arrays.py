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
