"""Model surgery: turn a network's stride-2 down-sampling into DynOPool layers, keeping its shapes.

Sites: ``MaxPool2d`` / ``AvgPool2d`` with a 2x2 window and stride 2 become a ``DynOPool2d``; a
``MaxPool2d`` with a k x k window at stride 2 (ResNet's 3x3 stem pool, GoogLeNet, Inception,
SqueezeNet, AlexNet) too, with delta (k - 1) / 4 so that its 4 queries span the window (a change
of function, reported); a stride-2 ``Conv2d`` (any subclass: timm's wrapped and
weight-standardised convs too) becomes a ``DynOPool2d`` then the same conv (same weights) at
stride 1 ("pool first", the default: the conv runs on the pooled map, so the network costs what
it did at init, and the cost loss can take it below that), padded where it would shrink the
map; ``placement="conv_first"`` puts the stride-1 conv before the DynOPool instead (that conv
then runs at full resolution: ~4x its MACs at init). The spec's two rules
(``docs/spec.md``, "Surgery (replacing down-sampling)"):

- Same shapes at init. Each site's own size rule, out = floor((H + c) / 2), is measured on
  small inputs, and its DynOPool gets floor(H / alpha + c / 2): the same sizes at alpha = 2 for
  every H (a padded 3x3 or 1x1 stride-2 conv gives ceil(H / 2), a pool or ConvNeXt's 2x2 conv
  floor(H / 2)).
- Sizes that must agree stay agreed. All sites that take the same feature level (the same
  input size at init, at the example size and at an odd one) with the same rule share one
  DynOPool2d, whatever module wraps them: a residual block's main path and shortcut, the
  branches of a ShuffleNet unit, timm's ConvNormAct-wrapped RegNet blocks.

Both are checked on the model itself before ``replace_pooling`` returns: every unchanged
module sees the same input and output shapes as before at the example size and at an odd one,
and a forward with every level's alpha moved (to different values) runs. A level whose alpha
cannot move without breaking the network (its maps meet a path no DynOPool drives, or a head
built for one grid) is left as it was; anything else that fails restores the model and raises.
``restore_pooling`` undoes a surgery (the original modules, with the weights trained since).
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .cost import _layer_macs
from . import probe
from .pool import DynOPool2d, read_sizes_once, remove_read_sizes_once

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
PLACEMENTS = ("pool_first", "conv_first")


@dataclass
class Site:
    """One replaced module: where it was, what it was, which DynOPool drives it."""
    name: str
    was: str
    change: str | None  # None: the same function at alpha 2 on even sizes
    pool: int  # index in SurgeryReport.pools
    input_size: tuple[int, int]  # at the example size
    output_size: tuple[int, int]


@dataclass
class PoolInfo:
    """One DynOPool2d and the sites it drives (all take the same feature level)."""
    module: DynOPool2d
    name: str  # where the module is registered first
    sites: list[str]
    input_size: tuple[int, int]  # at the example size, at init
    output_size: tuple[int, int]
    alpha_at_init: tuple[float, float] = (2.0, 2.0)


@dataclass
class SurgeryReport:
    """What ``replace_pooling`` did. ``str(report)`` is a readable summary: the sizes at init
    and, once alpha has moved, the sizes and the cost now (one forward at the example size)."""
    example_size: tuple[int, int]
    odd_size: tuple[int, int] | None  # the second size checked; None where the original rejects it
    pools: list[PoolInfo] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)  # (module, why it was left)
    macs_original: int = 0  # conv + linear MACs at the example size, before
    macs_at_init: int = 0  # after, alpha at its initial value everywhere
    placement: str = "pool_first"
    example_shape: tuple | None = None  # the example input's shape (batch included)
    _model: object = field(default=None, repr=False, compare=False)  # a weakref to the model

    @property
    def changed_function(self) -> list[Site]:
        return [s for s in self.sites if s.change]

    def __len__(self) -> int:
        return len(self.sites)

    def __getstate__(self):  # a weakref does not pickle
        return {**self.__dict__, "_model": None}

    def now(self) -> tuple[list[tuple], int] | None:
        """([(input size, output size, alpha) per pool], conv + linear MACs) at the example size
        now, or None where the model is gone or its parameters are not plain tensors (FSDP2)."""
        model = self._model() if self._model is not None else None
        if model is None or self.example_shape is None or not self.pools:
            return None
        if any(type(p.module.alpha.data) is not torch.Tensor for p in self.pools):
            return None
        found = sizes(model, self.example_shape)
        by_module = {}
        for _, module, hw_in, hw_out in found["calls"]:
            by_module.setdefault(module, (hw_in, hw_out))
        return ([(*by_module.get(p.module, (None, None)), tuple(p.module.alpha.detach().tolist()))
                 for p in self.pools], found["macs"])

    def __str__(self) -> str:
        h, w = self.example_size
        lines = [f"replace_pooling: {len(self.sites)} site(s) -> {len(self.pools)} DynOPool2d ({self.placement}), "
                 f"shapes at init checked equal to the original's at {h}x{w}"
                 + (f" and {self.odd_size[0]}x{self.odd_size[1]}" if self.odd_size else
                    " (the original rejects the odd size tried)")]
        now = self.now()
        moved = now is not None and any(
            (i_now, o_now) != (p.input_size, p.output_size) or a != p.alpha_at_init
            for p, (i_now, o_now, a) in zip(self.pools, now[0]))
        for i, p in enumerate(self.pools):
            line = f"  pool {i} ({p.name}): {_hw(p.input_size)} -> {_hw(p.output_size)}"
            if moved:
                i_now, o_now, a = now[0][i]
                line += (" at init, now " + (f"{_hw(i_now)} -> {_hw(o_now)}" if i_now else "not called")
                         + f" (alpha {a[0]:.3f}, {a[1]:.3f})")
            lines.append(f"{line}, {p.module.size_rule()}, drives {', '.join(p.sites)}")
        changes: dict[str, list[str]] = {}
        for s in self.changed_function:
            changes.setdefault(s.change, []).append(f"{s.name} ({s.was})")
        if changes:
            lines.append("  changed function:")
            lines += [f"    {change}: {', '.join(names)}" for change, names in changes.items()]
        if self.left:
            lines.append("  left as they were:")
            lines += [f"    {name}: {why}" for name, why in self.left]
        if self.macs_original:
            ratio = self.macs_at_init / self.macs_original
            lines.append(f"  cost at init: {self.macs_at_init / 1e6:,.1f} M MACs, {ratio:.2f}x the original's "
                         f"{self.macs_original / 1e6:,.1f} M at {h}x{w}"
                         + (" (the replaced convs run at stride 1 before their DynOPool)" if ratio > 1.05 else ""))
            if moved:
                lines.append(f"  cost now: {now[1] / 1e6:,.1f} M MACs, {now[1] / self.macs_original:.2f}x the "
                             "original's")
        return "\n".join(lines)


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def replace_pooling(model: nn.Module, example_input=None, *, delta: float | None = None, learn_alpha: bool = True,
                    learn_delta: bool = True, alpha_range=(1.0, 64.0), delta_range=(0.0, 1.0),
                    exclude=(), placement: str = "pool_first") -> SurgeryReport:
    """Replace ``model``'s stride-2 poolings and convolutions in place by DynOPool2d layers
    (see the module docstring) and return a ``SurgeryReport`` (print it).

    ``example_input``: a tensor, or a shape (batch included), the network takes; default
    (1, C, 224, 224) with C the first convolution's input channels. The levels, the checks and
    the cost figures are taken at its size (and at an odd size near it). ``exclude``: module
    names (globs) to leave as they are. ``learn_alpha=False`` for a network whose sizes must
    not move (a head built for one grid): then only delta learns and alpha is not moved in the
    check. Each new layer keeps alpha in ``alpha_range`` (default: from no change of resolution
    to a 64-fold reduction) and delta in ``delta_range``; delta starts at ``delta`` where given,
    else at (k - 1) / 4 for a k x k max pool's site (0.25: a 2x2 window; 0.5: a 3x3 one) and
    0.25 for a conv's (the sites of one level share the largest). ``placement``: "pool_first"
    (a stride-2 conv becomes DynOPool2d then the conv at stride 1: the same MACs at init) or
    "conv_first" (the conv at stride 1 then DynOPool2d). The model gets ``read_sizes_once``:
    one device-to-host read of all the layers' parameters per forward; ``restore_pooling``
    undoes the surgery."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    x = _example(model, example_input)
    odd = x.new_zeros(*x.shape[:-2], _odd(x.shape[-2]), _odd(x.shape[-1]) + 2)  # not square: h and w apart
    report = SurgeryReport(tuple(x.shape[-2:]), tuple(odd.shape[-2:]), placement=placement,
                           example_shape=tuple(x.shape), _model=weakref.ref(model))
    places = _places(model)
    sites, report.left = _find_sites(model, places, tuple(exclude), x)

    before = _probe(model, x, sites)
    try:
        before_odd = _probe(model, odd, sites)
    except Exception:  # noqa: BLE001 - the original does not take that size: nothing to keep there
        before_odd, report.odd_size = None, None
    report.macs_original = before.macs
    sites = [s for s in sites if s.module in before.site_inputs]  # never called: nothing to replace
    _build(sites, before, before_odd, delta, learn_alpha, learn_delta, alpha_range, delta_range)
    _install(model, places, sites, placement)
    try:
        _check_shapes(model, x, before, "the example size")
        if before_odd is not None:
            _check_shapes(model, odd, before_odd, f"{_hw(odd.shape[-2:])}")
        if learn_alpha and alpha_range[0] < alpha_range[1]:
            sites = _keep_levels_that_move(model, places, sites, x, alpha_range, report)
        after = _probe(model, x, [])
    except Exception:
        _uninstall(model, places, sites)
        raise

    report.macs_at_init = after.macs
    _describe(report, model, sites, before)
    if report.sites:
        read_sizes_once(model)
        _remember(model, places, sites, placement)
    failed = [(n, why) for n, why in report.left if why.startswith("its level")]
    if failed and not report.sites:
        raise ValueError("replace_pooling: no site can take a DynOPool2d whose alpha moves:\n"
                         + "\n".join(f"  {n}: {why}" for n, why in failed)
                         + "\n(for a network whose sizes must stay as they are, replace_pooling(..., "
                           "learn_alpha=False) learns delta only)")
    if failed:
        warnings.warn("replace_pooling left some down-sampling sites as they were:\n"
                      + "\n".join(f"  {n}: {why}" for n, why in failed), stacklevel=2)
    if not report.sites and not any(isinstance(m, DynOPool2d) for m in model.modules()):  # not a second surgery
        warnings.warn("replace_pooling replaced nothing: no MaxPool2d / AvgPool2d module with stride 2 and no "
                      "stride-2 Conv2d module ran in the example forward"
                      + (" (left: " + "; ".join(f"{n}: {why}" for n, why in report.left) + ")" if report.left else "")
                      + "; pooling written in forward (F.max_pool2d) is invisible to it: make it a module "
                        "(nn.MaxPool2d) or put DynOPool2d there by hand", stacklevel=2)
    return report


def restore_pooling(model: nn.Module) -> nn.Module:
    """Undo ``replace_pooling`` on ``model`` in place (and return it): every replaced module is
    back where it was, a pool as it was, a conv at its own stride and padding with the weights
    it has now (trained since, if it was), so the state dict has the original's names again.
    The DynOPool2d layers and the size-read hooks go; a model without a surgery is returned as
    it is. Works on a copy of the model too (``copy.deepcopy``, ``torch.save``): it goes by name."""
    records = model.__dict__.pop("_dynopool_surgery", [])
    for rec in reversed(records):  # the last surgery first
        current = model.get_submodule(rec["names"][0])
        if rec["kind"] == "conv":
            conv = current[1] if rec["placement"] == "pool_first" else current[0]
            conv.stride, conv.padding = rec["stride"], rec["padding"]
            original = conv
        else:
            original = rec["pool"]
        for name in rec["names"]:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, original)
    if not any(isinstance(m, DynOPool2d) for m in model.modules()):
        remove_read_sizes_once(model)
    return model


def sizes(model: nn.Module, example_input) -> dict:
    """What one forward at ``example_input`` (a tensor or a shape, batch included) shows now:
    ``{"calls": [(name, module, input (h, w), output (h, w)) per DynOPool2d call], "macs":
    conv + linear MACs}`` (eval mode, no gradient, the mode restored)."""
    x = probe.example_tensor(model, example_input)
    names = {id(m): n for n, m in model.named_modules()}
    calls = []

    def hook(module, args, output):
        calls.append((names.get(id(module), ""), module, tuple(args[0].shape[-2:]), tuple(output.shape[-2:])))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DynOPool2d)]
    rec = _probe(model, x, [], extra=handles)
    return {"calls": calls, "macs": rec.macs}


# --------------------------------------------------------------------------- finding sites

@dataclass(eq=False)
class _Site:
    name: str
    module: nn.Module
    rule: tuple[int, int]  # c per axis: out = floor((H + c) / 2)
    delta: tuple[float, float] = (0.25, 0.25)  # the queries' spread that matches its window
    replacement: nn.Module | None = None  # the stride-1 conv for a conv site
    pool_module: DynOPool2d | None = None


def _example(model: nn.Module, example_input) -> Tensor:
    if example_input is not None:
        return probe.example_tensor(model, example_input)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("replace_pooling: no Conv2d to infer the input channels from; pass example_input")
    return probe.example_tensor(model, (1, conv.in_channels, 224, 224))


def _odd(n: int) -> int:
    """An odd size near n, not n: the size that shows a site's rounding."""
    return n + 1 if n % 2 == 0 else n + 2


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Every (parent, attribute, full name) each module is registered at, by id."""
    places: dict[int, list] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if all(p is not parent or a != child_name for p, a, _ in places.get(id(child), [])):
                places.setdefault(id(child), []).append((parent, child_name, full))
    return places


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _kind(m: nn.Module) -> str | None:
    """'pool' / 'conv' for a candidate site, None for anything else."""
    if isinstance(m, _POOLS):
        dil = _pair(getattr(m, "dilation", 1))
        if (_pair(m.kernel_size) == (2, 2) and _pair(m.stride or m.kernel_size) == (2, 2)
                and _pair(m.padding) == (0, 0) and dil == (1, 1)):
            return "pool"
        # a k x k max window at stride 2 (the 3x3 of ResNet's stem, GoogLeNet, Inception, ...)
        if (isinstance(m, nn.MaxPool2d) and _pair(m.stride or m.kernel_size) == (2, 2) and dil == (1, 1)
                and not m.return_indices):
            return "pool"
    if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
        return "conv"
    return None


def _describe_module(m: nn.Module) -> str:
    k = "x".join(map(str, _pair(m.kernel_size)))
    s = "x".join(map(str, _pair(m.stride or m.kernel_size)))
    return f"{type(m).__name__} {k} stride {s}"


def _find_sites(model, places, exclude, x) -> tuple[list[_Site], list[tuple[str, str]]]:
    sites, left, seen = [], [], set()
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            kind = _kind(child)
            strided = isinstance(child, (*_POOLS, nn.Conv2d)) and max(_pair(child.stride or child.kernel_size)) > 1
            if kind is None:
                if strided:
                    left.append((name, f"{_describe_module(child)}: only max pools at stride 2, 2x2 average "
                                       "pools and stride-2 convolutions are replaced"))
                continue
            if any(fnmatch.fnmatchcase(p[2], pat) for p in places[id(child)] for pat in exclude):
                left.append((name, "excluded"))
                continue
            site, why = _site(name, child, kind, x)
            if site is None:
                left.append((name, f"{_describe_module(child)}: {why}"))
            else:
                sites.append(site)
    return sites, left


def _site(name: str, m: nn.Module, kind: str, x: Tensor) -> tuple[_Site | None, str]:
    """The site with its measured size rule (and the stride-1 conv), or None and why not."""
    if kind == "conv":
        like, channels = m.weight, m.in_channels
        eff = max(d * (k - 1) + 1 for d, k in zip(_pair(m.dilation), _pair(m.kernel_size)))
    else:
        like, channels, eff = x, 1, max(_pair(m.kernel_size))
    measured = _sizes(m, channels, eff, like)
    if measured is None:
        return None, "it does not run on a small input of its own"
    rule = tuple(_axis_rule(axis) for axis in measured)
    if None in rule:
        return None, "its output size is not floor((H + c) / 2)"
    # queries spread over the window: (k - 1) pixels apart at a cell of 2 pixels (k = 2: the
    # spec's 0.25, exactly max_pool2d)
    window = tuple((k - 1) / 4 for k in _pair(m.kernel_size)) if kind == "pool" else (0.25, 0.25)
    site = _Site(name, m, rule, window)
    if kind == "conv":
        site.replacement = _stride1(m, channels, eff)
        if site.replacement is None:
            return None, "no stride-1 version of it keeps the input's size"
    return site, ""


def _sizes(m: nn.Module, channels: int, eff: int, like: Tensor):
    """Output sizes along H and along W at four input sizes each: ({H: h_out}, {W: w_out})."""
    n = eff + 4
    hs, ws = {}, {}
    try:
        with torch.no_grad():
            for h, w in ((n, n + 1), (n + 1, n), (n + 2, n + 3), (n + 3, n + 2)):
                out = m(torch.zeros(1, channels, h, w, dtype=like.dtype, device=like.device))
                hs[h], ws[w] = out.shape[-2], out.shape[-1]
    except Exception:  # noqa: BLE001 - a module that needs more than a tensor: not a site we understand
        return None
    return hs, ws


def _axis_rule(outs: dict[int, int]) -> int | None:
    """c with out(H) = floor((H + c) / 2) at every measured H, or None."""
    h0 = min(outs)
    for c in (2 * outs[h0] - h0, 2 * outs[h0] - h0 + 1):
        if all(o == (h + c) // 2 for h, o in outs.items()):
            return c
    return None


def _stride1(conv: nn.Conv2d, channels: int, eff: int) -> nn.Module | None:
    """The same conv (a copy: same weights) at stride 1, keeping the input's size: as it is
    where its padding already does (3x3 pad 1, 1x1, 7x7 pad 3), else with 'same' zero padding
    (ConvNeXt's 2x2 conv gives H - 1 at stride 1)."""
    new = copy.deepcopy(conv)
    new.stride = (1, 1)

    def keeps_size():
        sizes = _sizes(new, channels, eff, conv.weight)
        return sizes is not None and all(o == i for axis in sizes for i, o in axis.items())

    if keeps_size():
        return new
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        new.padding = "same"
        if keeps_size():
            return new
    return None


# --------------------------------------------------------------------------- probes and checks

class _Record:
    """One forward's input and output shapes of every module (by identity), the sites' input
    sizes, and the conv + linear MACs."""

    def __init__(self):
        self.shapes: dict[int, list] = {}
        self.site_inputs: dict[nn.Module, tuple[int, int]] = {}
        self.site_outputs: dict[nn.Module, tuple[int, int]] = {}
        self.macs = 0


def _shapes(tree) -> list:
    return [tuple(t.shape) for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _probe(model: nn.Module, x: Tensor, sites, extra=()) -> _Record:
    rec = _Record()
    site_modules = {s.module for s in sites}

    def hook(module, args, kwargs, output):
        rec.shapes.setdefault(id(module), []).append((_shapes((args, kwargs)), _shapes(output)))
        if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(output, Tensor):
            rec.macs += _layer_macs(module, output)
        if module in site_modules and module not in rec.site_inputs:
            rec.site_inputs[module] = tuple(args[0].shape[-2:])
            rec.site_outputs[module] = tuple(output.shape[-2:])

    probe.run(model, x, [*extra, *(m.register_forward_hook(hook, with_kwargs=True) for m in model.modules())])
    return rec


def _check_shapes(model: nn.Module, x: Tensor, before: _Record, where: str) -> None:
    after = _probe(model, x, [])
    names = {id(m): n for n, m in model.named_modules()}
    for key, calls in after.shapes.items():
        if key in before.shapes and before.shapes[key] != calls:
            raise ValueError(f"replace_pooling: after surgery, {names.get(key) or 'the model'} sees other shapes "
                             f"at {where} than before ({before.shapes[key][:1]} -> {calls[:1]}); the model is "
                             "restored (please report this network)")


def _build(sites, before, before_odd, delta, learn_alpha, learn_delta, alpha_range, delta_range) -> None:
    """One DynOPool2d per feature level and rule: sites with the same input size at the example
    size (and at the odd size) and the same rule share it."""
    levels: dict[tuple, list] = {}
    for s in sites:
        key = (before.site_inputs[s.module], before_odd.site_inputs.get(s.module) if before_odd else None, s.rule)
        levels.setdefault(key, []).append(s)
    for level in levels.values():
        # one pool, one delta: the widest window of the level's sites (a max pool's, beside a conv)
        spread = delta if delta is not None else [max(s.delta[axis] for s in level) for axis in (0, 1)]
        spread = [min(max(d, delta_range[0]), delta_range[1]) for d in _pair(spread)]
        pool = DynOPool2d(2.0, spread, learn_alpha=learn_alpha, learn_delta=learn_delta, alpha_range=alpha_range,
                          delta_range=delta_range, size_offset=tuple(c / 2 for c in level[0].rule))
        for s in level:
            s.pool_module = pool


def _install(model, places, sites, placement) -> None:
    for s in sites:
        if s.replacement is None:
            new = s.pool_module
        elif placement == "pool_first":
            new = nn.Sequential(s.pool_module, s.replacement)
        else:
            new = nn.Sequential(s.replacement, s.pool_module)
        for parent, attr, _ in places[id(s.module)]:
            setattr(parent, attr, new)


def _remember(model, places, sites, placement) -> None:
    """What ``restore_pooling`` needs, by name (a copy of the model keeps it): a pool site's
    module (no parameters), a conv site's stride and padding (its weights are the ones it has)."""
    records = model.__dict__.setdefault("_dynopool_surgery", [])
    for s in sites:
        rec = {"names": [full for _, _, full in places[id(s.module)]], "placement": placement}
        if s.replacement is None:
            rec.update(kind="pool", pool=s.module)
        else:
            rec.update(kind="conv", stride=s.module.stride, padding=s.module.padding)
        records.append(rec)


def _uninstall(model, places, sites) -> None:
    for s in sites:
        for parent, attr, _ in places[id(s.module)]:
            setattr(parent, attr, s.module)


def _keep_levels_that_move(model, places, sites, x, alpha_range, report) -> list:
    """The sites whose level's alpha can move; the others are put back and reported as left."""
    stuck = _check_alpha_moves(model, x, sites, alpha_range)
    if not stuck:
        return sites
    for s in sites:
        if s.pool_module in stuck:
            report.left.append((s.name, f"its level's alpha cannot move: {stuck[s.pool_module]}"))
    _uninstall(model, places, [s for s in sites if s.pool_module in stuck])
    kept = [s for s in sites if s.pool_module not in stuck]
    if kept:
        _check_alpha_moves(model, x, kept, alpha_range, diagnose=False)
    return kept


def _check_alpha_moves(model, x, sites, alpha_range, diagnose=True) -> dict:
    """Run the model with every level's alpha moved, each to its own values; where that fails,
    find (one level at a time) the levels whose alpha cannot move. Returns {pool: why}.

    Each move is tried two ways: h shrinking and w growing (sizes apart per axis), and, where
    that fails, both growing (a network near its smallest input, Inception at 97 px, has no
    room for a map to shrink: that is the size's limit, met at run time with a clear error, not
    sizes that disagree)."""
    pools = list(dict.fromkeys(s.pool_module for s in sites))
    lo, hi = alpha_range

    def moved(i, grow):
        a = (1.6 - 0.04 * i, 1.45 - 0.03 * i) if grow else (2.35 + 0.05 * i, 1.7 - 0.03 * i)
        return torch.tensor([min(max(v, lo), hi) for v in a])

    def run_once(which, grow) -> str | None:
        with torch.no_grad():
            for i, p in enumerate(pools):
                p.alpha.copy_(moved(i, grow) if p in which else torch.tensor([2.0, 2.0]))
        try:
            probe.run(model, x)
            return None
        except Exception as e:  # noqa: BLE001 - any failure means this alpha cannot move
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            with torch.no_grad():
                for p in pools:
                    p.alpha.fill_(2.0)

    def run(which) -> str | None:
        failure = run_once(which, grow=False)
        return failure if failure is None or run_once(which, grow=True) is not None else None

    failure = run(set(pools))
    if failure is None:
        return {}
    if not diagnose:
        raise ValueError(f"replace_pooling: the network fails when its DynOPool levels move together ({failure}); "
                         "the model is restored (for a network whose sizes must stay as they are, "
                         "replace_pooling(..., learn_alpha=False) learns delta only)")
    return {p: why for p in pools if (why := run({p})) is not None} or \
        {p: failure for p in pools}  # only together: none can be kept with confidence


def _describe(report: SurgeryReport, model: nn.Module, sites, before: _Record) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    index: dict[DynOPool2d, int] = {}
    for s in sites:
        p = s.pool_module
        if p not in index:
            index[p] = len(report.pools)
            report.pools.append(PoolInfo(p, names.get(id(p), s.name), [], before.site_inputs[s.module],
                                         before.site_outputs[s.module], tuple(p.alpha.detach().tolist())))
        report.pools[index[p]].sites.append(s.name)
        report.sites.append(Site(s.name, _describe_module(s.module), _change(s.module, report.placement), index[p],
                                 before.site_inputs[s.module], before.site_outputs[s.module]))


def _change(m: nn.Module, placement: str) -> str | None:
    if isinstance(m, nn.MaxPool2d) and _pair(m.kernel_size) != (2, 2):
        return ("k x k max pool at stride 2 -> DynOPool with its 4 queries spread over the window (the largest "
                "of 4 bilinear samples, not of the k x k pixels; delta (k - 1) / 4)")
    if isinstance(m, nn.MaxPool2d) and not m.ceil_mode and _pair(m.padding) == (0, 0):
        return None
    if isinstance(m, nn.AvgPool2d):
        return "average -> max (DynOPool keeps the largest of 4 bilinear samples per cell)"
    if isinstance(m, nn.MaxPool2d):
        return "ceil-mode max pool -> DynOPool (its last cell spans the border pixel differently)"
    if placement == "pool_first":
        return ("stride-2 conv -> a max over each 2x2 window (DynOPool) + the same conv at stride 1 on the pooled "
                "map (the original kept one sample per window; the conv then sees a 2x wider field)")
    return ("stride-2 conv -> the same conv at stride 1 + a max over each 2x2 window "
            "(the original kept one sample per window)")
