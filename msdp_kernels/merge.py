"""Triton kernels for Model Stock: the Gram pass and the merge pass over every layer at once.

A state dict is described by tables instead of one launch per tensor:
  base, offs      one tensor of the group and int64 (layers, N + 1) element offsets from it to
                  w0, w1..wN of each layer (one storage dtype per launch)
  out, out_offs   the same for each layer's output (one output dtype per launch)
  tiles           int64 (tiles, 3): (layer, first element, end) of each program's tile
  tile_seg        int64 (tiles,): the segment (a layer, or a row of one) each tile belongs to
  seg_tiles       int64 (segments, 2): the tiles [t0, t1) of each segment, in order
Tiles never cross a segment, so a 25M-element embedding and a 768-element bias both run full
programs, and a row-granularity layer gets one segment per row. Offsets from one typed base
pointer (rather than raw addresses) let Triton see the alignment: with ALIGNED (every offset
and segment start a multiple of 8 elements, checked by the launcher) whole chunks load as
16-byte vectors, and only a segment's last chunk is masked.

A tile is CHUNKS chunks of BLOCK elements: the program loops over its full chunks with
``tl.range(..., num_stages=STAGES)``, which Triton turns into asynchronous copies into shared
memory, STAGES - 1 chunks ahead, so the bytes in flight no longer cost registers. This matters
for 2-byte dtypes: registers per element are the same in every dtype (the arithmetic is fp32),
so with one chunk per program a bf16 program has half the bytes in flight that an fp32 one has
(compiled for sm_90: 48 registers, 10 programs per SM, 60 KB vs 120 KB per SM); 4 chunks with
3 stages keep 48 registers and ~180 KB in flight. The setting is per storage itemsize
(``pipeline``), the tile table carries each tile's extent, and the kernels follow it.

Gram pass: each program owns one tile and writes the (NPAD x NPAD) fp32 sums of d_i * d_j over
it (d_i = w_i - w0, loaded in the storage dtype, converted to fp32 at once) to its own slot of
a partials buffer; a second, tiny kernel adds each segment's partials in fp64, in tile order.
No atomics: the same inputs give bitwise the same Gram on every run.

Merge pass: each program owns one tile and writes w0 + t_seg * mean_i(u_seg,i (w_i - w0)) in the
output dtype, accumulating in fp32 (the mean of the deltas, as ``modelstock/reference.py``:
the only rounding at the weights' magnitude is the final add). ``t`` and ``u`` are a merge
method's per-segment coefficients (``modelstock/methods``: c_i = t u_i / N); the kernel knows no
method. Model Stock's u is all ones, and x * 1 is exact, so its bytes are those of the mean.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Elements per chunk, by padded model count: the (NPAD, NPAD, BLOCK) products of a chunk stay at
# CHUNK_ELEMS fp32 values (BLOCK = 1024 for N = 2). Chosen by a sweep on an H200 with one chunk
# per program (benchmarks/results/gpu-merge-sweep-*.json: 4096 and 4 warps beat 2048..65536 and
# 2..16 warps on ViT-bigG-14 in fp32 and bf16). The environment variables are for such sweeps
# (benchmarks/gpu_check.sh with SWEEP=1); each new value compiles a kernel once.
_CHUNK_ELEMS = int(os.environ.get("MODELSTOCK_MERGE_ELEMS", 4096))
_NUM_WARPS = int(os.environ.get("MODELSTOCK_MERGE_WARPS", 4))
_ALIGN = 8  # elements: 16 bytes of bf16, 32 of fp32


def _parse_pipeline(spec: str) -> dict[int, tuple[int, int]]:
    """"2:4x3,4:1x1" -> {2: (4, 3), 4: (1, 1)}: itemsize -> (chunks per tile, stages)."""
    out = {}
    for part in spec.split(","):
        size, setting = part.split(":")
        chunks, stages = setting.split("x")
        out[int(size)] = (int(chunks), int(stages))
    return out


# (chunks per tile, pipeline stages) by storage itemsize. 4 and 8 bytes: one chunk, as measured
# on the H200 (fp32 at 80-92% of the copy bandwidth). 2 bytes: 4 chunks, 3 stages, chosen from
# the compiled code (module docstring), not yet timed on a GPU. MODELSTOCK_MERGE_PIPELINE
# (same syntax as the default) is for the sweep in benchmarks/gpu_check.sh.
_PIPELINE = _parse_pipeline(os.environ.get("MODELSTOCK_MERGE_PIPELINE", "2:4x3,4:1x1,8:1x1"))


def block_size(npad: int) -> int:
    """Elements per chunk (BLOCK)."""
    return max(128, min(8192, _CHUNK_ELEMS // (npad * npad)))


def pipeline(itemsize: int) -> tuple[int, int]:
    return _PIPELINE.get(itemsize, (1, 1))


def tile_size(npad: int, itemsize: int) -> int:
    """Elements per program (per tile) for a storage dtype of ``itemsize`` bytes."""
    return block_size(npad) * pipeline(itemsize)[0]


def padded_models(n: int) -> int:
    return triton.next_power_of_2(max(n, 2))


@triton.jit
def _offsets(offs_tab, layer, stride, n, NPAD: tl.constexpr, ALIGNED: tl.constexpr):
    """The offsets of w0 and of w1..wN (NPAD, rows past n masked) of one layer."""
    rows = tl.arange(0, NPAD)
    rmask = rows < n
    off0 = tl.load(offs_tab + layer * stride)
    offw = tl.load(offs_tab + layer * stride + 1 + rows, mask=rmask, other=0)
    if ALIGNED:
        off0 = tl.multiple_of(off0, 8)
        offw = tl.multiple_of(offw, 8)
    return off0, offw, rmask


@triton.jit
def _load_chunk(base, off0, offw, rmask, idx, mask, MASKED: tl.constexpr):
    """w0 (BLOCK,) and w (NPAD, BLOCK) of one chunk as fp32; rows past n are zero."""
    if MASKED:
        w0 = tl.load(base + off0 + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(base + offw[:, None] + idx[None, :], mask=rmask[:, None] & mask[None, :], other=0.0)
    else:
        w0 = tl.load(base + off0 + idx).to(tl.float32)
        w = tl.load(base + offw[:, None] + idx[None, :], mask=rmask[:, None], other=0.0)
    return w0, w.to(tl.float32)


@triton.jit
def _tile(tiles, pid, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """(layer, first element, end, the indices of the first chunk, the number of full chunks)."""
    layer = tl.load(tiles + pid * 3)
    start = tl.load(tiles + pid * 3 + 1)
    end = tl.load(tiles + pid * 3 + 2)
    if ALIGNED:
        start = tl.multiple_of(start, 8)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    return layer, start, end, idx, (end - start) // BLOCK


@triton.jit
def _gram_chunk(base, off0, offw, rmask, idx, mask, MASKED: tl.constexpr):
    """The (NPAD, NPAD) fp32 sums of d_i d_j over one chunk."""
    w0, w = _load_chunk(base, off0, offw, rmask, idx, mask, MASKED)
    if MASKED:
        d = tl.where(rmask[:, None] & mask[None, :], w - w0[None, :], 0.0)
    else:
        d = tl.where(rmask[:, None], w - w0[None, :], 0.0)
    return tl.sum(d[:, None, :] * d[None, :, :], axis=2)


@triton.jit
def _gram_tiles_kernel(base, offs_tab, tiles, partials, n, stride, NPAD: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr, CHUNKS: tl.constexpr, STAGES: tl.constexpr):
    """partials[tile] = sum over the tile of d_i d_j, d_i = w_i - w0 (fp32, NPAD x NPAD).
    Program ``pid`` owns tile ``pid``: elements [start, end) of its layer, BLOCK at a time. One
    chunk per tile: whole or masked; several: full chunks pipelined, then the masked rest.
    (Separate code for one chunk: the loop's form costs it registers, so occupancy.)"""
    pid = tl.program_id(0).to(tl.int64)
    layer, start, end, idx, full = _tile(tiles, pid, ALIGNED, BLOCK)
    off0, offw, rmask = _offsets(offs_tab, layer, stride, n, NPAD, ALIGNED)
    if CHUNKS == 1:
        if start + BLOCK <= end:
            g = _gram_chunk(base, off0, offw, rmask, idx, None, False)
        else:
            g = _gram_chunk(base, off0, offw, rmask, idx, idx < end, True)
    else:
        g = tl.zeros([NPAD, NPAD], dtype=tl.float32)
        for c in tl.range(0, full, num_stages=STAGES):
            g += _gram_chunk(base, off0, offw, rmask, idx + c * BLOCK, None, False)
        rest = idx + full * BLOCK
        if start + full * BLOCK < end:
            g += _gram_chunk(base, off0, offw, rmask, rest, rest < end, True)
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
def _merge_chunk(base, off0, offw, rmask, out, idx, mask, ratio, u, n, MASKED: tl.constexpr):
    w0, w = _load_chunk(base, off0, offw, rmask, idx, mask, MASKED)
    d = tl.where(rmask[:, None], (w - w0[None, :]) * u[:, None], 0.0)  # rows past n: no delta
    merged = (w0 + ratio * (tl.sum(d, axis=0) / n)).to(out.dtype.element_ty)
    if MASKED:
        tl.store(out + idx, merged, mask=mask)
    else:
        tl.store(out + idx, merged)


@triton.jit
def _merge_tiles_kernel(base, offs_tab, out, out_offs, tiles, tile_seg, t, u_tab, ok, n, stride, NPAD: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, STAGES: tl.constexpr):
    """out = w0 + t[seg] * mean_i(u[seg, i] (w_i - w0)) over one tile, in fp32, stored in out's
    dtype (u: (segments, NPAD) fp32).
    Program ``pid`` owns tile ``pid``, chunked as in the Gram pass; the output may be one of the
    inputs (same offsets): every element is loaded before it is stored. Nothing is written
    when ``ok[0]`` is 0 (some ratio is not finite): the launch need not wait for the host's
    check, which comes after it and raises."""
    if tl.load(ok) == 0:
        return
    pid = tl.program_id(0).to(tl.int64)
    layer, start, end, idx, full = _tile(tiles, pid, ALIGNED, BLOCK)
    off0, offw, rmask = _offsets(offs_tab, layer, stride, n, NPAD, ALIGNED)
    seg = tl.load(tile_seg + pid)
    ratio = tl.load(t + seg)
    u = tl.load(u_tab + seg * NPAD + tl.arange(0, NPAD), mask=rmask, other=0.0)
    o = tl.load(out_offs + layer)
    if ALIGNED:
        o = tl.multiple_of(o, 8)
    dst = out + o
    if CHUNKS == 1:
        if start + BLOCK <= end:
            _merge_chunk(base, off0, offw, rmask, dst, idx, None, ratio, u, n, False)
        else:
            _merge_chunk(base, off0, offw, rmask, dst, idx, idx < end, ratio, u, n, True)
    else:
        for c in tl.range(0, full, num_stages=STAGES):
            _merge_chunk(base, off0, offw, rmask, dst, idx + c * BLOCK, None, ratio, u, n, False)
        rest = idx + full * BLOCK
        if start + full * BLOCK < end:
            _merge_chunk(base, off0, offw, rmask, dst, rest, rest < end, ratio, u, n, True)


# ---------------------------------------------------------------------------------------------
# Launchers: plain functions on tensors (the tables above), testable without the package.


def tile_table(numels: list[int], rows: list[int], block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile tables for layers of ``numels`` elements cut into ``rows`` segments each, in
    tiles of ``block`` elements (``tile_size``; the last of each segment shorter).
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
    first = seg_start[tile_seg] + within * block
    tiles = torch.stack([seg_layer[tile_seg], first, torch.minimum(first + block, (seg_start + seg_len)[tile_seg])],
                        dim=1)
    seg_tiles = torch.stack([first_tile, first_tile + ntiles], dim=1)
    return tiles.to(device), tile_seg.to(device), seg_tiles.to(device)


class Addresses:
    """Element offsets of tensors of one dtype from the lowest-addressed of them (the base)."""

    def __init__(self, tensors: list[list[torch.Tensor]], device):
        flat = [t for ts in tensors for t in ts]
        self.base = min(flat, key=lambda t: t.data_ptr())
        size = self.base.element_size()
        addr = torch.tensor([[t.data_ptr() for t in ts] for ts in tensors], dtype=torch.int64)
        delta = addr - self.base.data_ptr()
        if bool((delta % size).any()):
            raise ValueError("tensors of one dtype must be aligned to their element size")
        self.offs = (delta // size).to(device)
        self.aligned = self.base.data_ptr() % 16 == 0 and not bool((delta // size % _ALIGN).any())


def aligned(seg_starts_ok: bool, *addresses: Addresses) -> bool:
    """Whether whole chunks may load as aligned vectors (see the module docstring)."""
    return seg_starts_ok and all(a.aligned for a in addresses)


def gram(inputs: Addresses, tiles: torch.Tensor, seg_tiles: torch.Tensor, n: int, is_aligned: bool,
         partials: torch.Tensor | None = None) -> torch.Tensor:
    """(segments, N, N) fp64 Gram matrices of the deltas; ``partials`` is reusable scratch of
    (tiles, NPAD * NPAD) fp32."""
    npad = padded_models(n)
    chunks, stages = pipeline(inputs.base.element_size())
    num_tiles, num_segs = tiles.shape[0], seg_tiles.shape[0]
    if partials is None or partials.shape != (num_tiles, npad * npad):
        partials = torch.empty(num_tiles, npad * npad, dtype=torch.float32, device=tiles.device)
    out = torch.empty(num_segs, npad * npad, dtype=torch.float64, device=tiles.device)
    if num_tiles:
        _gram_tiles_kernel[(num_tiles,)](inputs.base, inputs.offs, tiles, partials, n, inputs.offs.stride(0),
                                         NPAD=npad, ALIGNED=is_aligned, BLOCK=block_size(npad),
                                         CHUNKS=chunks, STAGES=stages, num_warps=_NUM_WARPS)
    if num_segs:
        _reduce_segments_kernel[(num_segs,)](partials, seg_tiles, out, NN=npad * npad, CHUNK=64)
    return out.view(num_segs, npad, npad)[:, :n, :n]


def merge(inputs: Addresses, outputs: Addresses, tiles: torch.Tensor, tile_seg: torch.Tensor, t: torch.Tensor,
          n: int, is_aligned: bool, ok: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """Write every layer's merged weights (``t``: fp32, one per segment; ``weights``: fp32
    (segments, n) per-model weights, None for all ones) to the outputs, unless ``ok`` (int32
    (1,), on the device) is 0."""
    npad = padded_models(n)
    chunks, stages = pipeline(inputs.base.element_size())
    u = _ones(t.shape[0], npad, t.device) if weights is None else \
        torch.nn.functional.pad(weights.to(torch.float32), (0, npad - n)).contiguous()
    if tiles.shape[0]:
        _merge_tiles_kernel[(tiles.shape[0],)](inputs.base, inputs.offs, outputs.base, outputs.offs.view(-1), tiles,
                                               tile_seg, t, u, ok, n, inputs.offs.stride(0),
                                               NPAD=npad, ALIGNED=is_aligned, BLOCK=block_size(npad),
                                               CHUNKS=chunks, STAGES=stages, num_warps=_NUM_WARPS)


_ONES: dict = {}


def _ones(segments: int, npad: int, device) -> torch.Tensor:
    """All-ones weights, made once per shape and device (a merge every few training steps
    allocates nothing)."""
    key = (segments, npad, str(device))
    if key not in _ONES:
        if len(_ONES) > 8:
            _ONES.clear()
        _ONES[key] = torch.ones(segments, npad, dtype=torch.float32, device=device)
    return _ONES[key]
