"""Model Stock's math for one layer, in plain PyTorch (the executable form of
``docs/spec.md``, "Model Stock"); what in-memory merges of CPU tensors run on.

A layer is given flat: the pre-trained ``w0`` and the fine-tuned ``ws = [w1..wN]``, all of one
floating dtype (the compute dtype). With ``rows > 1`` (granularity ``row``) every row of the
``(rows, numel / rows)`` layer (a slice along dim 0) gets a ratio of its own.

    d_i    = w_i - w0
    G_ij   = <d_i, d_j>                 runs of 256 products in the compute dtype, runs in fp64
    t      = ratio(G)                   (modelstock/ratio.py)
    merged = w0 + t mean_i(d_i)       the spec's w0 + t (mean_i(w_i) - w0), with the mean
                                        taken of the deltas (fewer roundings: merge_into)

``modelstock/backends/numpy_ops.py`` is the same math on numpy arrays for the torch-free file merge;
the tests hold the two to each other and to an fp64 formula. Both provide the names
``gram, merge_into, all_finite, cast, widen, equal, maximum`` that ``modelstock/layer.py`` calls.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .ratio import EPS, Ratio, layer_rows, ratio  # noqa: F401  (re-exported: the whole spec in one place)
from .tiles import BLOCK, CHUNK, tiles

def gram(w0: Tensor, ws: Sequence[Tensor], rows: int = 1) -> Tensor:
    """``(rows, N, N)`` fp64 Gram matrices of the deltas ``d_i = ws[i] - w0``.

    The deltas are formed in the inputs' dtype (fp32: each rounded once, as the spec's "fp32
    arithmetic"), their products summed in runs of ``CHUNK`` and the runs' sums added in fp64,
    which keeps cos within ~1e-9 of the fp64 formula on 25M-element layers. (A plain fp32
    ``d1 @ d2`` there is off by ~1e-3: BLAS accumulates the whole layer in sequence.)
    """
    n = len(ws)
    k = w0.numel() // rows
    w0 = w0.view(rows, k)
    ws = [w.view(rows, k) for w in ws]
    out = torch.zeros(rows, n, n, dtype=torch.float64, device=w0.device)
    k_runs = k // CHUNK * CHUNK  # columns covered by whole runs; the rest go through fp64
    scratch = torch.empty(n * min(BLOCK, rows * k_runs), dtype=w0.dtype, device=w0.device)
    for r0, r1, c0, c1 in tiles(rows, k_runs):
        d = scratch[: n * (r1 - r0) * (c1 - c0)].view(n, r1 - r0, c1 - c0)
        for i, w in enumerate(ws):
            torch.sub(w[r0:r1, c0:c1], w0[r0:r1, c0:c1], out=d[i])
        runs = d.view(n, -1, CHUNK).transpose(0, 1)  # (runs, N, CHUNK)
        partial = torch.bmm(runs, runs.transpose(1, 2))
        out[r0:r1] += partial.view(r1 - r0, -1, n, n).sum(1, dtype=torch.float64)
    for r0, r1, _, _ in tiles(rows, k - k_runs) if k_runs < k else ():
        base = w0[r0:r1, k_runs:].to(torch.float64)
        d = torch.stack([w[r0:r1, k_runs:].to(torch.float64) - base for w in ws], dim=1)  # (rows, N, tail)
        out[r0:r1] += torch.bmm(d, d.transpose(1, 2))
    return out


def merge_into(out: Tensor, w0: Tensor | None, ws: Sequence[Tensor], t=None, weights=None) -> Tensor:
    """``out = w0 + t mean_i(w_i - w0)`` with one ``t`` per row (``len(t)`` rows); the plain
    mean ``(ws[0] + ... + ws[N-1]) / N`` when ``w0`` is None. Flat tensors of one dtype; ``out``
    may be ``w0`` or ``ws[0]``. Tile by tile, so the intermediates stay in cache.
    ``weights`` ((rows, N), a merge method's per-model weights, ``modelstock/methods``): the
    mean is of ``weights[:, i] * (w_i - w0)``; None is all ones (no product at all).

    The spec's ``w0 + t (mean_i(w_i) - w0)``, with the mean taken of the deltas: a fine-tuned
    w_i is near w0, so w_i - w0 is exact (or nearly) and the mean of the deltas rounds at the
    deltas' magnitude; the mean of the weights rounds at the weights', an error that the
    subtraction keeps. The only rounding at the weights' magnitude is then the final add."""
    rows = 1 if t is None else len(t)
    k = out.numel() // rows
    out2, ws2 = out.view(rows, k), [w.view(rows, k) for w in ws]
    base2 = None if w0 is None else w0.view(rows, k)
    weight = None if t is None else torch.as_tensor(t, dtype=out.dtype, device=out.device).view(rows, 1)
    per_model = None if weights is None else torch.as_tensor(weights, dtype=out.dtype, device=out.device).view(rows, -1)
    scratch = torch.empty(2, min(BLOCK, out.numel()), dtype=out.dtype, device=out.device)
    for r0, r1, c0, c1 in tiles(rows, k):
        tile = (slice(r0, r1), slice(c0, c1))
        mean, d = (s[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0) for s in scratch)
        if base2 is None:
            torch.add(ws2[0][tile], ws2[1][tile], out=mean)
            for w in ws2[2:]:
                mean.add_(w[tile])
            out2[tile].copy_(mean.div_(len(ws)))
        else:
            torch.sub(ws2[0][tile], base2[tile], out=mean)
            if per_model is not None:
                mean.mul_(per_model[r0:r1, :1])
            for i, w in enumerate(ws2[1:], 1):
                torch.sub(w[tile], base2[tile], out=d)
                mean.add_(d if per_model is None else d.mul_(per_model[r0:r1, i: i + 1]))
            mean.div_(len(ws)).mul_(weight[r0:r1])
            torch.add(base2[tile], mean, out=out2[tile])
    return out


def all_finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def cast(x: Tensor, dtype: str, out: Tensor | None = None) -> Tensor:
    """``x`` in the dtype named ``dtype`` ("bfloat16", ...), into ``out`` when given."""
    target = getattr(torch, dtype)
    return x.to(target) if out is None else out.copy_(x)


def widen(x: Tensor, dtype: str) -> Tensor:
    """A tensor stored as ``dtype`` in fp32 (the inverse of ``cast``)."""
    return x.float()


def maximum(arrays: Sequence[Tensor]) -> Tensor:
    """The elementwise largest of same-shaped tensors, in the first one's dtype and device."""
    out = arrays[0].clone()
    for a in arrays[1:]:
        torch.maximum(out, a.to(device=out.device, dtype=out.dtype), out=out)
    return out


def equal(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b.to(a.device))
