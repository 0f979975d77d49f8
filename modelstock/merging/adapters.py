"""File merges where fine-tuned inputs are PEFT LoRA adapters (``merge_files`` hands them here).

A layer at a time, in the base's order: the method's statistics from the adapters' factors
(``modelstock/lowrank.py``: no adapter's update is formed for an adapter-adapter pair), the
coefficients, then either
  the full model (default): w0 + sum_i c_i d_i written as the base is laid out (a model folder
                 like the base's, or a file), the low-rank part one product of rank sum r_i;
  an adapter (``adapter=True``, every fine-tuned input an adapter): a PEFT LoRA folder whose
                 factors are B = [c_1 s_1 B_1, ..., c_N s_N B_N], A = [A_1; ...; A_N] with
                 scale 1 (lora_alpha = r per module), so that peft applies exactly that sum.
A weight some adapter does not target is, for that adapter, unchanged (update 0), as it is in
the adapter applied to the base.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import lowrank
from ..backends import numpy_ops
from ..dtypes import NUMPY_DTYPES, nbytes
from ..errors import InputError
from ..io import CheckpointWriter, folders, open_checkpoint, remove_stale_temporaries
from ..io.adapters import CONFIG_NAME, PREFIX, Adapter, is_adapter
from ..io.atomic import AtomicFolder, remove_stale
from ..io.leases import InputGuard
from ..io.outputs import check_not_an_input, check_output_file
from ..layer import cast_output, check_copy, require_finite
from ..plan import Layer, canonical_name, dropped_tensors, plan_layers, warn_unmatched
from ..report import MergeReport
from ..tiles import BLOCK
from .options import MergeOptions

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def any_adapter(paths) -> bool:
    return any(p is not None and is_adapter(p) for p in paths)


def resolve_base(base, finetuned: Sequence) -> str:
    """The base: the one given, else the local folder the adapters name (all the same one)."""
    if base is not None:
        if is_adapter(base):
            raise InputError("is a LoRA adapter, not a base model: give the base first, or only adapters "
                             "(their adapter_config.json names the base)", str(base))
        return str(base)
    named = set()
    for p in finetuned:
        if is_adapter(p):
            name = json.loads((Path(p) / CONFIG_NAME).read_text()).get("base_model_name_or_path")
            if not name or not Path(name).exists():
                raise InputError(f"names the base {name!r}, which is not a local path: give the base model "
                                 "(BASE ADAPTER1 ADAPTER2 ...)", str(p))
            named.add(os.path.realpath(name))
    if len(named) != 1:
        raise InputError(f"the adapters name different bases ({', '.join(sorted(named))}): give the base")
    return named.pop()


def merge(base, finetuned: Sequence, out, options: MergeOptions, *, shard_size, force: bool, durable: bool,
          adapter: bool, skip_files=(), extra_files=None, config_values=None) -> MergeReport:
    start = time.perf_counter()
    base = resolve_base(base, finetuned)
    check_not_an_input(out, [base, *finetuned])
    inputs: list = []
    try:
        inputs.append(open_checkpoint(base))
        for p in finetuned:
            inputs.append(Adapter(p) if is_adapter(p) else open_checkpoint(p))
        check_not_an_input(out, [f for ck in inputs for f in ck.files()])
        plan = _Plan(inputs, options)
        plan.base_path = str(base)
        if adapter:
            return _write_adapter(plan, Path(out), options, force, durable, start)
        run = lambda weights: _write_full(plan, weights, options, start)  # noqa: E731
        if folders.is_model_folder(base):
            from ..sizes import parse_size
            from .files import _merge_into_folder, _Output

            size = shard_size if shard_size is not None else parse_size(folders.DEFAULT_SHARD_SIZE)
            output = _Output(Path(out), size, force, durable)
            return _merge_into_folder(None, Path(base), output, options, None, start, skip_files, extra_files or {},
                                      config_values or {}, run=run)
        from .files import _Output

        return run(_Output(Path(out), shard_size, force, durable))
    finally:
        for ck in inputs:
            ck.close()


def is_peft_model(m) -> bool:
    return hasattr(m, "peft_config") and hasattr(m, "get_base_model")


def merge_in_memory(base, finetuned: Sequence, options: MergeOptions, report: MergeReport | None = None) -> dict:
    """``modelstock.merge`` with PEFT LoRA models (``PeftModel``) among the fine-tuned: their
    factors as saved (``get_peft_model_state_dict``), merged as the file merge does; returns
    the merged state dict (CPU tensors, the base's names and dtypes or ``out_dtype``)."""
    from peft import get_peft_model_state_dict

    from ..io.arrays import StateDictSource, to_torch
    from .in_memory import state_dict_of

    if is_peft_model(base):
        raise InputError("is a PEFT model; give the base model's weights (before get_peft_model)", "base")
    inputs = [StateDictSource({k: v.detach().cpu() for k, v in state_dict_of(base, "base").items()}, "base")]
    for i, m in enumerate(finetuned):
        name = f"finetuned[{i}]"
        if is_peft_model(m):
            adapter_name = getattr(m, "active_adapter", "default")
            config = m.peft_config[adapter_name].to_dict()
            state = get_peft_model_state_dict(m, adapter_name=adapter_name)
            inputs.append(Adapter.from_source(config, StateDictSource({k: v.detach().cpu() for k, v in state.items()},
                                                                      name), name))
        else:
            inputs.append(StateDictSource({k: v.detach().cpu() for k, v in state_dict_of(m, name).items()}, name))
    plan = _Plan(inputs, options)
    full = [i for i, ck in enumerate(inputs[1:]) if not isinstance(ck, Adapter)]
    out, layers = {}, []
    for layer in plan.layers:
        dtype = layer.out_dtype(options.out_dtype)
        value, stats = _full_layer(plan, layer, dtype, full, options.compute_dtype)
        out[layer.name] = to_torch(np.array(value).reshape(layer.shape), dtype).clone()
        layers.append(stats)
    if report is not None:
        report.n, report.granularity, report.clamp, report.eps = len(finetuned), options.granularity, \
            options.clamp, options.eps
        report.inputs, report.method = plan.sources, options.method.name
        report.int_tensors, report.missing = options.int_tensors, options.missing
        report.dropped = dropped_tensors(plan.metas, plan.sources)
        report.layers.extend(layers)
    return out


class _Plan:
    """The base's layers and, per fine-tuned input, what updates each: a full checkpoint's
    tensor, an adapter's factors, or nothing."""

    def __init__(self, inputs, options: MergeOptions):
        self.inputs, self.options = inputs, options
        self.sources = [ck.path for ck in inputs]
        base_meta = inputs[0].tensors()
        # an adapter holds the base's every tensor, some updated: it plans as the base does
        self.metas = [base_meta] + [base_meta if isinstance(ck, Adapter) else ck.tensors() for ck in inputs[1:]]
        self.layers = plan_layers(self.metas, self.sources, granularity=options.granularity,
                                  exclude=options.exclude, missing=options.missing, method=options.method)
        warn_unmatched(self.layers, options.exclude)
        by_key = {canonical_name(layer.name): layer for layer in self.layers}
        self.targets: list[dict[str, object]] = []  # per fine-tuned input: layer name -> Factors
        for ck in inputs[1:]:
            found = {}
            if isinstance(ck, Adapter):
                for module, f in ck.factors.items():
                    layer = by_key.get(canonical_name(f"{module}.weight"))
                    if layer is None:
                        raise InputError(f"updates '{module}.weight', which the base lacks", ck.path, f.a)
                    if layer.copied:
                        raise InputError(f"updates '{layer.name}', a tensor the merge copies from the base "
                                         "(non-float, or missing in another model)", ck.path, f.a)
                    rows, k = _factor_shape(ck, f)
                    if rows != layer.shape[0] or k * rows != layer.numel:
                        raise InputError(f"factors of an update of shape ({rows}, {k}), but '{layer.name}' has "
                                         f"shape {list(layer.shape)}", ck.path, f.a)
                    found[layer.name] = f
                for name, copy in ck.base_copies.items():
                    _check_base_copy(ck, copy, inputs[0], by_key.get(canonical_name(name)))
            self.targets.append(found)

    def updates(self, layer: Layer, w0: np.ndarray | None, full_reads) -> list:
        """The layer's update from each fine-tuned input, ``(rows, k)``-shaped."""
        rows = layer.shape[0] if layer.shape else 1
        out = []
        for i, ck in enumerate(self.inputs[1:]):
            if isinstance(ck, Adapter):
                f = self.targets[i].get(layer.name)
                if f is None:
                    out.append(lowrank.Zero())
                else:
                    bm, am = ck.factors_2d(f, NUMPY_DTYPES[self.options.compute_dtype])
                    out.append(lowrank.LowRank(bm, am, f.scale))
            else:
                out.append(lowrank.Full(full_reads[i].reshape(rows, -1)))
        return out

    def check_finite(self, layer: Layer, w0, updates) -> None:
        """InputError naming the input (or factor) that holds NaN or inf."""
        if w0 is not None:
            require_finite(numpy_ops, [w0], self.sources[:1], layer.names[:1])
        for i, (ck, d) in enumerate(zip(self.inputs[1:], updates)):
            if isinstance(d, lowrank.Full):
                require_finite(numpy_ops, [d.w], [ck.path], [layer.names[i + 1]])
            elif isinstance(d, lowrank.LowRank):
                f = self.targets[i][layer.name]
                for arr, name in ((d.bm, f.b), (d.am, f.a)):
                    if not numpy_ops.all_finite(arr):
                        raise InputError("holds NaN or inf", ck.path, name)


def _check_base_copy(ck: Adapter, copy: str, base, layer: Layer | None) -> None:
    """An adapter may carry base weights (peft's save_embedding_layers): peft loads them into
    the base, so they must be the base's own for the merge of the factors to be the adapter's."""
    if layer is None or layer.copied:
        raise InputError("carries a base weight that the base lacks", ck.path, copy)
    mine, theirs = ck.source.read(copy), base.read(layer.names[0])
    if mine.shape == theirs.shape and ck.dtype_of(copy) != layer.dtypes[0]:  # peft loads it into the base's dtype
        mine = numpy_ops.cast(numpy_ops.widen(mine, ck.dtype_of(copy)), layer.dtypes[0])
    if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
        raise InputError(f"carries its own '{layer.name}', which differs from the base's (a resized or trained "
                         "base layer): not supported", ck.path, copy)


def _factor_shape(ck: Adapter, f) -> tuple[int, int]:
    """(rows, k) of the update the factors describe, from their shapes alone."""
    import math

    a_shape, b_shape = ck.meta[f.a][1], ck.meta[f.b][1]
    if f.layout == "embedding":
        return int(a_shape[1]), int(b_shape[0])
    if f.layout == "transposed":
        return int(math.prod(a_shape[1:])), int(b_shape[0])
    return int(b_shape[0]), int(math.prod(a_shape[1:]))


def _coefficients(plan: _Plan, layer: Layer, w0, updates):
    """The method's coefficients for a merged layer (checked), its per-model form and figures."""
    method, n = plan.options.method, len(updates)
    rows = layer.rows
    stats = None
    if method.statistics == "gram":
        stats = lowrank.gram(w0, updates, rows)
        if not np.isfinite(stats.diagonal(0, -2, -1)).all():
            plan.check_finite(layer, w0, updates)
    c = method.coefficients(stats, n, rows)
    if not numpy_ops.all_finite(np.asarray(c.scale)):
        raise method.undefined(layer.name)
    return c, lowrank.per_model(c, n, rows), method.layer_stats(layer.name, layer.shape, c)


def _finite_stored(raw: np.ndarray, dtype: str) -> bool:
    """Whether a stored float array is finite; bfloat16 (uint16 bits) by its exponent bits. In
    slices, so that the temporaries stay small beside a memory-mapped embedding."""
    flat = raw.reshape(-1)
    for start in range(0, flat.size, BLOCK):
        part = flat[start: start + BLOCK]
        if dtype == "bfloat16" and np.any((part & 0x7F80) == 0x7F80):
            return False
        if dtype != "bfloat16" and not numpy_ops.all_finite(part):
            return False
    return True


def _widened(ck, name: str, dtype: str, compute_dtype: str) -> np.ndarray:
    raw = ck.view(name)
    if dtype == compute_dtype:
        return raw
    return numpy_ops.to_float(raw, dtype, np.empty(raw.shape, dtype=NUMPY_DTYPES[compute_dtype]))


def _write_full(plan: _Plan, output, options: MergeOptions, start: float) -> MergeReport:
    """The merged model, a layer at a time, into ``output`` (``files._Output``)."""
    from .cpu_pipeline import Writer
    from .files import merge_metadata

    out, inputs, layers = output.path, plan.inputs, plan.layers
    entries = [(layer.name, layer.out_dtype(options.out_dtype), layer.shape) for layer in layers]
    input_files = [f for ck in inputs for f in ck.files()]
    from ..io import output_paths

    for p in output_paths(out, entries, output.shard_size):
        check_output_file(p, input_files, output.force)
    remove_stale_temporaries(out)
    sources, compute = plan.sources, options.compute_dtype
    report = MergeReport(n=len(inputs) - 1, granularity=options.granularity, clamp=options.clamp, eps=options.eps,
                         inputs=sources, int_tensors=options.int_tensors, missing=options.missing,
                         dropped=dropped_tensors(plan.metas, sources), method=options.method.name)
    metadata = dict(inputs[0].metadata)
    metadata.setdefault("format", "pt")
    metadata["modelstock"] = merge_metadata(options, sources)
    full = [i for i, ck in enumerate(inputs[1:]) if not isinstance(ck, Adapter)]
    with InputGuard(input_files) as guard, CheckpointWriter(out, entries, metadata, output.shard_size,
                                                            output.durable) as writer:
        with Writer(writer) as write:
            for layer, (_, dtype, _) in zip(layers, entries):
                guard.check()
                value, stats = _full_layer(plan, layer, dtype, full, compute)
                report.layers.append(stats)
                write(layer.name, value.reshape(layer.shape))
                report.bytes_read += nbytes(layer.dtypes[0], layer.shape)
        guard.check()
        report.output = [str(p) for p in writer.commit(replace=output.force)]
    report.bytes_read += sum(nbytes(ck.dtype_of(n), ck.meta[n][1]) for ck in inputs[1:]
                             if isinstance(ck, Adapter) for f in ck.factors.values() for n in (f.a, f.b))
    report.bytes_written = sum(nbytes(d, s) for _, d, s in entries)
    report.seconds = time.perf_counter() - start
    return report


def _full_layer(plan: _Plan, layer: Layer, dtype: str, full: list[int], compute: str):
    inputs, sources = plan.inputs, plan.sources
    if layer.copied:
        arrays = [ck.read(name) if i == 0 or not isinstance(ck, Adapter) else inputs[0].read(layer.names[0])
                  for i, (ck, name) in enumerate(zip(inputs, layer.names))] if layer.kind == "copy" else \
            [inputs[0].read(layer.names[0])]
        value, stats = check_copy(layer, arrays, sources, numpy_ops, plan.options.int_tensors)
        if dtype != layer.dtypes[0]:
            value = numpy_ops.cast(numpy_ops.widen(value, layer.dtypes[0]), dtype)
        return value, stats
    rows = layer.shape[0] if layer.shape else 1
    untouched = not full and all(layer.name not in t for t in plan.targets)
    if untouched and layer.kind == "merge":  # every update is 0: the merge is w0, whatever the method
        zero = np.zeros((layer.rows, len(inputs) - 1, len(inputs) - 1))
        stats_in = zero if plan.options.method.statistics == "gram" else None
        c = plan.options.method.coefficients(stats_in, len(inputs) - 1, layer.rows)
        stats = plan.options.method.layer_stats(layer.name, layer.shape, c)
        raw = inputs[0].view(layer.names[0])
        if not _finite_stored(raw, layer.dtypes[0]):  # no NaN leaves a merge, even a copied one
            raise InputError("holds NaN or inf", sources[0], layer.names[0])
        if dtype == layer.dtypes[0]:
            return raw, stats
        return numpy_ops.cast(numpy_ops.widen(raw, layer.dtypes[0]), dtype), stats
    w0 = _widened(inputs[0], layer.names[0], layer.dtypes[0], compute).reshape(rows, -1)
    reads = {i: _widened(inputs[i + 1], layer.names[i + 1], layer.dtypes[i + 1], compute) for i in full}
    updates = plan.updates(layer, w0, reads)
    if layer.kind == "average":  # excluded: the plain average of the fine-tuned models
        from ..methods import Coefficients
        from ..report import LayerStats

        coef = lowrank.per_model(Coefficients(np.ones(1)), len(updates), 1)
        stats = LayerStats(layer.name, list(layer.shape), layer.numel, "average")
    else:
        _, coef, stats = _coefficients(plan, layer, w0, updates)
    merged = lowrank.combine_into(np.empty_like(w0), w0, updates, coef)
    if not numpy_ops.all_finite(merged):  # a NaN or inf input that no Gram saw
        plan.check_finite(layer, w0, updates)
        raise InputError("the merged weights overflow the compute dtype", None, layer.name)
    return cast_output(merged.reshape(-1), dtype, stats, numpy_ops), stats


# --- the adapter output ---------------------------------------------------------------------------


def _write_adapter(plan: _Plan, out: Path, options: MergeOptions, force: bool, durable: bool,
                   start: float) -> MergeReport:
    """One PEFT LoRA adapter whose update is the merge's (see the module docstring)."""
    inputs = plan.inputs
    if not all(isinstance(ck, Adapter) for ck in inputs[1:]):
        full = next(ck.path for ck in inputs[1:] if not isinstance(ck, Adapter))
        raise InputError("--adapter / adapter=True writes an adapter, so every fine-tuned input must be one; "
                         "this is a full checkpoint", full)
    adapters: list[Adapter] = inputs[1:]
    sources = plan.sources
    report = MergeReport(n=len(adapters), granularity=options.granularity, clamp=options.clamp, eps=options.eps,
                         inputs=sources, int_tensors=options.int_tensors, missing=options.missing,
                         method=options.method.name)
    first = adapters[0]
    factor_dtype = options.out_dtype or first.dtype_of(next(iter(first.factors.values())).a)
    transposed = bool(first.config.get("fan_in_fan_out"))
    tensors: list[tuple[str, np.ndarray]] = []
    ranks: dict[str, int] = {}
    for layer in plan.layers:
        targeted = [t[layer.name] for t in plan.targets if layer.name in t]
        if not targeted or layer.copied:
            continue
        updates = plan.updates(layer, None, {})
        if layer.kind == "average":
            from ..methods import Coefficients
            from ..report import LayerStats

            coef = lowrank.per_model(Coefficients(np.ones(1)), len(updates), 1)
            report.layers.append(LayerStats(layer.name, list(layer.shape), layer.numel, "average"))
        else:
            _, coef, stats = _coefficients(plan, layer, None, updates)
            report.layers.append(stats)
        rows = layer.shape[0]
        bm, am = lowrank.merged_factors(updates, np.broadcast_to(coef, (rows, coef.shape[1])), np.float64)
        if not (np.isfinite(bm).all() and np.isfinite(am).all()):
            plan.check_finite(layer, None, updates)
        module = targeted[0].target
        layout = "embedding" if targeted[0].layout == "embedding" else ("transposed" if transposed else "linear")
        a_shape = _a_shape(adapters, plan.targets, layer.name)
        a, b = _to_peft(bm, am, layout, a_shape)
        ranks[module] = a.shape[0]
        kind = ("lora_embedding_A", "lora_embedding_B") if layout == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors.append((f"{PREFIX}{module}.{kind[0]}", factor_dtype, numpy_ops.cast(a, factor_dtype)))
        tensors.append((f"{PREFIX}{module}.{kind[1]}", factor_dtype, numpy_ops.cast(b, factor_dtype)))
    if not tensors:
        raise InputError("the adapters target no weight of the base: nothing to merge")
    config = _adapter_config(first.config, plan.base_path, ranks, transposed)
    _write_adapter_folder(out, tensors, config, [f for ck in inputs for f in ck.files()], force, durable, report)
    report.bytes_read = sum(nbytes(ck.dtype_of(n), ck.meta[n][1]) for ck in adapters
                            for f in ck.factors.values() for n in (f.a, f.b))
    report.bytes_written = sum(a.nbytes for _, _, a in tensors)
    report.seconds = time.perf_counter() - start
    return report


def _a_shape(adapters, targets, name: str):
    """The shape of a lora_A of this module past its rank (a conv's kernel dims)."""
    for ck, t in zip(adapters, targets):
        if name in t:
            return tuple(ck.meta[t[name].a][1][1:])


def _to_peft(bm: np.ndarray, am: np.ndarray, layout: str, a_tail) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A, lora_B) in peft's layout from the 2-D factors (update = bm @ am)."""
    if layout == "embedding":      # update = (B A)^T: A = bm^T (r, num_embeddings), B = am^T (dim, r)
        return bm.T.copy(), am.T.copy()
    if layout == "transposed":     # weight stored (in, out): update = (B A)^T
        return bm.T.copy(), am.T.copy()
    a = am.reshape(am.shape[0], *a_tail)
    b = bm.reshape(bm.shape[0], bm.shape[1], *([1] * (len(a_tail) - 1)))
    return a, b


def _adapter_config(first: dict, base: str, ranks: dict[str, int], transposed: bool) -> dict:
    """The merged adapter's config: the first adapter's, with every module's rank and
    lora_alpha = rank (scale 1), its targets the modules the merge updates (full names)."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    config = dict(first)
    config.update(
        base_model_name_or_path=base, r=common, lora_alpha=common, use_rslora=False, fan_in_fan_out=transposed,
        target_modules=sorted(ranks), layers_to_transform=None, layers_pattern=None, exclude_modules=None,
        rank_pattern={_exact(m): r for m, r in ranks.items() if r != common},
        alpha_pattern={_exact(m): r for m, r in ranks.items() if r != common}, inference_mode=True)
    config.pop("revision", None)
    return config


def _exact(module: str) -> str:
    """A module's full name as a pattern peft matches that module alone (peft reads the
    patterns as regular expressions anchored at the name's end)."""
    import re

    return "^" + re.escape(module)


def _write_adapter_folder(out: Path, tensors, config: dict, input_files, force: bool, durable: bool,
                          report: MergeReport) -> None:
    """The adapter folder, built out of sight and put in place under the output's lock, as every
    folder output is (``io/atomic.py``): a stopped merge removes only its private folder."""
    if out.exists() and not out.is_dir():
        raise InputError("--adapter writes a folder, but this is a file", str(out))
    if not out.parent.is_dir():
        raise InputError("the output's folder does not exist", str(out.parent))
    if out.is_dir():  # an existing folder: its files are replaced only with force
        for name in (ADAPTER_WEIGHTS, CONFIG_NAME):
            check_output_file(out / name, input_files, force)
    else:
        check_not_an_input(out, input_files)
    remove_stale(out, AtomicFolder.INSIDE)  # private folders of merges into ``out`` that were killed
    staging = AtomicFolder(out, durable)
    try:
        entries = [(name, dtype, tuple(a.shape)) for name, dtype, a in tensors]
        with CheckpointWriter(staging.path / ADAPTER_WEIGHTS, entries, {"format": "pt"}, None, durable) as writer:
            for name, _, a in tensors:
                writer.write(name, a)
            writer.commit()
        folders.write_files(staging.path, {CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode()}, durable)
        placed = staging.commit(force, lambda folder, names: [n for n in names if os.path.lexists(folder / n)])
    except BaseException:
        staging.abort()
        raise
    report.output = [str(p) for p in placed]
