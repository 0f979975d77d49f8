"""DynOPool (Jang, Chu, Kim, Han, CVPR 2022) in plain PyTorch: the executable form of
``docs/spec.md``, "DynOPool", differentiable in x, alpha and delta. Every other path (the
fast PyTorch path ``torch_pool.py``, the Triton kernels, the frozen module) is held to it.

Per axis (H shown; W alike), with alpha the inverse scale and delta the query spread:
    H_out = max(1, round(H / alpha))                 (round half to even)
    H_hat = H_out + (H/alpha - sg(H/alpha))          straight-through: value H_out
    s     = H / H_hat                                cell size in input pixels
    p_i   = (i + 0.5) s - 0.5                        cell centres
    y_ik  = clamp(p_i + (2k - 1) delta s, 0, H - 1)  two query rows per cell, k = 0, 1
    out[n, c, i, j] = max over (k, l) of bilinear(x[n, c], y_ik, x_jl), ties to the first of
                      (0,0), (0,1), (1,0), (1,1)

``sample_at`` is the spec literally: 4 gathered taps per query, a tap of zero weight
contributing nothing (so -inf and NaN reach exactly the outputs max_pool2d's would at
alpha = 2, delta = 1/4), the max with the spec's tie order, and the spec's gradients written
out. It is slow (4 gathers of the query grid) and meant to be read and tested against.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def check_shapes(x: Tensor, alpha: Tensor, delta: Tensor) -> None:
    """Clear errors for bad shapes and devices: no device-to-host read, so free per call."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        # bilinear sampling of integers would be truncated back to integers (2.9999995 -> 2)
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}: convert it first (x.float())")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty spatial size, got {tuple(x.shape)}")
    if alpha.numel() != 2 or delta.numel() != 2:
        raise ValueError(f"alpha and delta must hold 2 values (h, w), got {alpha.numel()} and {delta.numel()}")
    if alpha.device != x.device or delta.device != x.device:
        raise ValueError(f"alpha ({alpha.device}) and delta ({delta.device}) must be on x's device ({x.device})")


def check_inputs(x: Tensor, alpha: Tensor, delta: Tensor) -> tuple[int, int]:
    """``check_shapes``, and alpha, delta valid; returns the output size (h_out, w_out). It
    depends on alpha's value: this reads alpha and delta to the host, in one transfer."""
    check_shapes(x, alpha, delta)
    a_h, a_w, d_h, d_w = torch.cat([alpha.detach().reshape(2), delta.detach().reshape(2)]).tolist()
    check_values((a_h, a_w), (d_h, d_w))
    return output_size(x.shape[2], a_h), output_size(x.shape[3], a_w)


def check_values(alpha, delta) -> None:
    """alpha finite and > 0, delta finite (host values)."""
    if not all(math.isfinite(a) and a > 0 for a in alpha):
        raise ValueError(f"alpha (the inverse scale factor) must be finite and > 0, got {list(alpha)}")
    if not all(math.isfinite(d) for d in delta):
        raise ValueError(f"delta (the query spread) must be finite, got {list(delta)}")


def output_size(size: int, alpha: float, offset: float | None = None) -> int:
    """max(1, round(size / alpha)), rounding half to even like torch.round; with an ``offset``
    b, max(1, floor(size / alpha + b)): the rule of a layer that replaced a down-sampling
    site keeps that site's sizes at alpha = 2 (b = 0: floor(H / 2), b = 1/2: ceil(H / 2))."""
    if offset is None:
        return max(1, round(size / alpha))  # Python's round: half to even, in float64
    return max(1, math.floor(size / alpha + offset))


def straight_through_size(size: int, alpha: Tensor, out: int) -> Tensor:
    """size_hat: the value ``out`` (= output_size(size, alpha)) and the gradient of size / alpha."""
    scaled = size / alpha
    return out + (scaled - scaled.detach())


def queries(size: int, out: int, size_hat: Tensor, delta: Tensor) -> Tensor:
    """The query coordinates (2, out) of one axis, k = 0, 1, for a (continuous) size_hat."""
    s = size / size_hat
    centres = (torch.arange(out, dtype=size_hat.dtype, device=size_hat.device) + 0.5) * s - 0.5
    spread = torch.stack([-delta * s, delta * s])
    return clamp_coordinates(centres[None, :] + spread[:, None], size)


def clamp_coordinates(y: Tensor, size: int) -> Tensor:
    """y clamped to [0, size - 1], its gradient zero only strictly outside that range (the spec;
    torch.clamp's own gradient is also zero at the bounds, where the max-pool configuration
    alpha = 2, delta = 0.25 puts the first and last queries)."""
    return torch.where((y >= 0) & (y <= size - 1), y, y.detach().clamp(0, size - 1))


def _taps(y: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The two bilinear taps of coordinates y (in [0, size - 1]) and the weight of the second;
    d weight / d y = 1, the one-sided derivative toward y + 1 at integers."""
    y0 = y.floor()
    return y0.long(), (y0 + 1).clamp(max=size - 1).long(), y - y0


def interpolation_matrix(y: Tensor, size: int) -> Tensor:
    """A (len(y) x size) holding the two bilinear weights of each coordinate: A @ v samples v
    at y where v is finite (the two weights add up where both taps are the last sample)."""
    y0, y1, w1 = _taps(y, size)
    rows = torch.arange(y.numel(), device=y.device)
    a = torch.zeros(y.numel(), size, dtype=y.dtype, device=y.device)
    a.index_put_((rows, y0), 1 - w1, accumulate=True)
    return a.index_put_((rows, y1), w1, accumulate=True)


def mix(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """(1 - w) a + w b: two taps, b's weight w in [0, 1). A tap of zero weight contributes
    nothing (the spec): where w = 0 the value is a, whatever b holds (-inf, inf, NaN), so no
    0 x inf makes a NaN; a's weight 1 - w is never zero. Elsewhere the weighted sum's IEEE
    arithmetic: -inf beside a finite value gives -inf, -inf beside inf gives NaN."""
    return torch.where(w == 0, a, (1 - w) * a + w * b)


def finite_or_zero(t: Tensor) -> Tensor:
    """A slope that is not finite (a difference involving an infinite or NaN tap) counts as
    zero: a -inf region is a wall, not a slope, and alpha must not get inf or NaN from it."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def dynopool2d(x: Tensor, alpha: Tensor, delta: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """The DynOPool operator; ``alpha`` and ``delta`` are 2-element tensors (h, w). ``size``:
    the output size if the caller already knows it (it must be ``output_size`` of alpha's
    value); else alpha is read to the host and checked."""
    if size is None:
        size = check_inputs(x, alpha, delta)
    else:
        check_shapes(x, alpha, delta)
    h_out, w_out = size
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The operator's own precision, under autocast too: x is sampled in fp32 (fp64) and the
    # result returned in x's dtype, as the kernels do.
    with torch.autocast(x.device.type, enabled=False):
        alpha, delta = alpha.to(compute), delta.to(compute)
        return sample_max(x, h_out, w_out, size_hats(x.shape[2], x.shape[3], alpha, (h_out, w_out)), delta)


def size_hats(h: int, w: int, alpha: Tensor, size: tuple[int, int]) -> Tensor:
    """(H_hat, W_hat): the straight-through cell counts of both axes."""
    return torch.stack([straight_through_size(h, alpha[0], size[0]), straight_through_size(w, alpha[1], size[1])])


def interleaved_queries(h: int, w: int, h_out: int, w_out: int, size_hat: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """The query rows (2 h_out) and columns (2 w_out), interleaved (row 2i + k, column 2j + l),
    so each cell's 4 queries form a 2 x 2 window of the query grid and the max over them is a
    stride-2 max pooling of that grid."""
    return (queries(h, h_out, size_hat[0], delta[0]).T.reshape(-1),
            queries(w, w_out, size_hat[1], delta[1]).T.reshape(-1))


def fixed_taps(h: int, w: int, alpha: Tensor, delta: Tensor, size: tuple[int, int]) -> tuple[Tensor, ...]:
    """The taps (y0, y1, wy, u0, u1, wu) of every interleaved query row and column, for an
    input of h x w, output ``size`` and parameter values that no longer change: the same
    coordinates ``dynopool2d`` computes per call (fp32), as constants."""
    with torch.no_grad():
        alpha, delta = alpha.detach().to(torch.float32), delta.detach().to(torch.float32)
        yq, xq = interleaved_queries(h, w, size[0], size[1], size_hats(h, w, alpha, size), delta)
        return _taps(yq, h) + _taps(xq, w)


def sample_max_fixed(x: Tensor, y0: Tensor, y1: Tensor, wy: Tensor, u0: Tensor, u1: Tensor, wu: Tensor) -> Tensor:
    """The operator at constant taps (``fixed_taps``): each query column and row is the
    bilinear mix of its two taps, gathered (constant indices), and each cell keeps the max of
    its 2 x 2 queries with ``sample_max``'s tie order. Only gathers, arithmetic and a max
    pooling: a static graph that torch.export, ONNX and TorchScript take as it is. Computed
    in fp32 (fp64 for fp64 inputs), returned in x's dtype; equal to ``dynopool2d`` within
    fp32 rounding, and as it at infinities and NaN (``mix``)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    cols = mix(xc.index_select(3, u0), xc.index_select(3, u1), wu.to(compute))
    q = mix(cols.index_select(2, y0), cols.index_select(2, y1), wy.to(compute)[:, None])
    return torch.nn.functional.max_pool2d(q, 2).to(x.dtype)


def sample_max(x: Tensor, h_out: int, w_out: int, size_hat: Tensor, delta: Tensor) -> Tensor:
    """The operator for given output sizes and (continuous) cell-count ``size_hat`` (2,):
    ``dynopool2d`` is this at the straight-through sizes; tests differentiate it in size_hat."""
    h, w = x.shape[-2:]
    yq, xq = interleaved_queries(h, w, h_out, w_out, size_hat, delta)
    out = sample_at(x.to(size_hat.dtype), yq, xq).to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def sample_at(x: Tensor, yq: Tensor, xq: Tensor) -> Tensor:
    """The spec at given query coordinates, literally: x (N, C, H, W), query rows yq (2 H_out,
    row 2i + k of cell i) and columns xq (2 W_out), each in [0, size - 1]. Every query is the
    bilinear mix of its 4 taps (``mix``: a zero-weight tap contributes nothing), every cell the
    max of its 4 queries, ties to the first of (0,0), (0,1), (1,0), (1,1) and a NaN winning as
    in max_pool2d. The gradients are the spec's, written out: to x, the winner's bilinear
    weights (autograd through the gathers, weights constant); to the coordinates, the one-sided
    slope of the winner's bilinear (toward y + 1 at integers), a slope that is not finite
    counting as zero. In x's dtype: the reference for every other path, not a fast one."""
    n, c, h, w = x.shape
    y0, y1, wy = _taps(yq.detach(), h)
    u0, u1, wu = _taps(xq.detach(), w)
    wy, wu = wy[:, None], wu[None, :]

    def tap(rows, cols):
        return x[:, :, rows[:, None], cols[None, :]]  # (N, C, 2 H_out, 2 W_out)

    x00, x01, x10, x11 = tap(y0, u0), tap(y0, u1), tap(y1, u0), tap(y1, u1)
    value = mix(mix(x00, x01, wu), mix(x10, x11, wu), wy)
    with torch.no_grad():
        slope_y = finite_or_zero(mix(x10 - x00, x11 - x01, wu))  # d value / d y
        slope_u = finite_or_zero(mix(x01 - x00, x11 - x10, wy))  # d value / d u
    # zero in value (finite slopes), the slopes in gradient
    q = value + (yq - yq.detach())[:, None] * slope_y + (xq - xq.detach())[None, :] * slope_u
    h_out, w_out = yq.numel() // 2, xq.numel() // 2
    q = q.view(n, c, h_out, 2, w_out, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h_out, w_out, 4)
    with torch.no_grad():
        best, arg = q[..., 0], torch.zeros(q.shape[:-1], dtype=torch.long, device=x.device)
        for i in range(1, 4):
            take = (q[..., i] > best) | q[..., i].isnan()  # strictly greater: ties stay first
            best, arg = torch.where(take, q[..., i], best), torch.where(take, i, arg)
    return q.gather(-1, arg[..., None])[..., 0]
