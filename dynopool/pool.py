"""``dynopool2d`` and ``DynOPool2d``: the public face of the operator (dispatch + module)."""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor, nn

from . import reference, triton_pool

BACKENDS = ("auto", "torch", "triton")


# The output size is alpha's value rounded: data-dependent, read on the host. Under
# torch.compile the operator is one graph break (rather than one per host read inside it);
# the compiled regions around it keep static shapes and recompile when a rounded size changes.
@torch.compiler.disable
def dynopool2d(x: Tensor, alpha: Tensor, delta: Tensor, *, backend: str = "auto") -> Tensor:
    """DynOPool: learnable output size (``alpha`` = inverse scale per axis, (h, w)) and query
    spread (``delta``, in output cells), by bilinear sampling and a max over 4 queries per
    cell. Differentiable in x, alpha and delta; ``alpha`` gets the straight-through gradient
    of the output size. See ``shared/spec/dynopool.md``."""
    if resolve_backend(backend, x) == "triton":
        return triton_pool.dynopool2d(x, alpha, delta)
    return reference.dynopool2d(x, alpha, delta)


def resolve_backend(backend: str, x: Tensor) -> str:
    """"auto" sends CUDA tensors in fp32 / fp16 / bf16 to the Triton kernels and everything
    else to the reference; "triton" also runs CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if x.is_cuda and x.dtype in triton_pool.DTYPES and _has_triton() else "torch"
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError("backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)")
    return "triton"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class DynOPool2d(nn.Module):
    """Pooling with a learned output size and receptive field (Jang et al., CVPR 2022).

    ``alpha`` (per axis h, w) is the inverse scale factor: 2 halves the resolution like a
    stride-2 pooling, values below 1 upsample. ``delta`` is half the spread of the 4 query
    points of each output cell, in cells (0.25 with alpha 2 is exactly 2x2 max pooling).
    """

    def __init__(self, alpha=2.0, delta=0.25, learn_alpha: bool = True, learn_delta: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.alpha = nn.Parameter(_pair(alpha, "alpha"), requires_grad=learn_alpha)
        self.delta = nn.Parameter(_pair(delta, "delta"), requires_grad=learn_delta)
        self.backend = backend
        reference.check_inputs(torch.zeros(1, 1, 1, 1), self.alpha, self.delta)

    def forward(self, x: Tensor) -> Tensor:
        return dynopool2d(x, self.alpha, self.delta, backend=self.backend)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        a = self.alpha.detach().cpu().tolist()
        return reference.output_size(h, a[0]), reference.output_size(w, a[1])

    def extra_repr(self) -> str:
        a, d = self.alpha.detach().cpu().tolist(), self.delta.detach().cpu().tolist()
        return (f"alpha=({a[0]:.3f}, {a[1]:.3f}), scale=({1 / a[0]:.3f}, {1 / a[1]:.3f}), "
                f"delta=({d[0]:.3f}, {d[1]:.3f}), learn_alpha={self.alpha.requires_grad}, "
                f"learn_delta={self.delta.requires_grad}")


def _pair(v, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.repeat(2)
    if t.numel() != 2:
        raise ValueError(f"{name} must be a number or a pair (h, w), got {v!r}")
    return t.clone()
