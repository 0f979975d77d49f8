"""Model Stock's math for one layer, in plain PyTorch (the executable form of
``shared/spec/modelstock.md``).

A layer is handled as a *stack*: a ``(N + 1, numel)`` floating tensor whose row 0 is the
pre-trained weight ``w0`` and rows 1..N the fine-tuned weights ``w1..wN`` (one buffer, so that
the streaming merge reads each file straight into its row). With
``rows > 1`` (granularity ``row``) every row of the flattened tensor (a slice along dim 0)
gets a ratio of its own.

    d_i    = w_i - w0
    G_ij   = <d_i, d_j>                                  accumulated in fp64
    cos_ij = G_ij / (sqrt(G_ii) sqrt(G_jj) + eps)
    cos    = mean over i < j of cos_ij, then clamped to [0, 1] (clamp=True) or [-1, 1]
    t      = N cos / (1 + (N - 1) cos)
    merged = w0 + t (mean_i(w_i) - w0)

Nothing here knows about files; the streaming file merge and the in-memory merge both call
these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

EPS = 1e-8

# Products summed in the compute dtype over runs of this many elements; the runs' sums are then
# added in fp64. Sequential fp32 error grows with the run length (bounded by 256 ulp, ~16 ulp
# typical), and a whole 25M-element layer never accumulates in fp32 at once.
_CHUNK = 256
# Elements per step of the Gram loop (a multiple of _CHUNK): the Python loop costs nothing and
# the scratch block stays in cache (measured best on a 2-core host).
_GRAM_BLOCK = 1 << 18


def gram(stack: Tensor, rows: int = 1) -> Tensor:
    """``(rows, N, N)`` fp64 Gram matrices of the deltas ``d_i = stack[i] - stack[0]``.

    The deltas are formed in the stack's dtype (fp32: each rounded once, as the spec's "fp32
    arithmetic"), their products summed in runs of ``_CHUNK`` and the runs' sums added in fp64,
    which keeps cos within ~1e-9 of the fp64 formula on 25M-element layers. (A plain fp32
    ``d1 @ d2`` there is off by ~1e-3: BLAS accumulates the whole layer in sequence.)
    """
    n1, numel = stack.shape
    n = n1 - 1
    w = stack.reshape(n1, rows, numel // rows)
    k = w.shape[2]
    out = torch.zeros(rows, n, n, dtype=torch.float64, device=stack.device)
    k_runs = k // _CHUNK * _CHUNK  # columns covered by whole runs; the rest go through fp64
    row_step = max(1, _GRAM_BLOCK // max(k, 1))
    col_step = max(1, min(k_runs, _GRAM_BLOCK))
    # One scratch block, reused: a fresh allocation per block costs page faults.
    scratch = torch.empty(n * min(rows, row_step) * col_step, dtype=stack.dtype, device=stack.device)
    for r0 in range(0, rows, row_step):
        r1 = min(rows, r0 + row_step)
        for c0 in range(0, k_runs, col_step):
            src = w[:, r0:r1, c0:min(c0 + col_step, k_runs)]
            d = torch.sub(src[1:], src[:1], out=scratch[: n * src[0].numel()].view(n, r1 - r0, -1))
            runs = d.view(n, -1, _CHUNK).transpose(0, 1)  # (runs, N, _CHUNK)
            partial = torch.bmm(runs, runs.transpose(1, 2))
            out[r0:r1] += partial.view(r1 - r0, -1, n, n).sum(1, dtype=torch.float64)
        if k_runs < k:
            tail = w[:, r0:r1, k_runs:].to(torch.float64)
            d = (tail[1:] - tail[:1]).transpose(0, 1)
            out[r0:r1] += torch.bmm(d, d.transpose(1, 2))
    return out


@dataclass
class Ratio:
    """What the spec computes from a layer's Gram matrix; one entry per row of the layer."""

    norms: Tensor      # (rows, N)   ||d_i||
    cos_pairs: Tensor  # (rows, P)   cos_ij for i < j, in the order (0,1), (0,2), ..., (N-2,N-1)
    cos: Tensor        # (rows,)     the mean cos after the clamp
    t: Tensor          # (rows,)     the interpolation ratio
    clamped: Tensor    # (rows,)     bool: the [0, 1] clamp changed cos


def ratio(g: Tensor, *, eps: float = EPS, clamp: bool = True) -> Ratio:
    """Model Stock's ratio from ``(rows, N, N)`` Gram matrices, computed in fp64."""
    g = g.to(torch.float64)
    n = g.shape[-1]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    i, j = torch.triu_indices(n, n, offset=1)
    cos_pairs = g[:, i, j] / (norms[:, i] * norms[:, j] + eps)
    authors = cos_pairs.mean(dim=1).clamp(-1.0, 1.0)
    cos = authors.clamp(0.0, 1.0) if clamp else authors
    t = n * cos / (1 + (n - 1) * cos)
    return Ratio(norms, cos_pairs, cos, t, cos != authors)


def layer_ratio(stack: Tensor, rows: int = 1, *, eps: float = EPS, clamp: bool = True) -> Ratio:
    """The ratio of one layer given as a ``(N + 1, numel)`` stack, base in row 0."""
    if stack.shape[0] < 3:
        raise ValueError(f"Model Stock needs at least two fine-tuned models, got {stack.shape[0] - 1}")
    return ratio(gram(stack, rows), eps=eps, clamp=clamp)


def average_(stack: Tensor) -> Tensor:
    """Mean of the fine-tuned rows 1..N, written into row 1 (a running mean: one pass per row)."""
    mean = stack[1]
    for i in range(2, stack.shape[0]):
        mean.lerp_(stack[i], 1.0 / i)
    return mean


def merge_(stack: Tensor, t: Tensor) -> Tensor:
    """``w0 + t (mean_i(w_i) - w0)`` for each of the ``len(t)`` rows, written into row 0 (which
    is returned); row 1 is overwritten with the mean."""
    mean = average_(stack)
    rows = t.numel()
    out = stack[0].view(rows, -1)
    if rows == 1:
        return out.lerp_(mean.view(rows, -1), float(t)).view(-1)
    return out.lerp_(mean.view(rows, -1), t.to(stack.dtype)[:, None]).view(-1)


def layer_rows(shape: tuple[int, ...] | torch.Size, granularity: str) -> int:
    """How many ratios a tensor of this shape gets: 1 (``tensor``), or one per slice along
    dim 0 (``row``) for tensors of two or more dims."""
    if granularity == "tensor":
        return 1
    if granularity == "row":
        return int(shape[0]) if len(shape) >= 2 and math.prod(shape) > 0 else 1
    raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
