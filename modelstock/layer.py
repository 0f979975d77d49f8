"""One layer's merge with its checks, for either math backend: ``modelstock.reference``
(torch tensors) or ``modelstock.backends.numpy_ops`` (numpy arrays), passed as ``ops``
(the per-layer contract of ``modelstock/backends/__init__.py``)."""
from __future__ import annotations

from typing import Sequence

from .errors import InputError
from .plan import Layer
from .ratio import EPS, ratio
from .report import LayerStats


def merge_layer(layer: Layer, w0, ws: Sequence, out, sources: Sequence[str], ops, *,
                eps: float = EPS, clamp: bool = True, out_is_separate: bool = False):
    """Merge (or, for an excluded layer, average) one layer into ``out``: flat arrays of the
    compute dtype, ``out`` possibly ``w0``. Returns ``out`` and the layer's figures. Raises
    InputError naming the input at fault when any input holds NaN or inf.

    ``out_is_separate``: ``out`` shares no memory with the inputs, so a backend that can
    (``numpy_ops``) keeps the deltas' mean there from the Gram pass and merges from it."""
    if layer.kind == "average":
        require_finite(ops, ws, sources[1:], layer.names[1:])
        return ops.merge_into(out, None, ws), LayerStats(layer.name, list(layer.shape), layer.numel, "average")
    from_mean = out_is_separate and hasattr(ops, "merge_from_mean_delta")
    gram = ops.gram(w0, ws, layer.rows, mean_delta=out) if from_mean else ops.gram(w0, ws, layer.rows)
    r = checked_ratio(gram, layer, [w0, *ws], sources, ops, eps=eps, clamp=clamp)
    merged = ops.merge_from_mean_delta(out, w0, r.t) if from_mean else ops.merge_into(out, w0, ws, r.t)
    return merged, LayerStats.from_ratio(layer.name, layer.shape, r)


def checked_ratio(gram, layer: Layer, inputs: Sequence, sources: Sequence[str], ops, *, eps: float, clamp: bool,
                  elsewhere: str | None = None):
    """The layer's ratio from its Gram, or InputError naming the input at fault when one of
    ``inputs`` (w0 and the fine-tuned, or this rank's shards of them) holds NaN or inf, or
    saying that the ratio is undefined. ``elsewhere``: the error when the norms are not finite
    but these inputs are (a sharded layer: the fault is in another rank's shard)."""
    r = ratio(gram, eps=eps, clamp=clamp)
    if not ops.all_finite(r.norms):
        # A non-finite input makes some ||w_i - w0|| non-finite; name the first such input.
        require_finite(ops, inputs, sources, layer.names)
        if elsewhere is not None:
            raise InputError(elsewhere, None, layer.name)
    if not ops.all_finite(r.t):
        raise undefined_ratio(layer)
    return r


def undefined_ratio(layer: Layer) -> InputError:
    return InputError("the ratio is undefined: the mean cosine is -1/(N-1), where the authors' "
                      "formula divides by zero (merge with clamp on)", None, layer.name)


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
