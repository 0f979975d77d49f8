"""A layer's merge when some fine-tuned updates come as LoRA factors (numpy; the spec's
"Adapters (LoRA)" section). Each fine-tuned model's update of a layer, as ``(rows, k)``:

  Zero            the layer is not targeted by that adapter: d = 0
  Full(w)         a fully fine-tuned model: d = w - w0 (formed in the compute dtype)
  LowRank(bm, am, s)   d = s bm @ am, bm (rows, r), am (r, k): never formed here

The statistics a merge method asks for, without forming a low-rank d:
  <d_i, d_j> = s_i s_j sum((bm_i^T bm_j) * (am_i am_j^T))        both low-rank: O((rows + k) r_i r_j)
  row q:       s_i s_j bm_i[q] (am_i am_j^T) bm_j[q]^T
  <d_i, d_j> = s_i sum(bm_i * (d_j am_i^T))                        low-rank and full: O(rows k r_i)
  full pairs:  the Gram of ``backends/numpy_ops.py``
all summed in fp64. The combine w0 + sum_i c_i d_i takes the low-rank part as one product
[c_1 s_1 bm_1, ..., c_N s_N bm_N] @ [am_1; ...; am_N] (rank sum r_i), which is also the merged
adapter's factors (``merged_factors``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backends import numpy_ops
from .tiles import BLOCK


@dataclass
class Zero:
    pass


@dataclass
class Full:
    w: np.ndarray     # (rows, k) in the compute dtype


@dataclass
class LowRank:
    bm: np.ndarray    # (rows, r)
    am: np.ndarray    # (r, k)
    scale: float


def _row_blocks(rows: int, k: int):
    step = max(1, BLOCK // max(k, 1))
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))


def _lowrank_pair(a: LowRank, b: LowRank, rows: int) -> np.ndarray:
    m = a.am.astype(np.float64) @ b.am.astype(np.float64).T                  # (r_a, r_b)
    if rows == 1:
        inner = np.sum((a.bm.astype(np.float64).T @ b.bm.astype(np.float64)) * m)
        return np.array([inner * a.scale * b.scale])
    per_row = np.einsum("qa,ab,qb->q", a.bm.astype(np.float64), m, b.bm.astype(np.float64))
    return per_row * (a.scale * b.scale)


def _mixed_pair(a: LowRank, w0: np.ndarray, b: Full, rows: int) -> np.ndarray:
    """<s bm am, w - w0> per row (``rows`` 1: summed), the full delta formed a block of rows
    at a time, in fp64."""
    out = np.zeros(w0.shape[0], dtype=np.float64)
    am = a.am.astype(np.float64)
    for blk in _row_blocks(*w0.shape):
        d = b.w[blk].astype(np.float64) - w0[blk].astype(np.float64)
        out[blk] = np.sum(a.bm[blk].astype(np.float64) * (d @ am.T), axis=1)
    out *= a.scale
    return out if rows > 1 else np.array([out.sum()])


def gram(w0: np.ndarray, deltas: Sequence, rows: int) -> np.ndarray:
    """``(rows, N, N)`` fp64 Gram matrices of the updates ``deltas`` (Zero / Full / LowRank)
    of the layer whose base is ``w0`` ((rows, k), the compute dtype; only read for Full ones)."""
    n = len(deltas)
    out = np.zeros((rows, n, n), dtype=np.float64)
    full = [i for i, d in enumerate(deltas) if isinstance(d, Full)]
    if full:
        g = numpy_ops.gram(w0.reshape(-1), [deltas[i].w.reshape(-1) for i in full], rows)
        out[np.ix_(range(rows), full, full)] = g
    low = [i for i, d in enumerate(deltas) if isinstance(d, LowRank)]
    for x, i in enumerate(low):
        for j in low[x:]:
            out[:, i, j] = out[:, j, i] = _lowrank_pair(deltas[i], deltas[j], rows)
        for j in full:
            out[:, i, j] = out[:, j, i] = _mixed_pair(deltas[i], w0, deltas[j], rows)
    return out


def per_model(c, n: int, rows: int) -> np.ndarray:
    """(rows, N) fp64: c_i per row from a method's ``Coefficients`` (c_i = scale w_i / N)."""
    scale = np.asarray(c.scale, dtype=np.float64).reshape(rows, 1)
    weights = np.ones((rows, n)) if c.weights is None else np.asarray(c.weights, dtype=np.float64).reshape(rows, n)
    return scale * weights / n


def merged_factors(deltas: Sequence, coef: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """The low-rank part of sum_i c_i d_i as one pair (bm (rows, R), am (R, k)), R = sum r_i:
    bm = [c_1 s_1 bm_1, ...] (c per row), am = [am_1; ...], in ``dtype``; None if no low-rank
    update."""
    low = [(i, d) for i, d in enumerate(deltas) if isinstance(d, LowRank)]
    if not low:
        return None
    bm = np.concatenate([(d.bm.astype(np.float64) * (coef[:, i:i + 1] * d.scale)).astype(dtype) for i, d in low],
                        axis=1)
    am = np.concatenate([d.am.astype(dtype, copy=False) for _, d in low], axis=0)
    return bm, am


def combine_into(out: np.ndarray, w0: np.ndarray, deltas: Sequence, coef: np.ndarray) -> np.ndarray:
    """``out = w0 + sum_i c_i d_i`` ((rows, k), the compute dtype; ``coef`` (rows, N) or
    (1, N)), a block of rows at a time: the update summed first, so the only rounding at the
    weights' magnitude is the final add."""
    rows, k = w0.shape
    coef = np.broadcast_to(coef, (rows, coef.shape[1]))
    factors = merged_factors(deltas, coef, out.dtype)
    full = [(i, d) for i, d in enumerate(deltas) if isinstance(d, Full)]
    for blk in _row_blocks(rows, k):
        update = factors[0][blk] @ factors[1] if factors else np.zeros((blk.stop - blk.start, k), out.dtype)
        for i, d in full:
            update += coef[blk, i:i + 1].astype(out.dtype) * (d.w[blk] - w0[blk])
        np.add(w0[blk], update, out=out[blk])
    return out
