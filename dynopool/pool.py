"""``dynopool2d`` and ``DynOPool2d``: the public face of the operator (dispatch + module).

The output size is alpha's value rounded: the host must know it before the output exists.
``dynopool2d`` reads it per call (one device-to-host copy) unless it is given. ``DynOPool2d``
gets it from a plan that ``plan_sizes`` (a forward pre-hook that ``replace_pooling`` and
``read_sizes_once`` install) makes for every layer of a model in one copy per model forward.
With the sizes known, the Triton path does no host read at all: the GPU never waits for the
host, CUDA graphs can capture it, and torch.compile traces it (a custom op) without a break.
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor, nn

from . import reference, triton_pool

BACKENDS = ("auto", "torch", "triton")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def dynopool2d(x: Tensor, alpha: Tensor, delta: Tensor, *, backend: str = "auto",
               output_size: tuple[int, int] | None = None) -> Tensor:
    """DynOPool: learnable output size (``alpha`` = inverse scale per axis, (h, w)) and query
    spread (``delta``, in output cells), by bilinear sampling and a max over 4 queries per
    cell. Differentiable in x, alpha and delta; ``alpha`` gets the straight-through gradient
    of the output size. See ``shared/spec/dynopool.md``.

    ``output_size``: (h_out, w_out) if the caller knows it (it must equal
    ``reference.output_size`` of alpha's value); without it, alpha and delta are read to the
    host and checked (alpha finite and > 0, delta finite) on every call."""
    if output_size is None:
        return _read_size_and_pool(x, alpha, delta, backend)
    if resolve_backend(backend, x) == "triton":
        return triton_pool.dynopool2d(x, alpha, delta, *output_size)
    return _reference(x, alpha, delta, output_size)


# A host read cannot be traced: under torch.compile these are one graph break each, and the
# compiled regions around them recompile when a rounded size changes.
@torch.compiler.disable
def _read_size_and_pool(x: Tensor, alpha: Tensor, delta: Tensor, backend: str) -> Tensor:
    return dynopool2d(x, alpha, delta, backend=backend, output_size=reference.check_inputs(x, alpha, delta))


# The reference is the spec made executable (index_put_ with data-dependent taps, autograd
# through its own Function), not a path worth tracing.
@torch.compiler.disable
def _reference(x: Tensor, alpha: Tensor, delta: Tensor, size: tuple[int, int]) -> Tensor:
    return reference.dynopool2d(x, alpha, delta, size)


def resolve_backend(backend: str, x: Tensor) -> str:
    """"auto" sends CUDA tensors in fp32 / fp16 / bf16 to the Triton kernels and everything
    else to the reference; "triton" also runs CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if x.is_cuda and x.dtype in triton_pool.DTYPES and HAS_TRITON else "torch"
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError("backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)")
    return "triton"


class DynOPool2d(nn.Module):
    """Pooling with a learned output size and receptive field (Jang et al., CVPR 2022).

    ``alpha`` (per axis h, w) is the inverse scale factor: 2 halves the resolution like a
    stride-2 pooling, values below 1 upsample. ``delta`` is half the spread of the 4 query
    points of each output cell, in cells (0.25 with alpha 2 is exactly 2x2 max pooling).

    Valid range: before each forward the layer projects its parameters onto
    ``alpha_range`` (per axis; the lower bound caps the upsampling, every alpha > 0 gives an
    output of at least 1 cell) and ``delta_range``, in place and without a gradient, so any
    optimizer step that leaves them finite is safe, and the value stored is the value used
    (projected gradient descent). A non-finite alpha or delta (a diverged run) is an error.
    """

    def __init__(self, alpha=2.0, delta=0.25, learn_alpha: bool = True, learn_delta: bool = True,
                 backend: str = "auto", alpha_range=(0.25, 64.0), delta_range=(0.0, 1.0)):
        super().__init__()
        self.alpha = nn.Parameter(_pair(alpha, "alpha"), requires_grad=learn_alpha)
        self.delta = nn.Parameter(_pair(delta, "delta"), requires_grad=learn_delta)
        self.backend = backend
        self.alpha_range = _bounds(alpha_range, "alpha_range", positive=True)
        self.delta_range = _bounds(delta_range, "delta_range")
        values = self.alpha.tolist() + self.delta.tolist()
        reference.check_values(values[:2], values[2:])
        for name, v, (lo, hi) in (("alpha", values[:2], self.alpha_range), ("delta", values[2:], self.delta_range)):
            if not all(lo <= t <= hi for t in v):
                raise ValueError(f"{name} {v} is outside its valid range [{lo}, {hi}]")
        # ((H, W), (h_out, w_out), project): this forward's sizes for an input of H x W,
        # planned by plan_sizes; None: read alpha here
        self._plan = None
        self._last_input = None  # (H, W) of the last input, for the next plan

    def forward(self, x: Tensor) -> Tensor:
        hw = (x.shape[-2], x.shape[-1])
        if self._last_input != hw:
            self._last_input = hw
        plan = self._plan
        if plan is None or plan[0] != hw:
            plan = self._read_plan(hw)
        if plan[2]:
            with torch.no_grad():
                self.alpha.clamp_(*self.alpha_range)
                self.delta.clamp_(*self.delta_range)
            # a layer called twice per forward (a shared pool) projects once: a second
            # in-place write would invalidate what the first call saved for its backward
            # (without a model's plan, the second call reads the projected values itself)
            if self._plan is plan:
                self._plan = (plan[0], plan[1], False)
        return dynopool2d(x, self.alpha, self.delta, backend=self.backend, output_size=plan[1])

    @torch.compiler.disable  # a host read: one graph break, only where no plan was made
    def _read_plan(self, hw) -> tuple:
        return self._make_plan(hw, _read_values([self])[0])

    def _make_plan(self, hw, values) -> tuple:
        """The plan for an input of size hw from host values (alpha_h, alpha_w, delta_h, delta_w)
        read before any projection."""
        a, d = values[:2], values[2:]
        if not all(map(math.isfinite, values)):
            raise ValueError(f"DynOPool2d parameters are not finite (alpha {a}, delta {d}): the "
                             "training has diverged (see the README for learning rates that train)")
        a_used = [min(max(v, self.alpha_range[0]), self.alpha_range[1]) for v in a]
        d_used = [min(max(v, self.delta_range[0]), self.delta_range[1]) for v in d]
        size = (reference.output_size(hw[0], a_used[0]), reference.output_size(hw[1], a_used[1]))
        return hw, size, a_used != a or d_used != d

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The output size for an h x w input at the current (projected) alpha."""
        return self._read_plan((h, w))[1]

    def extra_repr(self) -> str:
        a, d = self.alpha.detach().cpu().tolist(), self.delta.detach().cpu().tolist()
        return (f"alpha=({a[0]:.3f}, {a[1]:.3f}), scale=({1 / a[0]:.3f}, {1 / a[1]:.3f}), "
                f"delta=({d[0]:.3f}, {d[1]:.3f}), learn_alpha={self.alpha.requires_grad}, "
                f"learn_delta={self.delta.requires_grad}, alpha_range={self.alpha_range}, "
                f"delta_range={self.delta_range}")


def _read_values(layers) -> list[list[float]]:
    """Every layer's (alpha_h, alpha_w, delta_h, delta_w), in one device-to-host copy."""
    flat = torch.cat([t.detach().reshape(2) for m in layers for t in (m.alpha, m.delta)]).tolist()
    return [flat[4 * i: 4 * i + 4] for i in range(len(layers))]


@torch.compiler.disable  # the one host read per model forward: a graph break at the model's start
def plan_sizes(model: nn.Module) -> None:
    """Read every DynOPool2d's alpha and delta in ``model`` in one copy and plan each layer's
    output size for an input of the size it saw last. A layer without a plan for its input
    size (the first forward, a new resolution) reads its own values when it runs. A plan holds
    until it is replaced or dropped: ``read_sizes_once`` makes one per forward and drops it at
    the end; called by hand (to freeze the sizes for a CUDA graph), call it again when alpha
    has moved, or the layers keep the sizes it planned."""
    layers = [m for m in model.modules() if isinstance(m, DynOPool2d)]
    if not layers:
        return
    for m, values in zip(layers, _read_values(layers)):
        m._plan = m._make_plan(m._last_input, values) if m._last_input is not None else None


def read_sizes_once(model: nn.Module) -> None:
    """Install ``plan_sizes`` as a forward pre-hook of ``model`` (once): every forward of the
    model then reads all its DynOPool2d layers' parameters in one device-to-host copy, at its
    start, instead of one per layer; the plans are dropped when the forward ends (the
    parameters move with the next optimizer step). ``replace_pooling`` calls this."""
    if getattr(model, "_dynopool_plan_hooks", None) is not None:
        return

    def clear(module, args, output):
        for m in module.modules():
            if isinstance(m, DynOPool2d):
                m._plan = None

    model._dynopool_plan_hooks = (model.register_forward_pre_hook(lambda module, args: plan_sizes(module)),
                                  model.register_forward_hook(clear, always_call=True))


def output_sizes(layers, input_sizes) -> list[tuple[int, int]]:
    """Each layer's output size for its (H, W) input size, from one read of all their values."""
    if not layers:
        return []
    return [m._make_plan(hw, values)[1] for m, hw, values in zip(layers, input_sizes, _read_values(layers))]


def _pair(v, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.repeat(2)
    if t.numel() != 2:
        raise ValueError(f"{name} must be a number or a pair (h, w), got {v!r}")
    return t.clone()


def _bounds(v, name: str, positive: bool = False) -> tuple[float, float]:
    """(lo, hi) as the fp32 values the parameters are clamped to on the device."""
    lo, hi = (float(torch.tensor(float(b), dtype=torch.float32)) for b in v)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (lo > 0 or not positive)):
        raise ValueError(f"{name} must be finite (lo, hi) with lo <= hi{' and lo > 0' if positive else ''}, got {v!r}")
    return lo, hi
