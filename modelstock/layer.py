"""One layer's merge with its checks, for either math backend: ``modelstock.reference``
(torch tensors) or ``modelstock.backends.numpy_ops`` (numpy arrays), passed as ``ops``
(the per-layer contract of ``modelstock/backends/__init__.py``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError
from .plan import Layer
from .ratio import EPS
from .report import LayerStats


def merge_layer(layer: Layer, w0, ws: Sequence, out, sources: Sequence[str], ops, *,
                eps: float = EPS, clamp: bool = True, out_is_separate: bool = False, method=None):
    """Merge (or, for an excluded layer, average) one layer into ``out``: flat arrays of the
    compute dtype, ``out`` possibly ``w0``. Returns ``out`` and the layer's figures. Raises
    InputError naming the input at fault when any input holds NaN or inf.

    ``method``: a ``modelstock.methods.MergeMethod`` (default: Model Stock with ``eps`` and
    ``clamp``). ``out_is_separate``: ``out`` shares no memory with the inputs, so a backend
    that can (``numpy_ops``) keeps the deltas' mean there from the Gram pass and merges from it."""
    method = method or model_stock(eps, clamp)
    if layer.kind == "average":
        require_finite(ops, ws, sources[1:], layer.names[1:])
        return ops.merge_into(out, None, ws), LayerStats(layer.name, list(layer.shape), layer.numel, "average")
    gram = None
    from_mean = out_is_separate and hasattr(ops, "merge_from_mean_delta")
    if method.statistics == "gram":
        gram = ops.gram(w0, ws, layer.rows, mean_delta=out) if from_mean else ops.gram(w0, ws, layer.rows)
    c = checked_coefficients(method, gram, layer, [w0, *ws], sources, ops)
    if from_mean and gram is not None and c.weights is None:
        merged = ops.merge_from_mean_delta(out, w0, c.scale)
    else:
        merged = ops.merge_into(out, w0, ws, c.scale, c.weights)
    if gram is None:  # no Gram saw the inputs: a NaN or inf shows in the result
        check_result_finite(merged, [w0, *ws], sources, layer, ops)
    return merged, method.layer_stats(layer.name, layer.shape, c)


def model_stock(eps: float = EPS, clamp: bool = True):
    from .methods.model_stock import ModelStock

    return ModelStock(eps=eps, clamp=clamp)


def checked_coefficients(method, stats, layer: Layer, inputs: Sequence, sources: Sequence[str], ops, *,
                         elsewhere: str | None = None):
    """The layer's coefficients from its statistics, or InputError naming the input at fault
    when one of ``inputs`` (w0 and the fine-tuned, or this rank's shards of them) holds NaN or
    inf, or saying that the coefficients are undefined. ``elsewhere``: the error when the Gram
    is not finite but these inputs are (a sharded layer: the fault is in another rank's shard)."""
    c = method.coefficients(stats, len(inputs) - 1, layer.rows)
    c.scale, c.weights = _like(c.scale, inputs[0]), _like(c.weights, inputs[0])
    if stats is not None and not ops.all_finite(stats.diagonal(0, -2, -1)):
        # A non-finite input makes some ||w_i - w0||^2 non-finite; name the first such input.
        require_finite(ops, inputs, sources, layer.names)
        if elsewhere is not None:
            raise InputError(elsewhere, None, layer.name)
    if not ops.all_finite(c.scale):
        raise method.undefined(layer.name)
    return c


def _like(x, ref):
    """A method's numpy coefficients as a torch tensor where the layer is one (on its device)."""
    if x is None or isinstance(ref, np.ndarray) or not isinstance(x, np.ndarray):
        return x
    import torch

    return torch.as_tensor(x, device=ref.device)


def check_result_finite(merged, inputs: Sequence, sources: Sequence[str], layer: Layer, ops) -> None:
    """After a merge that computed no statistics: a non-finite result names the input at fault
    (finite coefficients of finite inputs give a finite sum unless it overflows)."""
    if not ops.all_finite(merged):
        require_finite(ops, inputs, sources, layer.names)
        raise InputError("the merged weights overflow the compute dtype", None, layer.name)


def undefined_ratio(layer: Layer) -> InputError:
    return model_stock().undefined(layer.name)


def cast_output(merged, dtype: str, stats: LayerStats, ops, out=None):
    """The merged layer in its output dtype (into ``out`` when given). Only an extrapolating
    ratio (clamp off, t outside [0, 1]) can leave the inputs' range, so only then is the result
    checked for overflow."""
    result = ops.cast(merged, dtype, out)
    check_extrapolation(result, stats, ops, dtype)
    return result


def check_extrapolation(result, stats: LayerStats, ops, dtype: str | None = None) -> None:
    """Only an extrapolating ratio (clamp off, t outside [0, 1]) can leave the inputs' range:
    then the result, stored as ``dtype`` (None: a torch tensor of its own dtype), must be finite."""
    extrapolates = stats.t_min is not None and (stats.t_min < 0 or stats.t_max > 1)
    if extrapolates and not ops.all_finite(ops.widen(result, dtype) if dtype else result):
        raise InputError(f"the extrapolated result (t = {stats.t_min:.3g}..{stats.t_max:.3g}) overflows "
                         f"{dtype or result.dtype}", None, stats.name)


# What a merge does with a non-float tensor (int buffer, step counter) that differs between the
# models: "max", the largest value (elementwise; for a step counter such as BatchNorm's
# num_batches_tracked, which every fine-tune advances, the most-trained count); "base", the
# base's; "refuse", an error naming it.
INT_POLICIES = ("max", "base", "refuse")


def check_copy(layer: Layer, arrays: Sequence, sources: Sequence[str], ops, policy: str = "max"):
    """A non-float tensor (or one only the base has): the base's when all inputs agree, else
    chosen by ``policy`` (INT_POLICIES). Returns the value and the layer's figures."""
    stats = LayerStats(layer.name, list(layer.shape), layer.numel, layer.kind)
    differ = [(a, name, source) for a, name, source in zip(arrays[1:], layer.names[1:], sources[1:])
              if not ops.equal(arrays[0], a)]
    if not differ:
        return arrays[0], stats
    if policy == "refuse":
        _, name, source = differ[0]
        raise InputError("non-float tensor differs from the base's (Model Stock only merges floating-point "
                         "tensors; int_tensors='max' or 'base' takes one)", source, name)
    stats.differs = True
    return (ops.maximum(arrays) if policy == "max" else arrays[0]), stats


def require_finite(ops, arrays: Sequence, sources: Sequence[str], names: Sequence[str]) -> None:
    """InputError naming the first array that holds NaN or inf."""
    for w, source, name in zip(arrays, sources, names):
        if not ops.all_finite(w):
            raise InputError("holds NaN or inf", source, name)
