"""Triton kernels for DynOPool (``docs/spec.md``, "DynOPool"): forward, and the backward to x and
to (alpha, delta). ``dynopool/reference.py`` is the truth they are held to.

Coordinates. Every output cell (i, j) reads query rows y_(i,k) and columns u_(j,l), k, l in
{0, 1}; they depend on alpha, delta and the sizes only, so one tiny kernel (``coordinates``)
computes them once per row and column into a table, with the two factors the backward needs
per query row: d y / d alpha (through the straight-through cell size) and d y / d delta, both
zero where the clamp acts. The other kernels read taps off that table, so forward and backward
agree bit for bit on every tap and weight. The same program then counts, for every input row
and column, the query cells whose taps touch it (the ranges the gradient to x gathers over).

Table layout (fp32, flat): [y_h (2 H_out) | fa_h (2 H_out) | fd_h (2 H_out) | y_w (2 W_out) |
fa_w (2 W_out) | fd_w (2 W_out)], query r = 2 i + k (interleaved, as in the reference).

Forward: a program owns one output row i of one image n, a block of columns j and a block of
channels c. It loads the 4 query rows' taps as scalars and its columns' taps once, gathers the
16 taps of each output, takes the max over the 4 queries (ties to the first of (0,0), (0,1),
(1,0), (1,1); NaN wins, as max_pool2d), and writes the output and the winner (2 bits in an
int8). Storing the winner costs 1 byte per output (1/16 of an fp32 input at alpha = 2) and
spares the backward the 16-tap recompute: the gradient to x gathers from up to ~9 outputs per
pixel, and would otherwise redo each one's max. (Decided by that count, not yet by a GPU
measurement against recomputing.)

Backward to alpha and delta (``coordinate_grads``): the forward's tiling, ROWS rows per program; each output
sends its gradient to its winning query only, whose bilinear value has
    d q / d y = (1 - wu) (x[y1,u0] - x[y0,u0]) + wu (x[y1,u1] - x[y0,u1])
    d q / d u = (1 - wy) (x[y0,u1] - x[y0,u0]) + wy (x[y1,u1] - x[y1,u0])
(y0 = floor(y): one-sided toward y + 1 at integers; zero when both taps are the last row; a
term of zero weight left out, and a slope that is not finite counted as zero).
Times the table's per-query factors, summed over the program's rows: 4 fp32 partial sums per
program (alpha_h, alpha_w, delta_h, delta_w), added in fp64 by the launcher. No atomics.

Backward to x (``input_grad``): a gather, not a scatter. Each program owns one input row h of
one image, a block of columns w and of channels c, and sums the gradients of the outputs whose
winning query has a tap on its pixels: query rows of family k touching row h are those with
y in [h - 1, h + 1), a contiguous range of i because y is non-decreasing in i (``ranges``
counts them once per forward, with the table); the same along the width. Deterministic (fixed order, no
atomics), no fp32 scratch the size of x, and each x element is written once in its dtype.

Layouts: explicit strides everywhere (NCHW, channels_last, or any view); offsets in int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Output (or input) elements per program of the three big kernels. Not yet tuned on a GPU:
# MODELSTOCK_DYNOPOOL_ELEMS / _WARPS are for a sweep there (SWEEP=1 benchmarks/gpu_check.sh).
# Compiled for sm_90 (ptxas -v), 1024 elements on 4 warps take ~150 registers per thread in
# the forward and backward kernels (the 16 taps are loaded before they are combined): 3
# programs per SM; smaller tiles trade that for more programs.
_ELEMS = int(os.environ.get("MODELSTOCK_DYNOPOOL_ELEMS", 1024))
_NUM_WARPS = int(os.environ.get("MODELSTOCK_DYNOPOOL_WARPS", 4))
_RANGE_BLOCK = 64  # input rows (columns) per step of the ranges loop
# Output rows per program of the alpha/delta gradient: one set of block-wide reductions per
# ROWS rows. With one row the kernel took 2.0 ms at [128, 64, 224, 224] bf16 on an H200, 5x the
# forward, which loads 4x the taps (066fe5b's profile); four reductions and stores per 1024
# outputs are our suspect (not yet confirmed by a profile of this version).
_GRAD_ROWS = int(os.environ.get("MODELSTOCK_DYNOPOOL_GRAD_ROWS", 8))


# --------------------------------------------------------------------------- coordinates

@triton.jit
def _axis_coordinates(alpha_ptr, delta_ptr, tab, size, out, BLOCK: tl.constexpr):
    """y, d y / d alpha and d y / d delta of the 2 * out queries of one axis."""
    a = tl.load(alpha_ptr)
    d = tl.load(delta_ptr)
    # `+ 0.0`, not .to(): an integer argument equal to 1 arrives as a constexpr on a GPU
    size_f = size + 0.0
    out_f = out + 0.0
    s = size_f / out_f  # the straight-through cell count has the value `out`
    # d s / d alpha = (-size / out^2) * d(size / alpha) / d alpha = size^2 / (out^2 alpha^2)
    ds_da = (size_f / (out_f * out_f)) * (size_f / (a * a))
    spread = d * s
    for start in range(0, 2 * out, BLOCK):
        r = start + tl.arange(0, BLOCK)
        live = r < 2 * out
        i = (r // 2).to(tl.float32)
        sign = (r % 2).to(tl.float32) * 2.0 - 1.0
        y = ((i + 0.5) * s - 0.5) + sign * spread
        inside = (y >= 0.0) & (y <= size_f - 1.0)
        tl.store(tab + r, tl.minimum(tl.maximum(y, 0.0), size_f - 1.0), mask=live)
        tl.store(tab + 2 * out + r, tl.where(inside, ((i + 0.5) + sign * d) * ds_da, 0.0), mask=live)
        tl.store(tab + 4 * out + r, tl.where(inside, sign * s, 0.0), mask=live)


@triton.jit
def _axis_ranges(ytab, rng, size, out, h0, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr):
    """For input rows h0..h0+BLOCK_S of one axis and each family k, the query range
    [lo, hi) = [#{i: y_ik < h - 1}, #{i: y_ik < h + 1}) of the cells whose tap touches h."""
    h = h0 + tl.arange(0, BLOCK_S)
    hf = h.to(tl.float32)
    lo0 = tl.zeros([BLOCK_S], dtype=tl.int32)
    hi0 = tl.zeros([BLOCK_S], dtype=tl.int32)
    lo1 = tl.zeros([BLOCK_S], dtype=tl.int32)
    hi1 = tl.zeros([BLOCK_S], dtype=tl.int32)
    for start in range(0, out, BLOCK_Q):
        i = start + tl.arange(0, BLOCK_Q)
        live = (i < out)[None, :]
        y0 = tl.load(ytab + 2 * i, mask=i < out, other=0.0)[None, :]
        y1 = tl.load(ytab + 2 * i + 1, mask=i < out, other=0.0)[None, :]
        lo0 += tl.sum((live & (y0 < hf[:, None] - 1.0)).to(tl.int32), axis=1)
        hi0 += tl.sum((live & (y0 < hf[:, None] + 1.0)).to(tl.int32), axis=1)
        lo1 += tl.sum((live & (y1 < hf[:, None] - 1.0)).to(tl.int32), axis=1)
        hi1 += tl.sum((live & (y1 < hf[:, None] + 1.0)).to(tl.int32), axis=1)
    m = h < size
    tl.store(rng + h * 4, lo0, mask=m)
    tl.store(rng + h * 4 + 1, hi0, mask=m)
    tl.store(rng + h * 4 + 2, lo1, mask=m)
    tl.store(rng + h * 4 + 3, hi1, mask=m)


@triton.jit
def _coordinates_kernel(alpha_ptr, delta_ptr, tab, rng, H, W, H_out, W_out,
                        BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr):
    """One program: the coordinate table of both axes, then (reading it back) the query
    ranges of every input row and column. rng is int32 (H + W, 4): lo_0, hi_0, lo_1, hi_1 per
    input row, then per input column. One launch per forward for all of it: these are tiny,
    and a launch costs the host more than the GPU."""
    _axis_coordinates(alpha_ptr, delta_ptr, tab, H, H_out, BLOCK)
    _axis_coordinates(alpha_ptr + 1, delta_ptr + 1, tab + 6 * H_out, W, W_out, BLOCK)
    tl.debug_barrier()  # the table's stores are visible to every thread of the program
    for h0 in range(0, H, BLOCK_S):
        _axis_ranges(tab, rng, H, H_out, h0, BLOCK_S, BLOCK_Q)
    for w0 in range(0, W, BLOCK_S):
        _axis_ranges(tab + 6 * H_out, rng + 4 * H, W, W_out, w0, BLOCK_S, BLOCK_Q)


# --------------------------------------------------------------------------- taps

@triton.jit
def _taps(y, size):
    """(y0, y1, w) of coordinates y in [0, size - 1] (so truncation is floor): the two taps and
    the second one's weight."""
    y0 = y.to(tl.int32)
    return y0, tl.minimum(y0 + 1, size - 1), y - y0.to(tl.float32)


@triton.jit
def _bilinear(base, y0, y1, wy, u0, u1, wu, s_h, s_w, chan, mask):
    """The bilinear value at (y, u) of the tile: base + chan addresses the tile's image and
    channels; (y0, y1, wy) and (u0, u1, wu) broadcast against it. Along W first, as the
    reference's matrix product."""
    r0 = base + y0.to(tl.int64) * s_h
    r1 = base + y1.to(tl.int64) * s_h
    c0 = u0.to(tl.int64) * s_w + chan
    c1 = u1.to(tl.int64) * s_w + chan
    a = tl.load(r0 + c0, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(r0 + c1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(r1 + c0, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(r1 + c1, mask=mask, other=0.0).to(tl.float32)
    return _mix(_mix(a, b, wu), _mix(c, d, wu), wy)


@triton.jit
def _mix(a, b, w):
    """a + w (b - a): taps a (weight 1 - w, never zero) and b (weight w in [0, 1)). Where w = 0
    the value is a, whatever b holds: a tap of zero weight contributes nothing (the spec), so
    -inf or NaN there leaves the output alone, as in max_pool2d. Where a is not finite, the
    weighted sum's value a + w b (a + w (b - a) would make -inf + inf = NaN of a -inf beside a
    finite b). Finite taps: the same arithmetic as ever."""
    m = tl.where(a - a == 0, a + w * (b - a), a + w * b)
    return tl.where(w == 0, a, m)


@triton.jit
def _slope(d0, d1, w):
    """(1 - w) d0 + w d1, the two tap columns' differences mixed (a zero-weight column
    contributes nothing), and zero where that is not finite: a difference with an infinite or
    NaN tap is a wall, not a slope (``reference.finite_or_zero``)."""
    s = tl.where(w == 0, d0, (1.0 - w) * d0 + w * d1)
    return tl.where(s - s == 0, s, 0.0)


@triton.jit
def _tile(pid, C, rows, cols, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr):
    """(n, i, j, c, mask) of the tile a program owns in a (N, C, rows, cols) tensor: one row
    i, BLOCK_J columns j, BLOCK_C channels c, as 2-D index tensors whose last dimension is the
    contiguous one: (BLOCK_J, 1) and (1, BLOCK_C) in channels_last (CL), (1, BLOCK_J) and
    (BLOCK_C, 1) in NCHW. The taps are gathers, so Triton cannot see contiguity and keeps
    the last dimension fastest across threads: the orientation is what coalesces them (a
    compile-time choice, hence constexpr). Column blocks fastest, then channel blocks, rows,
    images (neighbouring programs share taps in L2)."""
    blocks_j = tl.cdiv(cols, BLOCK_J)
    blocks_c = tl.cdiv(C, BLOCK_C)
    jb = pid % blocks_j
    t = pid // blocks_j
    cb = t % blocks_c
    t = t // blocks_c
    i = t % rows
    n = t // rows
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    c = (cb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    if CL:
        j2 = j[:, None]
        c2 = c[None, :]
    else:
        j2 = j[None, :]
        c2 = c[:, None]
    return n, i, j2, c2, (j2 < cols) & (c2 < C)


# --------------------------------------------------------------------------- forward

@triton.jit
def _forward_kernel(x, out, win, tab, C, H, W, H_out, W_out,
                    sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr):
    """out[n, c, i, j] = max over (k, l) of bilinear(x[n, c], y_ik, u_jl) for one tile
    (BLOCK_J columns x BLOCK_C channels of row i, image n); win = 2 k + l of the winner."""
    n, i, j, c, mask = _tile(tl.program_id(0).to(tl.int64), C, H_out, W_out, BLOCK_J, BLOCK_C, CL)
    ytab = tab
    xtab = tab + 6 * H_out
    a0, a1, wa = _taps(tl.load(ytab + 2 * i), H)
    b0, b1, wb = _taps(tl.load(ytab + 2 * i + 1), H)
    # shaped like j: one load per column
    u0, u1, wu = _taps(tl.load(xtab + 2 * j, mask=j < W_out, other=0.0), W)
    v0, v1, wv = _taps(tl.load(xtab + 2 * j + 1, mask=j < W_out, other=0.0), W)
    base = x + n * sx_n
    chan = c * sx_c
    best = _bilinear(base, a0, a1, wa, u0, u1, wu, sx_h, sx_w, chan, mask)
    arg = tl.zeros(best.shape, dtype=tl.int32)
    q = _bilinear(base, a0, a1, wa, v0, v1, wv, sx_h, sx_w, chan, mask)
    take = (q > best) | (q != q)  # strictly greater keeps the first of ties; NaN wins
    best = tl.where(take, q, best)
    arg = tl.where(take, 1, arg)
    q = _bilinear(base, b0, b1, wb, u0, u1, wu, sx_h, sx_w, chan, mask)
    take = (q > best) | (q != q)
    best = tl.where(take, q, best)
    arg = tl.where(take, 2, arg)
    q = _bilinear(base, b0, b1, wb, v0, v1, wv, sx_h, sx_w, chan, mask)
    take = (q > best) | (q != q)
    best = tl.where(take, q, best)
    arg = tl.where(take, 3, arg)
    o = n * so_n + i * so_h + j.to(tl.int64) * so_w + c * so_c
    tl.store(out + o, best.to(out.dtype.element_ty), mask=mask)
    tl.store(win + o, arg.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------- backward

@triton.jit
def _coordinate_grads_kernel(x, grad, win, tab, partials, C, H, W, H_out, W_out,
                             sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
                             ROWS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                             CL: tl.constexpr):
    """partials[pid] = the sums over ROWS output rows of a tile of grad * d q_win / d (alpha_h,
    alpha_w, delta_h, delta_w), through the winner's coordinate derivatives and the table's
    factors. The products accumulate per element and are reduced once per program (see
    _GRAD_ROWS)."""
    pid = tl.program_id(0).to(tl.int64)
    n, group, j, c, mask_jc = _tile(pid, C, tl.cdiv(H_out, ROWS), W_out, BLOCK_J, BLOCK_C, CL)
    jj = j.to(tl.int64)
    ytab = tab
    xtab = tab + 6 * H_out
    # the columns' taps and factors for both families l (shaped like j), selected per element
    u_l0 = tl.load(xtab + 2 * j, mask=j < W_out, other=0.0)
    u_l1 = tl.load(xtab + 2 * j + 1, mask=j < W_out, other=0.0)
    fa_l0 = tl.load(xtab + 2 * W_out + 2 * j, mask=j < W_out, other=0.0)
    fa_l1 = tl.load(xtab + 2 * W_out + 2 * j + 1, mask=j < W_out, other=0.0)
    fd_l0 = tl.load(xtab + 4 * W_out + 2 * j, mask=j < W_out, other=0.0)
    fd_l1 = tl.load(xtab + 4 * W_out + 2 * j + 1, mask=j < W_out, other=0.0)
    base = x + n * sx_n + c * sx_c
    acc_ya = tl.zeros(mask_jc.shape, dtype=tl.float32)
    acc_ua = tl.zeros(mask_jc.shape, dtype=tl.float32)
    acc_yd = tl.zeros(mask_jc.shape, dtype=tl.float32)
    acc_ud = tl.zeros(mask_jc.shape, dtype=tl.float32)
    for r in range(ROWS):
        i = group * ROWS + r
        mask = mask_jc & (i < H_out)
        g = tl.load(grad + n * sg_n + i * sg_h + jj * sg_w + c * sg_c, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(win + n * so_n + i * so_h + jj * so_w + c * so_c, mask=mask, other=0).to(tl.int32)
        k1 = (w >> 1) == 1
        l1 = (w & 1) == 1
        # the winner's query row: both families' values are scalars of the row
        i_t = tl.minimum(i, H_out - 1)
        y = tl.where(k1, tl.load(ytab + 2 * i_t + 1), tl.load(ytab + 2 * i_t))
        fa_y = tl.where(k1, tl.load(ytab + 2 * H_out + 2 * i_t + 1), tl.load(ytab + 2 * H_out + 2 * i_t))
        fd_y = tl.where(k1, tl.load(ytab + 4 * H_out + 2 * i_t + 1), tl.load(ytab + 4 * H_out + 2 * i_t))
        ya, yb, wy = _taps(y, H)
        ua, ub, wu = _taps(tl.where(l1, u_l1, u_l0), W)
        ra = base + ya.to(tl.int64) * sx_h
        rb = base + yb.to(tl.int64) * sx_h
        ca = ua.to(tl.int64) * sx_w
        cb = ub.to(tl.int64) * sx_w
        x00 = tl.load(ra + ca, mask=mask, other=0.0).to(tl.float32)
        x01 = tl.load(ra + cb, mask=mask, other=0.0).to(tl.float32)
        x10 = tl.load(rb + ca, mask=mask, other=0.0).to(tl.float32)
        x11 = tl.load(rb + cb, mask=mask, other=0.0).to(tl.float32)
        g_y = g * _slope(x10 - x00, x11 - x01, wu)
        g_u = g * _slope(x01 - x00, x11 - x10, wy)
        acc_ya += g_y * fa_y
        acc_yd += g_y * fd_y
        acc_ua += g_u * tl.where(l1, fa_l1, fa_l0)
        acc_ud += g_u * tl.where(l1, fd_l1, fd_l0)
    tl.store(partials + pid * 4, tl.sum(tl.sum(acc_ya, axis=1), axis=0))
    tl.store(partials + pid * 4 + 1, tl.sum(tl.sum(acc_ua, axis=1), axis=0))
    tl.store(partials + pid * 4 + 2, tl.sum(tl.sum(acc_yd, axis=1), axis=0))
    tl.store(partials + pid * 4 + 3, tl.sum(tl.sum(acc_ud, axis=1), axis=0))


@triton.jit
def _input_grad_kernel(grad, win, tab, rng, gx, C, H, W, H_out, W_out,
                       sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sx_n, sx_c, sx_h, sx_w,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr):
    """gx[n, c, h, w] = sum over the outputs (i, j) whose winning query (k, l) has a tap on
    (h, w) of grad[n, c, i, j] * (that tap's row weight) * (its column weight)."""
    n, h, w, c, mask = _tile(tl.program_id(0).to(tl.int64), C, H, W, BLOCK_W, BLOCK_C, CL)
    h = h.to(tl.int32)
    mw = w < W
    ytab = tab
    xtab = tab + 6 * H_out
    wrng = rng + 4 * H
    g_base = grad + n * sg_n + c * sg_c
    o_base = win + n * so_n + c * so_c
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    for k in tl.static_range(2):
        i_lo = tl.load(rng + h * 4 + 2 * k)
        i_hi = tl.load(rng + h * 4 + 2 * k + 1)
        # row pointers advance with i (the interpreter hands range() indices over as ints)
        g_row = g_base + i_lo.to(tl.int64) * sg_h
        o_row = o_base + i_lo.to(tl.int64) * so_h
        for i in range(i_lo, i_hi):
            y0, y1, wy = _taps(tl.load(ytab + 2 * i + k), H)
            w_row = tl.where(y0 == h, 1.0 - wy, 0.0) + tl.where(y1 == h, wy, 0.0)
            for l in tl.static_range(2):
                j_lo = tl.load(wrng + w * 4 + 2 * l, mask=mw, other=0)
                j_hi = tl.load(wrng + w * 4 + 2 * l + 1, mask=mw, other=0)
                for b in range(0, tl.max(tl.max(j_hi - j_lo, axis=1), axis=0)):
                    j = j_lo + b
                    live = mw & (j < j_hi)
                    u0, u1, wu = _taps(tl.load(xtab + 2 * j + l, mask=live, other=0.0), W)
                    w_col = tl.where(u0 == w, 1.0 - wu, 0.0) + tl.where(u1 == w, wu, 0.0)
                    m = live & mask
                    jj = j.to(tl.int64)
                    g = tl.load(g_row + jj * sg_w, mask=m, other=0.0).to(tl.float32)
                    won = tl.load(o_row + jj * so_w, mask=m, other=-1) == 2 * k + l
                    acc += tl.where(won, g * (w_row * w_col), 0.0)
            g_row += sg_h
            o_row += so_h
    o = n * sx_n + h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w + c * sx_c
    tl.store(gx + o, acc.to(gx.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

def _blocks(inner: int, channels: int, channels_last: bool) -> tuple[int, int]:
    """(block along W, block along C): channels first where they are contiguous."""
    if channels_last:
        bc = min(triton.next_power_of_2(channels), _ELEMS)
        return max(1, min(triton.next_power_of_2(inner), _ELEMS // bc)), bc
    bw = min(triton.next_power_of_2(inner), _ELEMS)
    return bw, max(1, min(triton.next_power_of_2(channels), _ELEMS // bw))


def is_channels_last(t: torch.Tensor) -> bool:
    """Dense channels_last (the reference's rule for its output's layout)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def table_size(h_out: int, w_out: int) -> int:
    return 6 * (h_out + w_out)


def coordinates(alpha: torch.Tensor, delta: torch.Tensor, h: int, w: int, h_out: int,
                w_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, ranges) from fp32 alpha, delta (2,) on x's device: the fp32 coordinate table
    (module docstring) and int32 (h + w, 4), per input row, then column, the query cells
    [lo_k, hi_k) touching it."""
    tab = torch.empty(table_size(h_out, w_out), dtype=torch.float32, device=alpha.device)
    rng = torch.empty(h + w, 4, dtype=torch.int32, device=alpha.device)
    block = min(1024, triton.next_power_of_2(2 * max(h_out, w_out)))
    block_q = min(256, triton.next_power_of_2(max(h_out, w_out)))
    _coordinates_kernel[(1,)](alpha, delta, tab, rng, h, w, h_out, w_out,
                              BLOCK=block, BLOCK_S=_RANGE_BLOCK, BLOCK_Q=block_q)
    return tab, rng


def _out_grid(n: int, c: int, h_out: int, w_out: int, bj: int, bc: int) -> tuple[int]:
    return (n * h_out * triton.cdiv(c, bc) * triton.cdiv(w_out, bj),)


def forward(x: torch.Tensor, tab: torch.Tensor, h_out: int, w_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, winner) for x (N, C, H, W) in any layout; out is channels_last when x is."""
    n, c, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty((n, c, h_out, w_out), dtype=x.dtype, device=x.device, memory_format=fmt)
    win = torch.empty((n, c, h_out, w_out), dtype=torch.int8, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out, win
    bj, bc = _blocks(w_out, c, fmt is torch.channels_last)
    _forward_kernel[_out_grid(n, c, h_out, w_out, bj, bc)](
        x, out, win, tab, c, h, w, h_out, w_out, *x.stride(), *out.stride(),
        BLOCK_J=bj, BLOCK_C=bc, CL=fmt is torch.channels_last, num_warps=_NUM_WARPS)
    return out, win


def coordinate_grads(x: torch.Tensor, grad: torch.Tensor, win: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
    """fp64 (4,): d loss / d (alpha_h, alpha_w, delta_h, delta_w), grad = d loss / d out."""
    n, c, h, w = x.shape
    h_out, w_out = win.shape[-2:]
    if win.numel() == 0:
        return torch.zeros(4, dtype=torch.float64, device=x.device)
    cl = is_channels_last(win)
    bj, bc = _blocks(w_out, c, cl)
    rows = min(_GRAD_ROWS, h_out)
    grid = _out_grid(n, c, triton.cdiv(h_out, rows), w_out, bj, bc)
    partials = torch.empty(grid[0], 4, dtype=torch.float32, device=x.device)
    _coordinate_grads_kernel[grid](
        x, grad, win, tab, partials, c, h, w, h_out, w_out, *x.stride(), *grad.stride(), *win.stride(),
        ROWS=rows, BLOCK_J=bj, BLOCK_C=bc, CL=cl, num_warps=_NUM_WARPS)
    return partials.sum(0, dtype=torch.float64)


def input_grad(x: torch.Tensor, grad: torch.Tensor, win: torch.Tensor, tab: torch.Tensor,
               rng: torch.Tensor) -> torch.Tensor:
    """d loss / d x in x's dtype and layout."""
    n, c, h, w = x.shape
    h_out, w_out = win.shape[-2:]
    gx = torch.empty_like(x)
    if gx.numel() == 0:
        return gx
    cl = is_channels_last(gx)
    bw, bc = _blocks(w, c, cl)
    grid = (n * h * triton.cdiv(c, bc) * triton.cdiv(w, bw),)
    _input_grad_kernel[grid](
        grad, win, tab, rng, gx, c, h, w, h_out, w_out, *grad.stride(), *win.stride(), *gx.stride(),
        BLOCK_W=bw, BLOCK_C=bc, CL=cl, num_warps=_NUM_WARPS)
    return gx
