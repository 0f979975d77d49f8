"""Model surgery: turn a network's down-sampling into DynOPool layers.

- ``MaxPool2d`` / ``AvgPool2d`` with a 2x2 window and stride 2 -> ``DynOPool2d(alpha=2)``;
- a stride-2 ``Conv2d`` -> the same conv (same weights) at stride 1, then ``DynOPool2d(alpha=2)``.
In a residual block whose main path and shortcut both down-sample (torchvision's
``BasicBlock`` / ``Bottleneck``, open_clip's ``Bottleneck``) the two share one DynOPool2d, so
their sizes always agree. Output shapes at initialisation stay as they were for even sizes.
"""
from __future__ import annotations

import copy

from torch import nn

from .pool import DynOPool2d, read_sizes_once


def _is_2x2_pool(m: nn.Module) -> bool:
    if not isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return False
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (pair(m.kernel_size) == (2, 2) and pair(m.stride or m.kernel_size) == (2, 2)
            and pair(m.padding) == (0, 0) and not getattr(m, "ceil_mode", False))


def _is_stride2_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2)


def _replacement(m: nn.Module, pool: DynOPool2d) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        conv = copy.deepcopy(m)
        conv.stride = (1, 1)
        return nn.Sequential(conv, pool)
    return pool


def replace_pooling(model: nn.Module, *, delta: float = 0.25, learn_delta: bool = True,
                    alpha_range=(1.0, 64.0), delta_range=(0.0, 1.0)) -> list[str]:
    """Replace ``model``'s 2x2 poolings and stride-2 convolutions in place (see the module
    docstring). Returns one line per replacement, naming what became what and what is shared.

    Each new layer keeps alpha in ``alpha_range`` (default: from no change of resolution to a
    64-fold reduction, so the network never costs more than its stride-1 version) and delta in
    ``delta_range``. The model gets ``read_sizes_once``: one device-to-host read of all the
    layers' parameters per forward."""
    def new_pool():
        return DynOPool2d(2.0, delta, learn_delta=learn_delta, alpha_range=alpha_range, delta_range=delta_range)

    done: list[str] = []
    shared: dict[int, tuple[DynOPool2d, str]] = {}
    names = {id(m): n for n, m in model.named_modules()}

    # Residual blocks first: one DynOPool for the main path's and the shortcut's down-sampling.
    for block_name, block in model.named_modules():
        down = getattr(block, "downsample", None)
        if not isinstance(down, nn.Module):
            continue
        main = [m for n, m in block.named_children() if n != "downsample" and (_is_2x2_pool(m) or _is_stride2_conv(m))]
        side = [m for m in down.modules() if _is_2x2_pool(m) or _is_stride2_conv(m)]
        if len(main) == 1 and len(side) == 1:
            pool = new_pool()
            shared[id(main[0])] = (pool, names[id(side[0])])
            shared[id(side[0])] = (pool, names[id(main[0])])

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not (_is_2x2_pool(child) or _is_stride2_conv(child)):
                continue
            pool, partner = shared.get(id(child), (None, None))
            pool = pool or new_pool()
            setattr(parent, child_name, _replacement(child, pool))
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            what = "stride-2 conv -> stride-1 conv + DynOPool2d" if isinstance(child, nn.Conv2d) else \
                f"{type(child).__name__}(2, 2) -> DynOPool2d"
            done.append(f"{full}: {what}" + (f" (shared with {partner})" if partner else ""))
    if done:
        read_sizes_once(model)
    return done
