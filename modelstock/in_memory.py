"""``modelstock.merge``: Model Stock over state dicts (or modules) in memory, on torch."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import reference
from . import sharded as sharded_mod
from .layer import cast_output, check_copy, merge_layer
from .plan import InputError, canonical_name, dtype_name, plan_layers
from .ratio import EPS
from .report import MergeReport

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> str:
    """The one place where the fast path and the reference path are chosen: "auto" sends CUDA
    tensors to the Triton kernels (fp32 arithmetic) and everything else to the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    triton_ok = device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    if backend == "auto":
        return "triton" if device.type == "cuda" and compute_dtype == torch.float32 and _has_triton() else "torch"
    if compute_dtype != torch.float32:
        raise ValueError("backend='triton' computes in fp32; use backend='torch' for compute_dtype=torch.float64")
    if not triton_ok:
        raise ValueError("backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)")
    return "triton"


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
    base_sd = _state_dict(base, "base")
    out = {k: torch.empty(v.shape, dtype=out_dtype if out_dtype is not None and v.is_floating_point() else v.dtype,
                          device=v.device) for k, v in base_sd.items()}
    InPlaceMerge([out], base_sd, finetuned, granularity=granularity, clamp=clamp, exclude=exclude, eps=eps,
                 backend=backend, compute_dtype=compute_dtype)(report)
    return out


class InPlaceMerge:
    """Model Stock in place, planned once and run as often as needed: each call writes the
    merged weights into every model of ``targets`` (often the fine-tuned models themselves,
    as in the paper's merging during training).

        merge = modelstock.InPlaceMerge([m1, m2], base_state, [m1, m2])
        ...
        merge()          # e.g. every k optimizer steps

    Options as :func:`merge`. On CUDA the Triton kernels write straight into ``targets[0]``'s
    tensors, then the other targets are copied from it: no host round trip, no allocation
    beyond the ratio's few scalars, one host synchronisation (the NaN / inf check). The tensors
    are bound at construction: build a new one if the models' parameters are re-allocated.
    """

    def __init__(self, targets, base, finetuned, *, granularity: str = "tensor", clamp: bool = True,
                 exclude: Sequence[str] = (), eps: float = EPS, backend: str = "auto",
                 compute_dtype: torch.dtype = torch.float32, sources: Sequence[str] | None = None):
        if isinstance(targets, (Mapping, nn.Module)) or isinstance(finetuned, (Mapping, nn.Module)):
            raise TypeError("targets and finetuned must be sequences of state dicts or modules")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        # how errors name the inputs (file merges pass the paths)
        self.sources = list(sources) if sources else ["base"] + [f"finetuned[{i}]" for i in range(len(finetuned))]
        self.granularity, self.clamp, self.eps = granularity, clamp, eps
        sds = [_state_dict(m, s) for m, s in zip([base, *finetuned], self.sources)]
        self.layers = plan_layers([{k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()} for sd in sds],
                                  self.sources, granularity=granularity, exclude=exclude)
        dest = [{canonical_name(k): v for k, v in _state_dict(m, f"targets[{i}]").items()}
                for i, m in enumerate(targets)]
        device = next(iter(sds[0].values())).device if sds[0] else torch.device("cpu")
        fast = resolve_backend(backend, device, compute_dtype) == "triton"
        self._copy, self._torch, kernel, sharded = [], [], [], []
        for layer in self.layers:
            key = canonical_name(layer.name)
            for i, d in enumerate(dest):
                if key not in d or tuple(d[key].shape) != layer.shape:
                    raise InputError("missing or of another shape than the base's", f"targets[{i}]", layer.name)
            entry = (layer, [sd[name] for sd, name in zip(sds, layer.names)], dest[0][key])
            if _sharded_entry(entry, [d[key] for d in dest], self.sources):
                if layer.kind == "copy":
                    raise InputError("is a sharded non-float tensor; Model Stock merges floating-point ones", None,
                                     layer.name)
                base = entry[1][0]
                if not sharded_mod.is_dtensor(base):  # a full base: this rank keeps its own shard of it
                    base = sharded_mod.local_like(base, entry[2])
                sharded.append((layer, [base, *entry[1][1:]], entry[2]))
            elif layer.kind == "copy":
                self._copy.append(entry)
            elif (fast and layer.kind == "merge" and entry[2].is_contiguous() and entry[2].is_floating_point()
                  and all(t.device == entry[2].device for t in entry[1])):
                kernel.append(entry)
            else:
                self._torch.append(entry)
        self._kernel = None
        if kernel:
            from . import triton_merge

            self._kernel = triton_merge.Prepared([e[0] for e in kernel], [e[1] for e in kernel], [e[2] for e in kernel])
        self._sharded = sharded_mod.ShardedMerge(sharded, self.sources, eps=eps, clamp=clamp,
                                                 compute_dtype=compute_dtype) if sharded else None
        names = [canonical_name(layer.name) for layer in self.layers]
        local = lambda t: t.to_local() if sharded_mod.is_dtensor(t) else t  # noqa: E731
        self._mirrors = [([local(d[k]) for k in names], [local(dest[0][k]) for k in names]) for d in dest[1:]]

    def __call__(self, report: MergeReport | None = None) -> None:
        stats: dict[str, object] = {}
        for layer, tensors, out in self._copy:
            stats[layer.name] = check_copy(layer, tensors, self.sources, reference)
            out.copy_(tensors[0])
        for layer, tensors, out in self._torch:
            flat = [t.reshape(-1).to(device=out.device, dtype=self.compute_dtype) for t in tensors]
            merged, stats[layer.name] = merge_layer(layer, flat[0], flat[1:], torch.empty_like(flat[0]), self.sources,
                                                    reference, eps=self.eps, clamp=self.clamp)
            out.copy_(cast_output(merged, dtype_name(out.dtype), stats[layer.name], reference).view(layer.shape))
        if self._sharded is not None:
            stats.update(self._sharded())
        if self._kernel is not None:
            from . import triton_merge

            ks = triton_merge.run(self._kernel, self.sources, eps=self.eps, clamp=self.clamp, stats=report is not None)
            stats.update((layer.name, st) for layer, st in zip(self._kernel.layers, ks))
        for dst, src in self._mirrors:
            torch._foreach_copy_(dst, src)
        if report is not None:
            report.n, report.granularity, report.clamp, report.eps = (len(self.sources) - 1, self.granularity,
                                                                       self.clamp, self.eps)
            report.inputs = self.sources
            report.layers.extend(stats[layer.name] for layer in self.layers)


def _sharded_entry(entry, targets, sources) -> bool:
    """Whether a layer's fine-tuned tensors and targets are DTensors (the base may be either:
    a full tensor is sliced to each rank's shard); a mix is an error."""
    layer, tensors, _ = entry
    kinds = [sharded_mod.is_dtensor(t) for t in [*tensors[1:], *targets]]
    if any(kinds) and not all(kinds):
        who = [s for s, k in zip([*sources[1:], *(f"targets[{i}]" for i in range(len(targets)))], kinds) if not k]
        raise InputError(f"is a DTensor in some models and a plain tensor in others ({', '.join(who)}): shard "
                         "every model alike", None, layer.name)
    return bool(kinds) and all(kinds)


def merge_(targets, base, finetuned, *, report: MergeReport | None = None, **options) -> None:
    """Model Stock in place, once: ``InPlaceMerge(targets, base, finetuned, **options)(report)``.
    Repeated merges of the same models should keep one :class:`InPlaceMerge` instead."""
    InPlaceMerge(targets, base, finetuned, **options)(report)
