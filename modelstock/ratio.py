"""Model Stock's ratio from a layer's Gram matrices, for numpy arrays and torch tensors alike
(only operators both provide), so the torch-free file merge and the torch reference share it.

    cos_ij = G_ij / (sqrt(G_ii) sqrt(G_jj) + eps)
    cos    = mean over i < j of cos_ij, then clamped to [0, 1] (clamp=True) or [-1, 1]
    t      = N cos / (1 + (N - 1) cos)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-8


@dataclass
class Ratio:
    """What the spec computes from a layer's Gram matrices; one entry per row of the layer."""

    norms: Any      # (rows, N)   ||d_i||
    cos_pairs: Any  # (rows, P)   cos_ij for i < j, in the order (0,1), (0,2), ..., (N-2,N-1)
    cos: Any        # (rows,)     the mean cos after the clamp
    t: Any          # (rows,)     the interpolation ratio
    clamped: Any    # (rows,)     bool: the [0, 1] clamp changed cos


def ratio(g, *, eps: float = EPS, clamp: bool = True) -> Ratio:
    """The ratio from ``(rows, N, N)`` fp64 Gram matrices (a numpy array or a torch tensor).
    NaN and inf pass through (the caller names the input at fault), without numpy warnings."""
    with np.errstate(all="ignore"):
        return _ratio(g, eps, clamp)


def _pairs(n: int) -> tuple[list[int], list[int]]:
    """(i, j) of the pairs i < j, in the order of ``Ratio.cos_pairs``."""
    return [a for a in range(n) for b in range(a + 1, n)], [b for a in range(n) for b in range(a + 1, n)]


@functools.lru_cache(maxsize=16)
def _device_pairs(n: int, device):
    """``_pairs`` as index tensors on ``device``, made once: indexing a CUDA tensor with Python
    lists copies them to the device each time, and a pageable copy waits for the GPU (here:
    for the Gram pass), so the host would fall behind between the merge's two passes."""
    import torch

    return tuple(torch.tensor(v, dtype=torch.int64, device=device) for v in _pairs(n))


def _ratio(g, eps: float, clamp: bool) -> Ratio:
    n = g.shape[-1]
    norms = g.diagonal(0, -2, -1).clip(0, None) ** 0.5
    i, j = _pairs(n) if isinstance(g, np.ndarray) else _device_pairs(n, g.device)
    cos_pairs = g[:, i, j] / (norms[:, i] * norms[:, j] + eps)
    authors = cos_pairs.mean(1).clip(-1.0, 1.0)
    cos = authors.clip(0.0, 1.0) if clamp else authors
    t = n * cos / (1 + (n - 1) * cos)
    return Ratio(norms, cos_pairs, cos, t, cos != authors)


def layer_rows(shape, granularity: str) -> int:
    """How many ratios a tensor of this shape gets: 1 (``tensor``), or one per slice along
    dim 0 (``row``) for tensors of two or more dims."""
    if granularity == "tensor":
        return 1
    if granularity == "row":
        return int(shape[0]) if len(shape) >= 2 and math.prod(shape) > 0 else 1
    raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
