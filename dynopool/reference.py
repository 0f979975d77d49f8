"""DynOPool (Jang, Chu, Kim, Han, CVPR 2022) in plain PyTorch: the executable form of
``shared/spec/dynopool.md``, differentiable in x, alpha and delta, and the CPU path.

Per axis (H shown; W alike), with alpha the inverse scale and delta the query spread:
    H_out = max(1, round(H / alpha))                 (round half to even)
    H_hat = H_out + (H/alpha - sg(H/alpha))          straight-through: value H_out
    s     = H / H_hat                                cell size in input pixels
    p_i   = (i + 0.5) s - 0.5                        cell centres
    y_ik  = clamp(p_i + (2k - 1) delta s, 0, H - 1)  two query rows per cell, k = 0, 1
    out[n, c, i, j] = max over (k, l) of bilinear(x[n, c], y_ik, x_jl), ties to the first of
                      (0,0), (0,1), (1,0), (1,1)

Bilinear sampling on this tensor-product grid is separable: the 2 x 2 query values of every
cell are rows of A_y X A_x^T, where A_y (2 H_out x H) and A_x (2 W_out x W) hold two
interpolation weights per row. Two batched matrix products replace 16 gathers per output,
and autograd through them yields every gradient the spec defines (to x by the transposed
products; to the coordinates through the weights, one-sided at integers; zero where the
clamp acts).
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_inputs(x: Tensor, alpha: Tensor, delta: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty spatial size, got {tuple(x.shape)}")
    if alpha.numel() != 2 or delta.numel() != 2:
        raise ValueError(f"alpha and delta must hold 2 values (h, w), got {alpha.numel()} and {delta.numel()}")
    a = alpha.detach().cpu()
    if not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
        raise ValueError(f"alpha (the inverse scale factor) must be finite and > 0, got {a.tolist()}")
    if not bool(torch.isfinite(delta.detach().cpu()).all()):
        raise ValueError(f"delta (the query spread) must be finite, got {delta.detach().cpu().tolist()}")


def output_size(size: int, alpha: float) -> int:
    """max(1, round(size / alpha)), rounding half to even like torch.round."""
    return max(1, int(torch.round(torch.tensor(size / alpha, dtype=torch.float64))))


def straight_through_size(size: int, alpha: Tensor) -> tuple[Tensor, int]:
    """(size_hat, size_out): size_hat has the value size_out and the gradient of size / alpha."""
    scaled = size / alpha
    out = output_size(size, float(alpha.detach()))
    return out + (scaled - scaled.detach()), out


def queries(size: int, out: int, size_hat: Tensor, delta: Tensor) -> Tensor:
    """The query coordinates (2, out) of one axis, k = 0, 1, for a (continuous) size_hat."""
    s = size / size_hat
    centres = (torch.arange(out, dtype=size_hat.dtype, device=size_hat.device) + 0.5) * s - 0.5
    spread = torch.stack([-delta * s, delta * s])
    return (centres[None, :] + spread[:, None]).clamp(0, size - 1)


def interpolation_matrix(y: Tensor, size: int) -> Tensor:
    """A (len(y) x size) with the two bilinear weights of each coordinate in y (clamped to
    [0, size - 1]): A @ v samples v at y."""
    y0 = y.detach().floor()
    y1 = (y0 + 1).clamp(max=size - 1)
    w1 = y - y0  # gradient 1 in y: the one-sided derivative toward y + 1 at integers
    a = torch.zeros(y.numel(), size, dtype=y.dtype, device=y.device)
    rows = torch.arange(y.numel(), device=y.device)
    a = a.index_put((rows, y0.long()), 1 - w1, accumulate=True)
    return a.index_put((rows, y1.long()), w1, accumulate=True)


def dynopool2d(x: Tensor, alpha: Tensor, delta: Tensor) -> Tensor:
    """The DynOPool operator; ``alpha`` and ``delta`` are 2-element tensors (h, w)."""
    check_inputs(x, alpha, delta)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    alpha, delta = alpha.to(compute), delta.to(compute)
    (h_hat, h_out), (w_hat, w_out) = (straight_through_size(x.shape[2], alpha[0]),
                                      straight_through_size(x.shape[3], alpha[1]))
    return sample_max(x, h_out, w_out, torch.stack([h_hat, w_hat]), delta)


def sample_max(x: Tensor, h_out: int, w_out: int, size_hat: Tensor, delta: Tensor) -> Tensor:
    """The operator for given output sizes and (continuous) cell-count ``size_hat`` (2,):
    ``dynopool2d`` is this at the straight-through sizes; tests differentiate it in size_hat."""
    n, c, h, w = x.shape
    compute = size_hat.dtype
    yq = queries(h, h_out, size_hat[0], delta[0])
    xq = queries(w, w_out, size_hat[1], delta[1])
    y0 = yq.detach().floor().reshape(-1)
    y1 = (y0 + 1).clamp(max=h - 1)
    wy1 = yq.reshape(-1) - y0  # gradient 1 in y: one-sided toward y + 1 at integers
    a_x = interpolation_matrix(xq.reshape(-1), w)  # (2 w_out, w), rows l * w_out + j
    out = _SeparableMax.apply(x.to(compute).reshape(n * c, h, w), y0.long(), y1.long(), wy1, a_x)
    out = out.view(n, c, h_out, w_out)
    out = out.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class _SeparableMax(torch.autograd.Function):
    """Query values q = (rows of x along H, mixed by wy1) @ a_x^T, then the max over each
    cell's 2 x 2 queries (ties to the first). Along H the two taps of each query row are
    whole rows of x (a gather); along W one large matrix product. The backward routes each
    output's gradient to its winning query only, so the 4x larger query gradient is never
    built by autograd from four selects."""

    @staticmethod
    def forward(ctx, x3: Tensor, y0: Tensor, y1: Tensor, wy1: Tensor, a_x: Tensor) -> Tensor:
        nc, h, w = x3.shape
        two_h, two_w = wy1.numel(), a_x.shape[0]
        rows = x3.index_select(1, torch.cat([y0, y1]))
        r = torch.lerp(rows[:, :two_h], rows[:, two_h:], wy1[:, None])  # (nc, 2 h_out, w)
        q = (r.reshape(-1, w) @ a_x.T).view(nc, 2, two_h // 2, 2, two_w // 2)
        best, win = q[:, 0, :, 0, :], torch.zeros(q[:, 0, :, 0, :].shape, dtype=torch.uint8, device=q.device)
        for code, (k, l) in enumerate(((0, 1), (1, 0), (1, 1)), start=1):
            cand = q[:, k, :, l, :]
            better = cand > best  # strict: ties stay with the first query
            best = torch.where(better, cand, best)
            win.masked_fill_(better, code)
        ctx.save_for_backward(y0, y1, wy1, a_x, rows, win)  # rows: no second gather in backward
        ctx.x_shape = x3.shape
        return best

    @staticmethod
    def backward(ctx, grad: Tensor):
        y0, y1, wy1, a_x, rows, win = ctx.saved_tensors
        nc, h, w = ctx.x_shape
        two_h, two_w = wy1.numel(), a_x.shape[0]
        h_out, w_out = two_h // 2, two_w // 2
        k, l = (win >> 1).long(), (win & 1).long()
        i = torch.arange(h_out, device=grad.device)[:, None]
        j = torch.arange(w_out, device=grad.device)[None, :]
        pos = (k * h_out + i) * two_w + (l * w_out + j)  # the winner's place in q (2 h_out, 2 w_out)
        gq = torch.zeros(nc, two_h * two_w, dtype=grad.dtype, device=grad.device)
        gq.scatter_(1, pos.reshape(nc, -1), grad.reshape(nc, -1))
        gq = gq.view(-1, two_w)
        g_r = (gq @ a_x).view(nc, two_h, w)
        start, end = rows[:, :two_h], rows[:, two_h:]
        g_ax = gq.T @ torch.lerp(start, end, wy1[:, None]).reshape(-1, w)
        g_end = g_r * wy1[:, None]
        g_x = torch.zeros(ctx.x_shape, dtype=grad.dtype, device=grad.device)
        g_x.index_add_(1, y0, g_r - g_end)
        g_x.index_add_(1, y1, g_end)
        g_w = (g_r * (end - start)).sum(dim=(0, 2))
        return g_x, None, None, g_w, g_ax
