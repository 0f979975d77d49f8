"""The merge on the Triton kernels (``msdp_kernels/merge.py``): all merged layers of a state dict in
one Gram launch and one merge launch per (storage dtype, output dtype) group.

The tables the kernels read (addresses, tiles) depend only on where the tensors live, so they
are cached: merging the same models again (``merge_`` every k steps of training) reuses them
and allocates nothing but the ratio's few scalars.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from msdp_kernels import merge as kmerge

from .. import reference as _torch_ops
from ..errors import InputError
from ..layer import check_extrapolation, require_finite
from ..methods import Coefficients
from ..plan import Layer
from ..report import LayerStats
from . import LayerEntry

_PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 4


class _Group:
    """One launch's worth of layers: the same storage dtype and output dtype."""

    def __init__(self, layers: list[int], tensors: list[list[Tensor]], outs: list[Tensor], rows: list[int]):
        device = outs[0].device
        n = len(tensors[0]) - 1
        self.layers, self.n = layers, n
        self.inputs = kmerge.Addresses(tensors, device)
        self.outputs = kmerge.Addresses([[o] for o in outs], device)
        npad = kmerge.padded_models(n)
        tile = kmerge.tile_size(npad, self.inputs.base.element_size())
        self.tiles, self.tile_seg, self.seg_tiles = kmerge.tile_table([o.numel() for o in outs], rows, tile, device)
        rows_aligned = all(r == 1 or (o.numel() // r) % 8 == 0 for o, r in zip(outs, rows))
        self.aligned = kmerge.aligned(rows_aligned, self.inputs, self.outputs)
        self.partials = torch.empty(self.tiles.shape[0], npad * npad, dtype=torch.float32, device=device)
        first = [0]
        for r in rows:
            first.append(first[-1] + r)
        self.segments = list(zip(first[:-1], first[1:]))  # each layer's segment range


def _plan(tensors: list[list[Tensor]], outs: list[Tensor], rows: list[int]) -> list[_Group]:
    key = tuple((o.data_ptr(), o.dtype, r, *((t.data_ptr(), t.dtype, t.numel()) for t in ts))
                for ts, o, r in zip(tensors, outs, rows))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    by_dtype: dict[tuple, list[int]] = {}
    for i, (ts, o) in enumerate(zip(tensors, outs)):
        by_dtype.setdefault((ts[0].dtype, o.dtype), []).append(i)
    groups = [_Group(idx, [tensors[i] for i in idx], [outs[i] for i in idx], [rows[i] for i in idx])
              for idx in by_dtype.values()]
    _PLANS[key] = groups
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return groups


class Prepared:
    """Layers ready for the kernels: their inputs in launchable form and the launch tables."""

    def __init__(self, layers: Sequence[Layer], tensors: Sequence[Sequence[Tensor]], outs: Sequence[Tensor]):
        # The kernels read one storage dtype per launch and flat memory: mixed or strided
        # inputs are converted (copies, kept here while the tables point at them).
        self.layers, self.outs = list(layers), list(outs)
        self.tensors = []
        for ts in tensors:
            if any(t.dtype != ts[0].dtype for t in ts):
                ts = [t.float() for t in ts]
            self.tensors.append([t if t.is_contiguous() else t.contiguous() for t in ts])
        self.groups = _plan(self.tensors, self.outs, [layer.rows for layer in layers]) if layers else []


def takes(entry: LayerEntry) -> bool:
    """Whether the kernels merge this layer (a floating, contiguous target with every input on
    its device); the others go to the reference."""
    return (entry.layer.kind == "merge" and entry.out.is_contiguous() and entry.out.is_floating_point()
            and all(t.device == entry.out.device for t in entry.tensors))


class TritonLayers:
    """The layer executor on the kernels (``modelstock/backends/__init__.py``)."""

    def __init__(self, entries: list[LayerEntry], sources, *, method, **_):
        self.sources, self.method = sources, method
        self.prepared = Prepared([e.layer for e in entries], [e.tensors for e in entries], [e.out for e in entries])

    def __call__(self, stats: bool = True) -> dict:
        figures = run(self.prepared, self.sources, self.method, stats=stats)
        return {layer.name: st for layer, st in zip(self.prepared.layers, figures)}


def run(p: Prepared, sources: Sequence[str], method, *, stats: bool = True) -> list[LayerStats | None]:
    """Merge the prepared layers into their outputs with ``method`` (``modelstock/methods``);
    each layer's figures (None if not ``stats``). One host synchronisation per group, for the
    NaN / inf check, after the merge's launch (so the GPU runs the two passes back to back):
    the merge writes nothing unless every coefficient of the group is finite, and the check
    then raises. A method that needs no Gram skips the Gram pass; its check is of the result."""
    result: list[LayerStats | None] = [None] * len(p.layers)
    for g in p.groups:
        rows = sum(s1 - s0 for s0, s1 in g.segments)
        device = g.partials.device
        if method.statistics == "gram":
            gram = kmerge.gram(g.inputs, g.tiles, g.seg_tiles, g.n, g.aligned, g.partials)
            c = method.coefficients(gram, g.n, rows)
            finite = torch.isfinite(gram.diagonal(0, -2, -1)).all(1) & torch.isfinite(c.scale)
        else:
            c = method.coefficients(None, g.n, rows)
            finite = torch.isfinite(torch.as_tensor(c.scale, device=device))
        ok = finite.all().to(torch.int32).reshape(1)
        scale = torch.as_tensor(c.scale, device=device).to(torch.float32)
        weights = None if c.weights is None else torch.as_tensor(c.weights, device=device).to(torch.float32)
        kmerge.merge(g.inputs, g.outputs, g.tiles, g.tile_seg, scale, g.n, g.aligned, ok, weights)
        if not bool(ok):
            _raise_non_finite(g, finite, p.layers, p.tensors, sources, method)
        if method.statistics is None:
            for i in g.layers:
                if not bool(torch.isfinite(p.outs[i]).all()):
                    require_finite(_torch_ops, p.tensors[i], sources, p.layers[i].names)
                    raise InputError("the merged weights overflow the compute dtype", None, p.layers[i].name)
        if stats or not getattr(method, "clamp", True) or method.statistics is None:
            host = Coefficients(_cpu(c.scale), _cpu(c.weights), _cpu(c.figures))
            for i, (s0, s1) in zip(g.layers, g.segments):
                part = Coefficients(host.scale[s0:s1], None if host.weights is None else host.weights[s0:s1],
                                    _rows(host.figures, s0, s1))
                result[i] = method.layer_stats(p.layers[i].name, p.layers[i].shape, part)
                check_extrapolation(p.outs[i], result[i], _torch_ops)
    return result if stats else [None] * len(p.layers)


def _cpu(x):
    """``x`` on the host: a tensor, or a dataclass of tensors (a method's figures), or as it is."""
    if hasattr(x, "cpu"):
        return x.cpu()
    if hasattr(x, "__dataclass_fields__"):
        return type(x)(*(_cpu(getattr(x, f)) for f in x.__dataclass_fields__))
    return x


def _rows(x, s0: int, s1: int):
    """Rows s0:s1 of every field of a method's figures (a dataclass of per-row arrays)."""
    if hasattr(x, "__dataclass_fields__"):
        return type(x)(*(getattr(x, f)[s0:s1] for f in x.__dataclass_fields__))
    return x


def _raise_non_finite(g: _Group, finite: Tensor, layers, tensors, sources, method) -> None:
    """The error layer.py gives for the first layer of the group whose coefficients are not finite."""
    bad_seg = int(torch.nonzero(~finite)[0])
    i = next(i for i, (s0, s1) in zip(g.layers, g.segments) if s0 <= bad_seg < s1)
    require_finite(_torch_ops, tensors[i], sources, layers[i].names)
    raise method.undefined(layers[i].name)
