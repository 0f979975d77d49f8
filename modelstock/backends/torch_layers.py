"""Layer executors on the torch reference: non-float tensors copied, floating layers merged one
at a time (CPU tensors, fp64 merges, layouts the kernels do not take)."""
from __future__ import annotations

import torch

from .. import reference
from ..dtypes import dtype_name
from ..layer import cast_output, check_copy, merge_layer
from . import LayerEntry


class CopyLayers:
    """Non-float tensors (int buffers, step counters): the base's when all inputs agree, else as
    the ``int_tensors`` policy says; and tensors only the base has (``missing="base"``)."""

    def __init__(self, entries: list[LayerEntry], sources, *, int_tensors: str = "max", **_):
        self.entries, self.sources, self.policy = entries, sources, int_tensors

    def __call__(self, stats: bool = True) -> dict:
        result = {}
        for e in self.entries:
            value, result[e.layer.name] = check_copy(e.layer, e.tensors, self.sources, reference, self.policy)
            e.out.copy_(value)
        return result


class TorchLayers:
    """Each layer on ``modelstock/reference.py``, in ``compute_dtype``, on the target's device."""

    def __init__(self, entries: list[LayerEntry], sources, *, method, compute_dtype: torch.dtype, **_):
        self.entries, self.sources = entries, sources
        self.method, self.compute_dtype = method, compute_dtype

    def __call__(self, stats: bool = True) -> dict:
        result = {}
        for e in self.entries:
            layer, out = e.layer, e.out
            flat = [t.reshape(-1).to(device=out.device, dtype=self.compute_dtype) for t in e.tensors]
            merged, result[layer.name] = merge_layer(layer, flat[0], flat[1:], torch.empty_like(flat[0]), self.sources,
                                                     reference, method=self.method)
            out.copy_(cast_output(merged, dtype_name(out.dtype), result[layer.name], reference).view(layer.shape))
        return result
