"""A map too small for the layer after a DynOPool2d: one clear error naming the DynOPool2d.

An alpha may shrink a map below what a later layer takes (a 3x3 convolution without padding,
a pooling window): torch then fails inside that layer ("Calculated padded input size per
channel: (1 x 2). Kernel size: (3 x 3)"), naming neither the DynOPool2d nor its alpha. Each
layer with a spatial window after a DynOPool2d (in the model's module order) gets a forward
pre-hook that compares its input's size with what its window needs, with the shapes the
forward already has: no device read, nothing stored per forward, and under torch.compile a
shape guard, not a graph break. On failure it names the nearest DynOPool2d before that layer
in module order (the one whose level the layer is on), its alpha and its output size.

``read_sizes_once`` installs the hooks (``replace_pooling`` calls it); ``remove`` removes them.
Only layers whose forward is torch's own are checked (a subclass may pad in its forward, as
timm's Conv2dSame does): the check never refuses a size the layer takes.
"""
from __future__ import annotations

from torch import Tensor, nn


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _window(m: nn.Module):
    """(kernel, stride, padding, dilation, ceil_mode) per axis of a layer torch checks, or None."""
    forward = type(m).forward
    if forward is nn.Conv2d.forward:
        if isinstance(m.padding, str):  # "same" never shrinks; "valid" is no padding
            return None if m.padding == "same" else (_pair(m.kernel_size), (1, 1), (0, 0), _pair(m.dilation), False)
        return _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation), False
    if forward is nn.MaxPool2d.forward:
        return (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding), _pair(m.dilation),
                m.ceil_mode)
    if forward is nn.AvgPool2d.forward:
        return _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding), (1, 1), m.ceil_mode
    return None


def _output_size(size, k, s, p, d, ceil) -> int:
    """torch's output size along one axis (pooling_output_shape; a convolution's without ceil)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


class _CheckInput:
    """Forward pre-hook: refuse an input smaller than the layer's window, naming the DynOPool2d."""

    def __init__(self, layer_name: str, window, pool: nn.Module, pool_name: str):
        self.layer_name, self.window, self.pool, self.pool_name = layer_name, window, pool, pool_name

    def __call__(self, module, args) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 3:
            return
        k, s, p, d, ceil = self.window
        h, w = x.shape[-2], x.shape[-1]
        if _output_size(h, k[0], s[0], p[0], d[0], ceil) >= 1 and _output_size(w, k[1], s[1], p[1], d[1], ceil) >= 1:
            return
        raise ValueError(self._message(module, h, w))

    def _message(self, module, h, w) -> str:
        from .pool import _read_values  # the error path only: one read of alpha

        k, s, p, d, _ = self.window
        need = [max(0, d[i] * (k[i] - 1) + 1 - 2 * p[i]) for i in range(2)]
        values = _read_values([self.pool])[0]
        alpha = tuple(round(v, 3) for v in self.pool._project(values)[0])
        hw = self.pool._last_input  # of its latest call: the one before this layer
        made = "makes {}x{} maps".format(*self.pool._make_plan(hw, values)[1]) if hw else "shrinks the maps"
        return (f"DynOPool2d '{self.pool_name}' (alpha={alpha}) {made}, and '{self.layer_name}' "
                f"({type(module).__name__} {k[0]}x{k[1]}, padding {p[0]}x{p[1]}) after it gets {h}x{w}, "
                f"smaller than the {need[0]}x{need[1]} it needs: lower that alpha (or its alpha_range's upper "
                f"bound, {tuple(round(v, 3) for v in self.pool.alpha_range)}), or feed a larger input")


def install(model: nn.Module) -> None:
    """Give every layer with a spatial window after a DynOPool2d in ``model`` (module order,
    shared modules at each of their names) the size check; once (a second call changes nothing)."""
    from .pool import DynOPool2d

    remove(model)
    latest = None  # (module, name) of the nearest DynOPool2d before, in module order
    checked = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, DynOPool2d):
            latest = (m, name)
            continue
        if latest is None or id(m) in checked:
            continue
        window = _window(m)
        if window is not None:
            checked.add(id(m))
            m.register_forward_pre_hook(_CheckInput(name, window, *latest))


def remove(model: nn.Module) -> None:
    """Remove ``install``'s hooks from every module of ``model``."""
    for m in model.modules():
        for key in [k for k, h in m._forward_pre_hooks.items() if isinstance(h, _CheckInput)]:
            del m._forward_pre_hooks[key]

