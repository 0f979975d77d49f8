"""``modelstock.merge``: Model Stock over state dicts (or modules) in memory, on torch."""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..backends import LayerEntry, resolve_backend
from ..backends import sharded as sharded_backend
from ..backends.torch_layers import CopyLayers, TorchLayers
from ..dtypes import dtype_name
from ..errors import InputError
from ..plan import canonical_name, dropped_tensors, plan_layers, warn_unmatched
from ..ratio import EPS
from ..report import MergeReport
from . import adapters
from .agreement import Agreement
from .options import MergeOptions
from .storage import mirror_copies, tied_layers, tied_names


def state_dict_of(m: Mapping[str, Tensor] | nn.Module, source: str) -> Mapping[str, Tensor]:
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
    int_tensors: str = "max",
    missing: str = "refuse",
    report: MergeReport | None = None,
    method="model_stock",
) -> dict[str, Tensor]:
    """Model Stock: merge N >= 2 fine-tuned models with their pre-trained base, layer by layer.

    ``base`` and each of ``finetuned`` are state dicts or modules with the same floating-point
    tensors (names may differ by ``module.`` / ``_orig_mod.`` prefixes). Returns a new state
    dict under the base's names, in the base's dtypes (or ``out_dtype``). Arithmetic runs in
    ``compute_dtype`` (fp32, or fp64 on request) and every Gram sum in fp64.

    ``granularity``: "tensor" (one ratio per tensor, as the paper) or "row" (one per slice
    along dim 0). ``clamp``: keep cos in [0, 1] (t in [0, 1]); False is the authors' formula.
    ``exclude``: glob patterns of names that get the plain average of the fine-tuned models.
    ``int_tensors``: non-float tensors that differ between the models (BatchNorm's
    ``num_batches_tracked`` after any fine-tune in train mode) get the largest value ("max"),
    the base's ("base"), or are an error ("refuse"). ``missing``: a tensor some fine-tuned
    model lacks is an error ("refuse") or the base's ("base"; one only fine-tuned models have
    is then left out, as mergekit does).
    ``report``: a MergeReport to fill with each layer's figures. ``method``: "model_stock"
    (default), "uniform" (the fine-tuned models' average), "wise_ft" (one fine-tuned model,
    alpha 0.5) or a ``modelstock.methods.MergeMethod`` (``WiseFT(alpha=0.3)``); ``clamp`` and
    ``eps`` are Model Stock's. A fine-tuned model may be a PEFT LoRA model (``PeftModel``):
    the method then runs on its factors (``modelstock/merging/adapters.py``), on the CPU.
    """
    if isinstance(finetuned, (Mapping, nn.Module)):
        raise TypeError("finetuned must be a sequence of state dicts or modules")
    options = MergeOptions(granularity, clamp, tuple(exclude), eps, backend, out_dtype, dtype_name(compute_dtype),
                           int_tensors, missing, method)
    if any(adapters.is_peft_model(m) for m in finetuned):  # LoRA models: merged from their factors
        return adapters.merge_in_memory(base, finetuned, options, report)
    out_type = None if options.out_dtype is None else getattr(torch, options.out_dtype)
    base_sd = state_dict_of(base, "base")
    out = {k: torch.empty(v.shape, dtype=out_type if out_type is not None and v.is_floating_point() else v.dtype,
                          device=v.device) for k, v in base_sd.items()}
    InPlaceMerge([out], base_sd, finetuned, granularity=granularity, clamp=clamp, exclude=exclude, eps=eps,
                 backend=backend, compute_dtype=compute_dtype, int_tensors=int_tensors, missing=missing,
                 method=options.method)(report)
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
                 compute_dtype: torch.dtype = torch.float32, int_tensors: str = "max", missing: str = "refuse",
                 sources: Sequence[str] | None = None, method="model_stock"):
        if isinstance(targets, (Mapping, nn.Module)) or isinstance(finetuned, (Mapping, nn.Module)):
            raise TypeError("targets and finetuned must be sequences of state dicts or modules")
        if any(adapters.is_peft_model(m) for m in [base, *finetuned, *targets]):
            raise InputError("a PEFT LoRA model: merging in place works on full weights; modelstock.merge (or "
                             "merge_files with adapter=True) merges LoRA models from their factors")
        options = MergeOptions(granularity, clamp, tuple(exclude), eps, backend,
                               compute_dtype=dtype_name(compute_dtype), int_tensors=int_tensors, missing=missing,
                               method=method)
        self.options = options
        self.compute_dtype = options.torch_compute_dtype
        # how errors name the inputs (file merges pass the paths)
        self.sources = list(sources) if sources else ["base"] + [f"finetuned[{i}]" for i in range(len(finetuned))]
        self.granularity, self.clamp, self.eps = granularity, clamp, eps
        sds = [state_dict_of(m, s) for m, s in zip([base, *finetuned], self.sources)]
        target_sds = [state_dict_of(m, f"targets[{i}]") for i, m in enumerate(targets)]
        self._agreement = Agreement.of(targets, target_sds)
        with self._agreement.scope():  # a check that fails on one rank fails on all
            self._plan(sds, list(zip(targets, target_sds)), backend, options.compute_dtype)

    def _plan(self, sds, targets, backend, compute_dtype) -> None:
        metas = [{k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()} for sd in sds]
        self.layers = plan_layers(metas, self.sources, granularity=self.granularity, exclude=self.options.exclude,
                                  missing=self.options.missing, method=self.options.method)
        warn_unmatched(self.layers, self.options.exclude)
        self.dropped = dropped_tensors(metas, self.sources)
        dest = [{canonical_name(k): v for k, v in sd.items()} for _, sd in targets]
        for layer in self.layers:
            key = canonical_name(layer.name)
            for i, d in enumerate(dest):
                if key not in d or tuple(d[key].shape) != layer.shape:
                    raise InputError("missing or of another shape than the base's", f"targets[{i}]", layer.name)
        # A tensor under several names (tied embeddings, a shared module) is merged once, under
        # its first name: merged again under the next, it would read the first result as input.
        self._tied = tied_layers(self.layers, tied_names(targets), sds, self.sources)
        device = next(iter(sds[0].values())).device if sds[0] else torch.device("cpu")
        fast = resolve_backend(backend, device, compute_dtype) == "triton"
        by_executor: dict[type, list[LayerEntry]] = {}
        for layer in self.layers:
            if layer.name in self._tied:
                continue
            key = canonical_name(layer.name)
            entry = LayerEntry(layer, [sd[name] for sd, name in zip(sds, layer.names)], dest[0][key])
            by_executor.setdefault(self._executor(entry, [d[key] for d in dest], fast), []).append(entry)
        # Order of the calls: copies, reference, sharded, kernels (the kernels' launches last,
        # so their one host synchronisation follows every other layer's work).
        order = {CopyLayers: 0, TorchLayers: 1, sharded_backend.ShardedLayers: 2}
        self._executors = [cls(entries, self.sources, method=self.options.method, compute_dtype=self.compute_dtype,
                               int_tensors=self.options.int_tensors)
                           for cls, entries in sorted(by_executor.items(), key=lambda kv: order.get(kv[0], 3))]
        self._mirrors = mirror_copies(self.layers, self._tied, dest)

    def _executor(self, entry: LayerEntry, targets: list, fast: bool) -> type:
        """Which executor merges this layer (``modelstock/backends``); a sharded layer's full
        base is sliced to this rank's shard here."""
        if _sharded_entry(entry, targets, self.sources):
            if entry.layer.kind == "copy":
                raise InputError("is a sharded non-float tensor; Model Stock merges floating-point ones", None,
                                 entry.layer.name)
            if not sharded_backend.is_dtensor(entry.tensors[0]):  # a full base: keep this rank's shard of it
                entry.tensors[0] = sharded_backend.local_like(entry.tensors[0], entry.out)
            return sharded_backend.ShardedLayers
        if entry.layer.copied:
            return CopyLayers
        if fast:
            from ..backends import triton

            if triton.takes(entry):
                return triton.TritonLayers
        return TorchLayers

    def __call__(self, report: MergeReport | None = None) -> None:
        stats: dict[str, object] = {}
        collective = []
        with self._agreement.scope():  # every rank's checks pass before any rank's collective
            for run in self._executors:
                if isinstance(run, sharded_backend.ShardedLayers):
                    collective.append(run.prepare())
                else:
                    stats.update(run(report is not None))
        for finish in collective:
            stats.update(finish())
        if self._mirrors[0]:
            torch._foreach_copy_(*self._mirrors)
        if report is not None:
            report.n, report.granularity, report.clamp, report.eps = (len(self.sources) - 1, self.granularity,
                                                                       self.clamp, self.eps)
            report.inputs = self.sources
            report.int_tensors, report.missing, report.dropped = self.options.int_tensors, self.options.missing, \
                list(self.dropped)
            report.method = self.options.method.name
            # a tensor under several names: its figures under each name, as the out-of-place merge gives
            report.layers.extend(replace(stats[self._tied[layer.name].name], name=layer.name)
                                 if layer.name in self._tied else stats[layer.name] for layer in self.layers)


def _sharded_entry(entry: LayerEntry, targets, sources) -> bool:
    """Whether a layer's fine-tuned tensors and targets are DTensors (the base may be either:
    a full tensor is sliced to each rank's shard); a mix is an error."""
    kinds = [sharded_backend.is_dtensor(t) for t in [*entry.tensors[1:], *targets]]
    if any(kinds) and not all(kinds):
        who = [s for s, k in zip([*sources[1:], *(f"targets[{i}]" for i in range(len(targets)))], kinds) if not k]
        raise InputError(f"is a DTensor in some models and a plain tensor in others ({', '.join(who)}): shard "
                         "every model alike", None, entry.layer.name)
    return bool(kinds) and all(kinds)


def merge_(targets, base, finetuned, *, report: MergeReport | None = None, **options) -> None:
    """Model Stock in place, once: ``InPlaceMerge(targets, base, finetuned, **options)(report)``.
    Repeated merges of the same models should keep one :class:`InPlaceMerge` instead."""
    InPlaceMerge(targets, base, finetuned, **options)(report)
