"""Deployment: a trained network's DynOPool layers as static modules.

A DynOPool2d reads its output size from alpha's value at every forward, which no static graph
can hold. Once training ends the sizes are fixed for an input size: ``freeze`` turns every
DynOPool2d into a ``FrozenDynOPool2d`` with constant sizes and taps (no host read, no
data-dependent shape), so torch.export, ONNX, TorchScript and compile(fullgraph=True) see a
static graph. It is the same operator's second face: the coordinates are the reference's
(``reference.fixed_taps``), sampled by ``reference.sample_max_fixed``.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from . import probe, reference
from .pool import DynOPool2d, _read_values, remove_read_sizes_once


class FrozenDynOPool2d(nn.Module):
    """A DynOPool2d at one input size with its parameters' values fixed: gathers, arithmetic and
    a max pooling with constant indices. Equal to the trained layer's output within fp32
    rounding; an input of another size is an error (freeze again for it)."""

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int], alpha, delta):
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.output_size = (int(output_size[0]), int(output_size[1]))
        alpha = torch.as_tensor(alpha, dtype=torch.float32)
        delta = torch.as_tensor(delta, dtype=torch.float32, device=alpha.device)
        # kept for reading (repr, state_dict); the forward uses the taps only
        self.register_buffer("alpha", alpha.clone())
        self.register_buffer("delta", delta.clone())
        y0, y1, wy, u0, u1, wu = reference.fixed_taps(*self.input_size, alpha, delta, self.output_size)
        for name, t in (("y0", y0), ("y1", y1), ("wy", wy), ("u0", u0), ("u1", u1), ("wu", wu)):
            self.register_buffer(name, t)
        self._size_error = (f"FrozenDynOPool2d was frozen for {self.input_size[0]}x{self.input_size[1]} inputs; "
                            "freeze the model again with an example of the new size")

    @classmethod
    def from_pool(cls, pool: DynOPool2d, input_size, values=None) -> "FrozenDynOPool2d":
        """``pool`` frozen at its current (projected) parameters for ``input_size``; ``values``:
        its (alpha_h, alpha_w, delta_h, delta_w) if already read to the host."""
        values = _read_values([pool])[0] if values is None else values
        alpha, delta = pool._project(values)
        size = pool._make_plan(tuple(input_size), values)[1]
        device = pool.alpha.device
        return cls(input_size, size, torch.tensor(alpha, device=device), torch.tensor(delta, device=device))

    def forward(self, x: Tensor) -> Tensor:
        # (a trace fixes the size itself: no comparison for it to warn about)
        if not torch.jit.is_tracing() and (x.shape[-2] != self.input_size[0] or x.shape[-1] != self.input_size[1]):
            raise ValueError(self._size_error)
        return reference.sample_max_fixed(x, self.y0, self.y1, self.wy, self.u0, self.u1, self.wu)

    def extra_repr(self) -> str:
        a, d = self.alpha.tolist(), self.delta.tolist()
        return (f"input_size={self.input_size}, output_size={self.output_size}, alpha=({a[0]:.3f}, {a[1]:.3f}), "
                f"delta=({d[0]:.3f}, {d[1]:.3f})")


def freeze(model: nn.Module, example_input=None) -> nn.Module:
    """A copy of ``model`` with every DynOPool2d frozen (``FrozenDynOPool2d``) for one input size;
    ``model`` itself is left as it is (it can train on). ``example_input``: a tensor or a shape
    (batch included) of the deployment size; the copy runs it once (eval mode, no grad) to see
    each layer's input size. Without it each layer takes the size of the last input it saw.
    The copy has no DynOPool2d and no size-reading hook left: export it with torch.export,
    torch.onnx.export or torch.jit.trace / script."""
    frozen = copy.deepcopy(model)
    layers = list(dict.fromkeys(m for m in frozen.modules() if isinstance(m, DynOPool2d)))
    sizes = _input_sizes(frozen, layers, example_input)
    if not layers:
        return frozen
    replacement = {}
    for layer, values in zip(layers, _read_values(layers)):  # one host read for all
        if len(sizes[layer]) != 1:
            raise ValueError(f"a DynOPool2d saw inputs of several sizes {sorted(sizes[layer])} in one forward; "
                             "freeze can fix one size per layer")
        (hw,) = sizes[layer]
        replacement[layer] = FrozenDynOPool2d.from_pool(layer, hw, values)
    for parent in list(frozen.modules()):
        for name, child in list(parent.named_children()):
            if child in replacement:
                setattr(parent, name, replacement[child])
    remove_read_sizes_once(frozen)
    return frozen


def _input_sizes(model: nn.Module, layers, example_input) -> dict:
    if example_input is None:
        missing = [m for m in layers if m._last_input is None]
        if missing:
            raise ValueError("freeze: some DynOPool2d has not seen an input yet; pass example_input "
                             "(a tensor or a shape of the size to deploy at)")
        return {m: {m._last_input} for m in layers}
    sizes = {m: set() for m in layers}
    handles = [m.register_forward_pre_hook(lambda m, args: sizes[m].add(tuple(args[0].shape[-2:]))) for m in layers]
    probe.run(model, probe.example_tensor(model, example_input), handles)
    return sizes
