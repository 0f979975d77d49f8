"""DynOPool's fast PyTorch path (the CPU's, and backend="torch" anywhere): the operator of
``reference.sample_at`` as matrix products, held to it by the tests.

Bilinear sampling on DynOPool's tensor-product grid is separable: the 2 x 2 query values of
every cell are entries of A_y X A_x^T, where A_y (2 H_out x H) and A_x (2 W_out x W) hold two
interpolation weights per row (queries interleaved: row 2i + k, column 2j + l), and the max
over each cell's queries is a 2 x 2 max pooling of that grid. Matrix products run at BLAS
speed in either layout, with no copy between them: NCHW mixes W by one GEMM over all rows and
H by a batched product per image plane; channels_last (viewed NHWC) mixes H by one GEMM per
image over W x C and W by a batched product per row, and its output stays channels_last.

A matrix product multiplies every pixel by every weight, zeros included: for finite x that
is the spec's weighted sum exactly (a zero weight adds 0), but 0 x inf and 0 x NaN are NaN,
which would spread one non-finite pixel over its whole plane. Such a NaN always reaches the
output (NaN wins the max), so an output with a NaN is computed again on the reference, whose
zero-weight taps contribute nothing: the slow path runs only for inputs with inf or NaN.

Backward (finite x): the winners' gradients through the max pooling's indices, then the
transposed products to x; to the coordinates, the spec's slopes (differences of the two taps
of each query, one-sided at integers) summed as small matrix products: for the rows,
G_y = sum over planes of gq cols^T (2 H_out x H) read at each query row's two taps; for the
columns G_x = sum of g_cols^T x (2 W_out x W) read alike.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference


def channels_last(x: Tensor) -> bool:
    """Dense channels_last and not also contiguous: the layout rule of every path."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def sample_at(x: Tensor, yq: Tensor, xq: Tensor) -> Tensor:
    """``reference.sample_at`` (x in its compute dtype, coordinates interleaved), fast for
    finite inputs; the output is channels_last when x is (dense), else contiguous."""
    out = _Separable.apply(x, yq, xq)
    if out.isnan().any():  # a non-finite input (or a NaN output): the reference's rules
        out = reference.sample_at(x, yq, xq)
        out = out.contiguous(memory_format=torch.channels_last if channels_last(x) else torch.contiguous_format)
    return out


def _matrices(yq: Tensor, xq: Tensor, h: int, w: int):
    return reference.interpolation_matrix(yq.detach(), h), reference.interpolation_matrix(xq.detach(), w)


class _Separable(torch.autograd.Function):
    """out = max over each cell's 2 x 2 queries of A_y x A_x^T, for x (N, C, H, W) and query
    coordinates yq (2 H_out), xq (2 W_out). Returns a fresh tensor, never a view (in-place ops
    on the output are the caller's to make)."""

    @staticmethod
    def forward(ctx, x: Tensor, yq: Tensor, xq: Tensor) -> Tensor:
        n, c, h, w = x.shape
        a_y, a_x = _matrices(yq, xq, h, w)
        two_h, two_w = a_y.shape[0], a_x.shape[0]
        cl = channels_last(x)
        if cl:
            xv = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous
            rows = (a_y @ xv.reshape(n, h, w * c)).view(n * two_h, w, c)  # H mixed: one GEMM per image
            q = (a_x @ rows).view(n, two_h, two_w, c).permute(0, 3, 1, 2)  # W mixed per row; channels_last
            saved = (rows,)
        else:
            xv = x.contiguous()
            cols = (xv.view(-1, w) @ a_x.T).view(n * c, h, two_w)  # W mixed: one GEMM
            q = (a_y @ cols).view(n, c, two_h, two_w)  # H mixed per plane
            saved = (cols,)
        out, win = torch.ops.aten.max_pool2d_with_indices(q, [2, 2], [2, 2])
        ctx.save_for_backward(xv, yq, xq, a_y, a_x, q, win, *saved)
        ctx.cl = cl
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xv, yq, xq, a_y, a_x, q, win, *saved = ctx.saved_tensors
        two_h, two_w = a_y.shape[0], a_x.shape[0]
        grad = grad.contiguous(memory_format=torch.channels_last if ctx.cl else torch.contiguous_format)
        gq = torch.ops.aten.max_pool2d_with_indices_backward(grad, q, [2, 2], [2, 2], [0, 0], [1, 1], False, win)
        if ctx.cl:
            n, h, w, c = xv.shape
            (rows,) = saved  # (N 2H_out, W, C)
            gq = gq.permute(0, 2, 3, 1).reshape(n * two_h, two_w, c)  # a view: gq is channels_last
            g_rows = (a_x.T @ gq).view(n, two_h, w * c)
            g_x = (a_y.T @ g_rows).view(n, h, w, c).permute(0, 3, 1, 2)
            m_x = torch.bmm(gq, rows.transpose(1, 2)).sum(0)  # (2W_out, W)
            m_y = torch.bmm(g_rows, xv.reshape(n, h, w * c).transpose(1, 2)).sum(0)  # (2H_out, H)
            return g_x, _slopes(m_y, yq, h), _slopes(m_x, xq, w)
        n, c, h, w = xv.shape
        (cols,) = saved
        gq = gq.view(n * c, two_h, two_w)
        g_cols = (a_y.T @ gq).view(-1, two_w)  # (NCH, 2W_out)
        g_x = (g_cols @ a_x).view(n, c, h, w)
        m_y = torch.bmm(gq, cols.transpose(1, 2)).sum(0)  # (2H_out, H)
        m_x = g_cols.T @ xv.view(-1, w)  # (2W_out, W)
        return g_x, _slopes(m_y, yq, h), _slopes(m_x, xq, w)


def _slopes(m: Tensor, coords: Tensor, size: int) -> Tensor:
    """d loss / d coordinate r = m[r, tap1] - m[r, tap0]: each query's slope (the difference of
    its two taps) weighted by its gradient, summed (zero where both taps are the last sample)."""
    y0, y1, _ = reference._taps(coords.detach(), size)
    r = torch.arange(coords.numel(), device=coords.device)
    return m[r, y1] - m[r, y0]


def dynopool2d(x: Tensor, alpha: Tensor, delta: Tensor, size: tuple[int, int]) -> Tensor:
    """``reference.dynopool2d`` at a known output size, on this path."""
    reference.check_shapes(x, alpha, delta)
    h, w = x.shape[-2:]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):  # the operator's own precision, as the kernels'
        alpha, delta = alpha.to(compute), delta.to(compute)
        yq, xq = reference.interleaved_queries(h, w, *size, reference.size_hats(h, w, alpha, size), delta)
        return sample_at(x.to(compute), yq, xq).to(x.dtype)
