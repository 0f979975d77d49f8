"""DynOPool on the Triton kernels (``msdp_kernels/dynopool.py``): the same operator as
``reference.dynopool2d`` (which the tests hold it to), for a known output size.

Inputs with many channels run in channels_last (``_CL_MIN_CHANNELS``), whatever their layout.
Forward: the coordinate table and query ranges (1 tiny launch), then the fused sampling + max
(1 launch) that also keeps each output's winning query in 2 bits. Backward: the alpha/delta
reduction (1 launch + an fp64 sum of per-program partials) and the gather of x's gradient (1
launch). Nothing but x, the winners, the table and the ranges is kept for the backward, and
nothing is read to the host.

Eager calls go through an autograd.Function (the least host time per call); under
torch.compile the same launchers run as two custom ops, which the compiler traces as opaque
calls with a shape function, so a model compiles without a graph break here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Inputs with at least this many channels run on the kernels in channels_last whatever their
# layout (converted in, and the results converted back). On an H200 (066fe5b) the kernels
# took 1.7-4x longer on NCHW than on the same tensors in channels_last at every GPU-bound
# ResNet-50 shape, where one conversion costs one pass over x; with few channels the
# channels_last tile has little to coalesce.
_CL_MIN_CHANNELS = 16


def _in_kernel_layout(x: Tensor) -> Tensor:
    from msdp_kernels import dynopool as k

    if x.shape[1] < _CL_MIN_CHANNELS or k.is_channels_last(x):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _forward(x: Tensor, alpha: Tensor, delta: Tensor, h_out: int, w_out: int):
    """(out in x's layout rule, the winners, table, ranges, x as the kernels read it)."""
    from msdp_kernels import dynopool as k

    xk = _in_kernel_layout(x)
    tab, rng = k.coordinates(alpha, delta, x.shape[2], x.shape[3], h_out, w_out)
    out, win = k.forward(xk, tab, h_out, w_out)
    if xk is not x:
        out = out.contiguous()  # the layout rule: only a dense channels_last x gives channels_last
    return out, win, tab, rng, xk


def _backward(xk: Tensor, grad: Tensor, win: Tensor, tab: Tensor, rng: Tensor, need_x: bool, need_coords: bool):
    """(d x in xk's layout or None, d (alpha_h, alpha_w, delta_h, delta_w) in fp32 or None);
    xk: x as the forward's kernels read it (``_in_kernel_layout``)."""
    from msdp_kernels import dynopool as k

    if k.is_channels_last(xk) and not k.is_channels_last(grad):
        grad = grad.contiguous(memory_format=torch.channels_last)
    g_coords = k.coordinate_grads(xk, grad, win, tab).float() if need_coords else None
    g_x = k.input_grad(xk, grad, win, tab, rng) if need_x else None
    return g_x, g_coords


class DynOPoolFunction(torch.autograd.Function):
    """out = DynOPool(x; alpha, delta) at the given output size; alpha and delta fp32 (2,)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, delta: Tensor, h_out: int, w_out: int) -> Tensor:
        out, win, tab, rng, xk = _forward(x, alpha, delta, h_out, w_out)
        ctx.save_for_backward(xk, win, tab, rng)
        ctx.converted = xk is not x  # d x goes back to x's layout
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, win, tab, rng = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_x, g = _backward(x, grad, win, tab, rng, need[0], need[1] or need[2])
        if g_x is not None and ctx.converted:
            g_x = g_x.contiguous()
        return g_x, g[:2] if need[1] else None, g[2:] if need[2] else None, None, None


# ---- the same, as custom ops for torch.compile

@torch.library.custom_op("dynopool::pool", mutates_args=())
def _pool_op(x: Tensor, alpha: Tensor, delta: Tensor, h_out: int, w_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(x, alpha, delta, h_out, w_out)[:4]  # the backward converts x again


@_pool_op.register_fake
def _(x, alpha, delta, h_out, w_out):
    from msdp_kernels import dynopool as k

    n, c, h, w = x.shape
    fmt = torch.channels_last if k.is_channels_last(x) else torch.contiguous_format
    win_fmt = torch.channels_last if k.is_channels_last(_in_kernel_layout(x)) else torch.contiguous_format
    return (torch.empty((n, c, h_out, w_out), dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty((n, c, h_out, w_out), dtype=torch.int8, device=x.device, memory_format=win_fmt),
            alpha.new_empty(k.table_size(h_out, w_out)), alpha.new_empty((h + w, 4), dtype=torch.int32))


@torch.library.custom_op("dynopool::pool_backward", mutates_args=())
def _pool_backward_op(x: Tensor, grad: Tensor, win: Tensor, tab: Tensor, rng: Tensor) -> tuple[Tensor, Tensor]:
    xk = _in_kernel_layout(x)  # x as given (a custom op may not return the forward's copy)
    g_x, g = _backward(xk, grad, win, tab, rng, True, True)
    return (g_x.contiguous() if xk is not x else g_x), g


@_pool_backward_op.register_fake
def _(x, grad, win, tab, rng):
    return torch.empty_like(x), tab.new_empty(4)


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    _, win, tab, rng = output
    ctx.save_for_backward(x, win, tab, rng)
    ctx.mark_non_differentiable(win, tab, rng)


def _op_backward(ctx, grad, *unused):
    g_x, g = _pool_backward_op(*ctx.saved_tensors[:1], grad, *ctx.saved_tensors[1:])
    return g_x, g[:2], g[2:], None, None


_pool_op.register_autograd(_op_backward, setup_context=_setup_context)


def dynopool2d(x: Tensor, alpha: Tensor, delta: Tensor, h_out: int, w_out: int) -> Tensor:
    """DynOPool on the kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1) at output
    size (h_out, w_out), which must be ``reference.output_size`` of alpha's value."""
    if x.dtype not in DTYPES:
        raise ValueError(f"backend='triton' takes fp32, fp16 or bf16 inputs, got {x.dtype}; "
                         "use backend='torch' (the reference) for others")
    reference.check_shapes(x, alpha, delta)
    alpha, delta = _as_pair(alpha), _as_pair(delta)
    if torch.compiler.is_compiling():
        return _pool_op(x, alpha, delta, h_out, w_out)[0]
    return DynOPoolFunction.apply(x, alpha, delta, h_out, w_out)


def _as_pair(t: Tensor) -> Tensor:
    """fp32 (2,) contiguous; a module's parameter already is, and then gets no view node (each
    costs the autograd engine a node in the backward, per call)."""
    if t.shape == (2,) and t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.reshape(2).to(torch.float32).contiguous()
