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

from . import _compat, probe, reference
from .pool import DynOPool2d, _read_values, remove_read_sizes_once


class FrozenDynOPool2d(nn.Module):
    """A DynOPool2d at one input size with its parameters' values fixed: gathers, arithmetic and
    a max pooling with constant indices. Equal to the trained layer's output within fp32
    rounding; an input of another size is an error (freeze again for it)."""

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int], alpha, delta, model_input_size=None):
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
        frozen_for = f"{self.input_size[0]}x{self.input_size[1]} inputs"
        if model_input_size is not None:
            frozen_for += f" (the model's: {int(model_input_size[0])}x{int(model_input_size[1])})"
        self._size_error = f"FrozenDynOPool2d was frozen for {frozen_for}; freeze the model again with an example of the new size"
        self._dynamic_error = (f"FrozenDynOPool2d was frozen for {frozen_for}: a dynamic height or width cannot be "
                               "exported (export with the frozen size, or freeze again for each size)")

    @classmethod
    def from_pool(cls, pool: DynOPool2d, input_size, values=None, model_input_size=None) -> "FrozenDynOPool2d":
        """``pool`` frozen at its current (projected) parameters for ``input_size``; ``values``:
        its (alpha_h, alpha_w, delta_h, delta_w) if already read to the host; ``model_input_size``:
        the (H, W) the whole model is frozen for, named in the size errors."""
        values = _read_values([pool])[0] if values is None else values
        alpha, delta = pool._project(values)
        size = pool._make_plan(tuple(input_size), values)[1]
        device = pool.alpha.device
        return cls(input_size, size, torch.tensor(alpha, device=device), torch.tensor(delta, device=device),
                   model_input_size)

    def forward(self, x: Tensor) -> Tensor:
        # The size check goes wherever the model goes: a traced graph, a script, an export.
        if torch.jit.is_scripting():
            if x.shape[-2] != self.input_size[0] or x.shape[-1] != self.input_size[1]:
                raise ValueError(self._size_error)
        else:
            x = self._checked(x)
        return reference.sample_max_fixed(x, self.y0, self.y1, self.wy, self.u0, self.u1, self.wu)

    @torch.jit.unused
    def _checked(self, x: Tensor) -> Tensor:
        h0, w0 = self.input_size
        if torch.jit.is_tracing():
            if torch.onnx.is_in_onnx_export():
                # the TorchScript ONNX exporter: its dynamic_axes reach the graph only after the
                # trace, where _RefuseDynamicSize's symbolic sees them; a static file is then
                # refused at another size by onnxruntime itself (its declared input shape)
                return _RefuseDynamicSize.apply(x, self._dynamic_error)
            # jit.trace records the sizes as traced values: a scripted check keeps its
            # comparison and its error in the graph (a Python one would be baked in)
            return _traced_size_check()(x, h0, w0, self._size_error)
        h, w = x.shape[-2], x.shape[-1]
        _compat.refuse_symbolic_size(h, w, self._dynamic_error)
        if h != h0 or w != w0:  # under torch.compile: a guard, the frozen size specialized
            raise ValueError(self._size_error)
        return x

    def extra_repr(self) -> str:
        a, d = self.alpha.tolist(), self.delta.tolist()
        return (f"input_size={self.input_size}, output_size={self.output_size}, alpha=({a[0]:.3f}, {a[1]:.3f}), "
                f"delta=({d[0]:.3f}, {d[1]:.3f})")


_SCRIPTED_CHECK = []


def _traced_size_check():
    """The size check as a TorchScript function, made once on first use (scripting costs ~0.1 s,
    which no one who never traces should pay)."""
    if not _SCRIPTED_CHECK:
        def size_check(x: Tensor, h: int, w: int, message: str) -> Tensor:
            if x.size(-2) != h or x.size(-1) != w:
                raise ValueError(message)
            return x

        _SCRIPTED_CHECK.append(torch.jit.script(size_check))
    return _SCRIPTED_CHECK[0]


class _RefuseDynamicSize(torch.autograd.Function):
    """Identity; in the TorchScript ONNX exporter, an error where the input's H or W is dynamic
    (``dynamic_axes`` on the height or width of the model's input)."""

    @staticmethod
    def forward(ctx, x: Tensor, message: str) -> Tensor:
        return x

    @staticmethod
    def symbolic(g, x, message: str):
        sizes = x.type().varyingSizes()
        if sizes is None or len(sizes) < 2 or sizes[-2] is None or sizes[-1] is None:
            raise ValueError(message)
        return x


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
    model_input_size = None if example_input is None else tuple(example_input.shape if isinstance(example_input, Tensor)
                                                                else example_input)[-2:]
    if not layers:
        return frozen
    replacement = {}
    for layer, values in zip(layers, _read_values(layers)):  # one host read for all
        if len(sizes[layer]) != 1:
            raise ValueError(f"a DynOPool2d saw inputs of several sizes {sorted(sizes[layer])} in one forward; "
                             "freeze can fix one size per layer")
        (hw,) = sizes[layer]
        replacement[layer] = FrozenDynOPool2d.from_pool(layer, hw, values, model_input_size)
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
