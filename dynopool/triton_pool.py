"""DynOPool on the Triton kernels (``kernels/dynopool.py``): one autograd.Function, the same
operator as ``reference.dynopool2d`` (which the tests hold it to).

Forward: the coordinate table (1 tiny launch), then the fused sampling + max (1 launch) that
also keeps each output's winning query in 2 bits. Backward: the alpha/delta reduction (1
launch + an fp64 sum of per-program partials) and the gather of x's gradient (1 tiny launch
for the query ranges, 1 launch). Nothing but x, the winners and the table is kept for the
backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DynOPoolFunction(torch.autograd.Function):
    """out = DynOPool(x; alpha, delta) at the given output size; alpha and delta fp32 (2,)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, delta: Tensor, h_out: int, w_out: int) -> Tensor:
        from kernels import dynopool as k

        tab = k.coordinates(alpha, delta, x.shape[2], x.shape[3], h_out, w_out)
        out, win = k.forward(x, tab, h_out, w_out)
        ctx.save_for_backward(x, win, tab)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        from kernels import dynopool as k

        x, win, tab = ctx.saved_tensors
        g_x = g_alpha = g_delta = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = k.coordinate_grads(x, grad, win, tab).float()
            g_alpha, g_delta = g[:2], g[2:]
        if ctx.needs_input_grad[0]:
            h, w = x.shape[2:]
            rng = k.ranges(tab, h, w, *win.shape[2:])
            g_x = k.input_grad(x, grad, win, tab, rng)
        return g_x, g_alpha, g_delta, None, None


def dynopool2d(x: Tensor, alpha: Tensor, delta: Tensor) -> Tensor:
    """DynOPool on the kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    if x.dtype not in DTYPES:
        raise ValueError(f"backend='triton' takes fp32, fp16 or bf16 inputs, got {x.dtype}; "
                         "use backend='torch' (the reference) for others")
    h_out, w_out = reference.check_inputs(x, alpha, delta)
    f32 = torch.float32
    return DynOPoolFunction.apply(x, alpha.reshape(2).to(f32), delta.reshape(2).to(f32), h_out, w_out)
