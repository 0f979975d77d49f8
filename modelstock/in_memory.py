"""``modelstock.merge``: Model Stock over state dicts (or modules) in memory, on torch."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import reference
from .layer import cast_output, check_copy, merge_layer
from .plan import InputError, plan_layers
from .ratio import EPS
from .report import MergeReport

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """The one place where the fast path and the reference path are chosen."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "backend='triton': the Triton merge kernels are not part of this release yet; "
            "use backend='torch' (or 'auto')")
    return "torch"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _state_dict(m: Mapping[str, Tensor] | nn.Module, source: str) -> Mapping[str, Tensor]:
    if isinstance(m, nn.Module):
        return m.state_dict()
    if isinstance(m, Mapping):
        bad = next((k for k, v in m.items() if not isinstance(v, Tensor)), None)
        if bad is not None:
            raise InputError(f"is a {type(m[bad]).__name__}, not a tensor", source, bad)
        return m
    raise TypeError(f"{source}: expected a state dict or an nn.Module, got {type(m).__name__}")


def merge(
    base: Mapping[str, Tensor] | nn.Module,
    finetuned: Sequence[Mapping[str, Tensor] | nn.Module],
    *,
    granularity: str = "tensor",
    clamp: bool = True,
    exclude: Sequence[str] = (),
    eps: float = EPS,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    report: MergeReport | None = None,
) -> dict[str, Tensor]:
    """Model Stock: merge N >= 2 fine-tuned models with their pre-trained base, layer by layer.

    ``base`` and each of ``finetuned`` are state dicts or modules with the same floating-point
    tensors (names may differ by ``module.`` / ``_orig_mod.`` prefixes). Returns a new state
    dict under the base's names, in the base's dtypes (or ``out_dtype``). Arithmetic runs in
    ``compute_dtype`` (fp32, or fp64 on request) and every Gram sum in fp64.

    ``granularity``: "tensor" (one ratio per tensor, as the paper) or "row" (one per slice
    along dim 0). ``clamp``: keep cos in [0, 1] (t in [0, 1]); False is the authors' formula.
    ``exclude``: glob patterns of names that get the plain average of the fine-tuned models.
    ``report``: a MergeReport to fill with each layer's figures.
    """
    if isinstance(finetuned, (Mapping, nn.Module)):
        raise TypeError("finetuned must be a sequence of state dicts or modules")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    sources = ["base"] + [f"finetuned[{i}]" for i in range(len(finetuned))]
    sds = [_state_dict(m, s) for m, s in zip([base, *finetuned], sources)]
    layers = plan_layers([{k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()} for sd in sds],
                         sources, granularity=granularity, exclude=exclude)
    device = next(iter(sds[0].values())).device if sds[0] else torch.device("cpu")
    resolve_backend(backend, device)
    if report is not None:
        report.n, report.granularity, report.clamp, report.eps = len(finetuned), granularity, clamp, eps
        report.inputs = sources

    out: dict[str, Tensor] = {}
    for layer in layers:
        tensors = [sd[name] for sd, name in zip(sds, layer.names)]
        if layer.kind == "copy":
            stats = check_copy(layer, tensors, sources, reference)
            out[layer.name] = tensors[0].clone()
        else:
            flat = [t.reshape(-1).to(device=device, dtype=compute_dtype) for t in tensors]
            merged, stats = merge_layer(layer, flat[0], flat[1:], torch.empty_like(flat[0]), sources, reference,
                                        eps=eps, clamp=clamp)
            dtype = dtype_name(out_dtype or tensors[0].dtype)
            out[layer.name] = cast_output(merged, dtype, stats, reference).view(layer.shape)
        if report is not None:
            report.layers.append(stats)
    return out
