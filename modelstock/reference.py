"""Model Stock's math for one layer, in plain PyTorch (the executable form of
``shared/spec/modelstock.md``).

A layer is given flat: the pre-trained ``w0`` and the fine-tuned ``ws = [w1..wN]``, all of one
floating dtype (the compute dtype). With ``rows > 1`` (granularity ``row``) every row of the
``(rows, numel / rows)`` layer (a slice along dim 0) gets a ratio of its own.

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
from typing import Sequence

import torch
from torch import Tensor

EPS = 1e-8

# Products summed in the compute dtype over runs of this many elements; the runs' sums are then
# added in fp64. Sequential fp32 error grows with the run length (bounded by 256 ulp, ~16 ulp
# typical), and a whole 25M-element layer never accumulates in fp32 at once.
_CHUNK = 256
# Elements per tile of the Gram and merge loops (a multiple of _CHUNK): the Python loop costs
# nothing and a tile's scratch stays in cache (measured best on a 2-core host).
_BLOCK = 1 << 18


def _tiles(rows: int, k: int):
    """``(r0, r1, c0, c1)`` tiles of a ``(rows, k)`` layer: several whole rows per tile when
    rows are short, column slices of one row when they are long."""
    row_step = max(1, _BLOCK // max(k, 1))
    col_step = max(1, min(k, _BLOCK))
    for r0 in range(0, rows, row_step):
        for c0 in range(0, k, col_step):
            yield r0, min(rows, r0 + row_step), c0, min(k, c0 + col_step)


def gram(w0: Tensor, ws: Sequence[Tensor], rows: int = 1) -> Tensor:
    """``(rows, N, N)`` fp64 Gram matrices of the deltas ``d_i = ws[i] - w0`` (flat tensors of
    one floating dtype), one per row of the ``(rows, numel / rows)`` layer.

    The deltas are formed in the inputs' dtype (fp32: each rounded once, as the spec's "fp32
    arithmetic"), their products summed in runs of ``_CHUNK`` and the runs' sums added in fp64,
    which keeps cos within ~1e-9 of the fp64 formula on 25M-element layers. (A plain fp32
    ``d1 @ d2`` there is off by ~1e-3: BLAS accumulates the whole layer in sequence.)
    """
    n = len(ws)
    k = w0.numel() // rows
    w0 = w0.view(rows, k)
    ws = [w.view(rows, k) for w in ws]
    out = torch.zeros(rows, n, n, dtype=torch.float64, device=w0.device)
    k_runs = k // _CHUNK * _CHUNK  # columns covered by whole runs; the rest go through fp64
    scratch = torch.empty(n * min(_BLOCK, rows * k_runs), dtype=w0.dtype, device=w0.device)
    for r0, r1, c0, c1 in _tiles(rows, k_runs):
        d = scratch[: n * (r1 - r0) * (c1 - c0)].view(n, r1 - r0, c1 - c0)
        for i, w in enumerate(ws):
            torch.sub(w[r0:r1, c0:c1], w0[r0:r1, c0:c1], out=d[i])
        runs = d.view(n, -1, _CHUNK).transpose(0, 1)  # (runs, N, _CHUNK)
        partial = torch.bmm(runs, runs.transpose(1, 2))
        out[r0:r1] += partial.view(r1 - r0, -1, n, n).sum(1, dtype=torch.float64)
    for r0, r1, _, _ in _tiles(rows, k - k_runs) if k_runs < k else ():
        base = w0[r0:r1, k_runs:].to(torch.float64)
        d = torch.stack([w[r0:r1, k_runs:].to(torch.float64) - base for w in ws], dim=1)  # (rows, N, tail)
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


def layer_ratio(w0: Tensor, ws: Sequence[Tensor], rows: int = 1, *, eps: float = EPS,
                clamp: bool = True) -> Ratio:
    """The ratio (one per row) of one layer: base ``w0``, fine-tuned ``ws``, all flat."""
    if len(ws) < 2:
        raise ValueError(f"Model Stock needs at least two fine-tuned models, got {len(ws)}")
    return ratio(gram(w0, ws, rows), eps=eps, clamp=clamp)


def merge_into(out: Tensor, w0: Tensor | None, ws: Sequence[Tensor], t: Tensor | None = None) -> Tensor:
    """``out = w0 + t (mean_i(ws[i]) - w0)`` with one ``t`` per row (``len(t)`` rows), or the
    plain mean of ``ws`` when ``w0`` is None. Flat tensors of one dtype; ``out`` may be ``w0``
    or ``ws[0]`` (the result is then written in place). Tile by tile, so the mean never
    leaves the cache: each input is read once and ``out`` written once."""
    rows = 1 if t is None else t.numel()
    k = out.numel() // rows
    out2, ws2 = out.view(rows, k), [w.view(rows, k) for w in ws]
    base2 = None if w0 is None else w0.view(rows, k)
    weight = None if t is None else t.to(out.dtype).view(rows, 1)
    scratch = torch.empty(min(_BLOCK, out.numel()), dtype=out.dtype, device=out.device)
    for r0, r1, c0, c1 in _tiles(rows, k):
        mean = torch.lerp(ws2[0][r0:r1, c0:c1], ws2[1][r0:r1, c0:c1], 0.5,
                          out=scratch[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
        for i in range(2, len(ws)):  # running mean
            mean.lerp_(ws2[i][r0:r1, c0:c1], 1.0 / (i + 1))
        if base2 is None:
            out2[r0:r1, c0:c1].copy_(mean)
        elif rows == 1:
            torch.lerp(base2[:, c0:c1], mean, float(t), out=out2[:, c0:c1])
        else:
            torch.lerp(base2[r0:r1, c0:c1], mean, weight[r0:r1], out=out2[r0:r1, c0:c1])
    return out


def layer_rows(shape: tuple[int, ...] | torch.Size, granularity: str) -> int:
    """How many ratios a tensor of this shape gets: 1 (``tensor``), or one per slice along
    dim 0 (``row``) for tensors of two or more dims."""
    if granularity == "tensor":
        return 1
    if granularity == "row":
        return int(shape[0]) if len(shape) >= 2 and math.prod(shape) > 0 else 1
    raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
