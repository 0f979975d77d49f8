"""Where the merge's arithmetic runs. Two contracts:

**Per-layer math** (``modelstock/layer.py`` calls it as ``ops``): ``gram``, ``merge_into`` (with a
method's per-row scale and per-model weights),
``all_finite``, ``cast``, ``widen``, ``equal``, ``maximum`` (optionally ``merge_from_mean_delta``), over flat
arrays of the compute dtype. ``modelstock/reference.py`` is it on torch tensors (the spec made
executable); ``numpy_ops.py`` is the same math on numpy arrays for the torch-free file merge.

**Layer executors** (what ``InPlaceMerge`` hands its layers to): built once from
``LayerEntry``s and the merge method (``modelstock/methods``: which statistics to compute, and
the coefficients from them), called for every merge; each call writes every entry's result
into its ``out`` and returns ``{layer name: LayerStats}``:
  torch_layers.CopyLayers   non-float tensors, kept from the base when all agree
  torch_layers.TorchLayers  one layer at a time on the reference (CPU, fp64, odd layouts)
  triton.TritonLayers       all layers in one Gram launch and one merge launch per dtype group
  sharded.ShardedLayers     DTensors (FSDP2), merged where they lie, one all-reduce per merge
"""
from __future__ import annotations

from dataclasses import dataclass

from msdp_kernels.dispatch import check_backend, choose_backend

from ..dtypes import dtype_name
from ..plan import Layer


@dataclass
class LayerEntry:
    layer: Layer
    tensors: list   # the layer in each input, base first (torch tensors)
    out: object     # where the merged layer goes (the first target's tensor)


def resolve_backend(backend: str, device, compute_dtype="float32") -> str:
    """The kernels compute in fp32: "auto" takes them for fp32 merges of CUDA tensors, and
    "triton" with another compute dtype is an error (see ``msdp_kernels/dispatch.py``)."""
    check_backend(backend)
    fp32 = dtype_name(compute_dtype) == "float32"
    if backend == "triton" and not fp32:
        raise ValueError("backend='triton' computes in fp32; use backend='torch' for compute_dtype=torch.float64")
    return choose_backend(backend, device, kernels_take=fp32)
