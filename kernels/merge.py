"""Triton kernels for Model Stock: the Gram pass and the merge pass over every layer at once.

A state dict is described by tables instead of one launch per tensor:
  ptrs      int64 (layers, N + 1)  addresses of w0, w1..wN of each layer (one storage dtype)
  out_ptrs  int64 (layers,)        addresses of each layer's output (one output dtype)
  tiles     int64 (tiles, 3)       (layer, first element, segment end) for each program
  tile_seg  int64 (tiles,)         the segment (a layer, or a row of one) each tile belongs to
  seg_tiles int64 (segments, 2)    the tiles [t0, t1) of each segment, in order
Tiles never cross a segment, so a layer of 25M elements and a bias of 768 both get full
programs, and a row-granularity layer gets one segment per row.

Gram pass: each program owns one tile and writes the (NPAD x NPAD) fp32 sums of d_i * d_j over
it (d_i = w_i - w0, loaded in the storage dtype, converted to fp32 at once) to its own slot of
a partials buffer; a second, tiny kernel adds each segment's partials in fp64, in tile order.
No atomics: the same inputs give bitwise the same Gram on every run.

Merge pass: each program owns one tile and writes w0 + t_seg * (mean_i(w_i) - w0) in the
output dtype, accumulating in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements each Gram/merge program owns, by padded model count: the (NPAD, NPAD, BLOCK)
# product stays at ~8K fp32 values per program. Each new value compiles a kernel once.
_ELEMS_PER_PROGRAM = 8192


def block_size(npad: int) -> int:
    return max(128, min(4096, _ELEMS_PER_PROGRAM // (npad * npad)))


def _npad(n: int) -> int:
    return triton.next_power_of_2(max(n, 2))


def _triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


@triton.jit
def _load_tile(ptrs, layer, offs, mask, n, stride_ptrs, NPAD: tl.constexpr, DTYPE: tl.constexpr):
    """w0 (BLOCK,) and w (NPAD, BLOCK) of one tile as fp32; rows past n are zero."""
    rows = tl.arange(0, NPAD)
    rmask = rows < n
    base = tl.load(ptrs + layer * stride_ptrs).to(tl.pointer_type(DTYPE))
    w0 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    addrs = tl.load(ptrs + layer * stride_ptrs + 1 + rows, mask=rmask, other=0)
    w = tl.load(addrs.to(tl.pointer_type(DTYPE))[:, None] + offs[None, :],
                mask=rmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
    return w0, w, rmask


@triton.jit
def _gram_tiles_kernel(ptrs, tiles, partials, n, stride_ptrs,
                       NPAD: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """partials[tile] = sum over the tile of d_i d_j, d_i = w_i - w0 (fp32, NPAD x NPAD).
    Program ``pid`` owns tile ``pid``: elements [start, min(start + BLOCK, end)) of its layer."""
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.load(tiles + pid * 3)
    start = tl.load(tiles + pid * 3 + 1)
    end = tl.load(tiles + pid * 3 + 2)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < end
    w0, w, rmask = _load_tile(ptrs, layer, offs, mask, n, stride_ptrs, NPAD, DTYPE)
    d = tl.where(rmask[:, None] & mask[None, :], w - w0[None, :], 0.0)
    g = tl.sum(d[:, None, :] * d[None, :, :], axis=2)
    rows = tl.arange(0, NPAD)
    tl.store(partials + pid * NPAD * NPAD + rows[:, None] * NPAD + rows[None, :], g)


@triton.jit
def _reduce_segments_kernel(partials, seg_tiles, gram, NN: tl.constexpr, CHUNK: tl.constexpr):
    """gram[s] = sum of partials[t0:t1] in fp64, in tile order. Program ``s`` owns segment s."""
    s = tl.program_id(0).to(tl.int64)
    t0 = tl.load(seg_tiles + s * 2)
    t1 = tl.load(seg_tiles + s * 2 + 1)
    cols = tl.arange(0, NN)
    acc = tl.zeros([CHUNK, NN], dtype=tl.float64)
    for t in range(t0, t1, CHUNK):
        idx = t + tl.arange(0, CHUNK).to(tl.int64)
        acc += tl.load(partials + idx[:, None] * NN + cols[None, :], mask=(idx < t1)[:, None], other=0.0).to(tl.float64)
    tl.store(gram + s * NN + cols, tl.sum(acc, axis=0))


@triton.jit
def _merge_tiles_kernel(ptrs, out_ptrs, tiles, tile_seg, t, n, stride_ptrs,
                        NPAD: tl.constexpr, DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """out = w0 + t[seg] * (mean_i(w_i) - w0) over one tile, in fp32, stored as OUT_DTYPE.
    Program ``pid`` owns tile ``pid``; the output may be one of the inputs (same offsets)."""
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.load(tiles + pid * 3)
    start = tl.load(tiles + pid * 3 + 1)
    end = tl.load(tiles + pid * 3 + 2)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < end
    w0, w, rmask = _load_tile(ptrs, layer, offs, mask, n, stride_ptrs, NPAD, DTYPE)
    mean = tl.sum(w, axis=0) / n
    ratio = tl.load(t + tl.load(tile_seg + pid))
    merged = w0 + ratio * (mean - w0)
    out = tl.load(out_ptrs + layer).to(tl.pointer_type(OUT_DTYPE))
    tl.store(out + offs, merged.to(OUT_DTYPE), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers: plain functions on tensors (the tables above), testable without the package.


def tile_table(numels: list[int], rows: list[int], block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile tables for layers of ``numels`` elements cut into ``rows`` segments each.
    Returns (tiles (T, 3), tile_seg (T,), seg_tiles (S, 2)), all int64 on ``device``."""
    numel = torch.tensor(numels, dtype=torch.int64)
    nrows = torch.tensor(rows, dtype=torch.int64)
    seg_layer = torch.repeat_interleave(torch.arange(len(numels)), nrows)
    seg_len = (numel // nrows)[seg_layer]
    first_seg = torch.cumsum(nrows, 0) - nrows
    seg_start = (torch.arange(len(seg_layer)) - first_seg[seg_layer]) * seg_len
    ntiles = (seg_len + block - 1) // block
    tile_seg = torch.repeat_interleave(torch.arange(len(seg_layer)), ntiles)
    first_tile = torch.cumsum(ntiles, 0) - ntiles
    within = torch.arange(len(tile_seg)) - first_tile[tile_seg]
    tiles = torch.stack([seg_layer[tile_seg], seg_start[tile_seg] + within * block,
                         (seg_start + seg_len)[tile_seg]], dim=1)
    seg_tiles = torch.stack([first_tile, first_tile + ntiles], dim=1)
    return tiles.to(device), tile_seg.to(device), seg_tiles.to(device)


def gram(ptrs: torch.Tensor, tiles: torch.Tensor, seg_tiles: torch.Tensor, n: int, dtype: torch.dtype,
         partials: torch.Tensor | None = None) -> torch.Tensor:
    """(segments, N, N) fp64 Gram matrices of the deltas; ``partials`` is reusable scratch of
    (tiles, NPAD * NPAD) fp32."""
    npad = _npad(n)
    num_tiles, num_segs = tiles.shape[0], seg_tiles.shape[0]
    if partials is None or partials.shape != (num_tiles, npad * npad):
        partials = torch.empty(num_tiles, npad * npad, dtype=torch.float32, device=tiles.device)
    out = torch.empty(num_segs, npad * npad, dtype=torch.float64, device=tiles.device)
    if num_tiles:
        _gram_tiles_kernel[(num_tiles,)](ptrs, tiles, partials, n, ptrs.stride(0),
                                         NPAD=npad, DTYPE=_triton_dtype(dtype), BLOCK=block_size(npad))
    if num_segs:
        _reduce_segments_kernel[(num_segs,)](partials, seg_tiles, out, NN=npad * npad, CHUNK=64)
    return out.view(num_segs, npad, npad)[:, :n, :n]


def merge(ptrs: torch.Tensor, out_ptrs: torch.Tensor, tiles: torch.Tensor, tile_seg: torch.Tensor,
          t: torch.Tensor, n: int, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """Write every layer's merged weights (``t``: fp32, one per segment) to ``out_ptrs``."""
    npad = _npad(n)
    if tiles.shape[0]:
        _merge_tiles_kernel[(tiles.shape[0],)](ptrs, out_ptrs, tiles, tile_seg, t, n, ptrs.stride(0),
                                               NPAD=npad, DTYPE=_triton_dtype(dtype),
                                               OUT_DTYPE=_triton_dtype(out_dtype), BLOCK=block_size(npad))
