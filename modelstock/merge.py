"""``modelstock.merge``: Model Stock over state dicts in memory, and the per-layer step that the
file merge shares with it (checks, ratio, statistics)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .plan import InputError, Layer, plan_layers
from .reference import EPS, layer_ratio, merge_into
from .report import LayerStats, MergeReport

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The one place where the fast path and the reference path are chosen."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "backend='triton': the Triton merge kernels are not part of this release yet; "
            "use backend='torch' (or 'auto')")
    return "torch"


def merge_layer(layer: Layer, w0: Tensor, ws: Sequence[Tensor], out: Tensor, sources: Sequence[str], *,
                eps: float = EPS, clamp: bool = True) -> tuple[Tensor, LayerStats]:
    """Merge (or, for an excluded layer, average) one layer into ``out``, all tensors flat and
    of the compute dtype (``out`` may be ``w0``). Returns ``out`` and the layer's figures.
    Raises InputError naming the input at fault when any input holds NaN or inf."""
    if layer.kind == "average":
        for w, source, name in zip(ws, sources[1:], layer.names[1:]):
            _require_finite(w, source, name)
        return merge_into(out, None, ws), LayerStats(layer.name, list(layer.shape), layer.numel, "average")
    r = layer_ratio(w0, ws, layer.rows, eps=eps, clamp=clamp)
    if not torch.isfinite(r.norms).all():
        # A non-finite input makes some ||w_i - w0|| non-finite; name the first such input.
        for w, source, name in zip([w0, *ws], sources, layer.names):
            _require_finite(w, source, name)
    if not torch.isfinite(r.t).all():
        raise InputError("the ratio is undefined: the mean cosine is -1/(N-1), where the authors' "
                         "formula divides by zero (merge with clamp on)", None, layer.name)
    return merge_into(out, w0, ws, r.t), LayerStats.from_ratio(layer.name, layer.shape, r)


def cast_output(merged: Tensor, dtype: torch.dtype, stats: LayerStats, out: Tensor | None = None) -> Tensor:
    """The merged layer in its output dtype (into ``out`` when given). Only an extrapolating
    ratio (clamp off, t outside [0, 1]) can leave the inputs' range, so only then is the result
    checked for overflow."""
    out = merged.to(dtype) if out is None else out.copy_(merged)  # .to is a no-op for the same dtype
    extrapolates = stats.t_min is not None and (stats.t_min < 0 or stats.t_max > 1)
    if extrapolates and not torch.isfinite(out).all():
        raise InputError(f"the extrapolated result (t = {stats.t_min:.3g}..{stats.t_max:.3g}) overflows {dtype}",
                         None, stats.name)
    return out


def check_copy(layer: Layer, tensors: Sequence[Tensor], sources: Sequence[str]) -> LayerStats:
    """Non-float tensors (int buffers, step counters) are kept from the base if all agree."""
    for t, name, source in zip(tensors[1:], layer.names[1:], sources[1:]):
        if t.dtype != tensors[0].dtype or not torch.equal(t.to(tensors[0].device), tensors[0]):
            raise InputError("non-float tensor differs from the base's (Model Stock only merges "
                             "floating-point tensors)", source, name)
    return LayerStats(layer.name, list(layer.shape), layer.numel, "copy")


def _require_finite(t: Tensor, source: str, name: str) -> None:
    if not torch.isfinite(t).all():
        raise InputError("holds NaN or inf", source, name)


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
    layers = plan_layers([{k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} for sd in sds],
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
            stats = check_copy(layer, tensors, sources)
            out[layer.name] = tensors[0].clone()
        else:
            flat = [t.reshape(-1).to(device=device, dtype=compute_dtype) for t in tensors]
            merged, stats = merge_layer(layer, flat[0], flat[1:], torch.empty_like(flat[0]), sources,
                                        eps=eps, clamp=clamp)
            out[layer.name] = cast_output(merged, out_dtype or tensors[0].dtype, stats).view(layer.shape)
        if report is not None:
            report.layers.append(stats)
    return out
