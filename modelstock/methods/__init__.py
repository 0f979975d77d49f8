"""Merge methods behind one contract. Every merge here is, per layer (or per row of one),

    merged = w0 + sum_i c_i (w_i - w0),   c_i = scale * weight_i / N

and a method only says which per-layer statistics it needs and how the coefficients follow from
them. The pipelines (numpy tiles, the Triton kernels, the sharded all-reduce, the GPU file
pipeline, the low-rank adapter merge) compute those statistics and apply the combine without
knowing the method.

Statistics a method may ask for (``MergeMethod.statistics``):
  None     nothing: the coefficients are fixed (uniform average, WiSE-FT)
  "gram"   the (rows, N, N) fp64 Gram matrices of the deltas, <d_i, d_j> per layer or per row:
           sums of products, so partial sums over tiles, threads, shards and ranks add up

The combine is written as a scale and per-model weights rather than bare c_i because that is
how it is computed: the deltas' mean (weights all 1: plain sums, no product) times one scale,
the order of operations Model Stock's merge has always had (``reference.merge_into``), so its
bytes did not change when the methods were put behind this contract.

Adding a method: subclass ``MergeMethod`` in a module of this package, give it a ``name`` and
register it in ``_METHODS`` below (see docs: "extending").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError


@dataclass
class Coefficients:
    """A layer's combine: c_i = scale[row] * weights[row, i] / N.

    ``scale``: (rows,) fp64, a numpy array or a torch tensor (what the statistics were);
    ``weights``: (rows, N) or None for all ones (the plain mean of the deltas, which lets the
    pipelines keep their fast paths); ``figures``: what the method computed on the way, for
    its report (Model Stock: its ``Ratio``)."""

    scale: Any
    weights: Any = None
    figures: Any = None


class MergeMethod:
    """The contract (see the module docstring)."""

    name = ""
    statistics: str | None = None
    min_models = 1
    max_models: int | None = None

    def check_count(self, n: int) -> None:
        """InputError when ``n`` fine-tuned models do not suit the method."""
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = (f"exactly {self.min_models}" if self.max_models == self.min_models
                    else f"at least {self.min_models}")
            raise InputError(f"{self.name} needs {want} fine-tuned checkpoint(s), got {n}")

    def coefficients(self, stats, n: int, rows: int) -> Coefficients:
        """The coefficients of a layer of ``rows`` rows from its statistics (None when the
        method asks for none)."""
        raise NotImplementedError

    def undefined(self, layer_name: str) -> InputError:
        """The error for a layer whose coefficients are not finite (finite inputs)."""
        return InputError(f"the {self.name} coefficients are not finite", None, layer_name)

    def layer_stats(self, name: str, shape, c: Coefficients):
        """The layer's figures for the report (``report.LayerStats``): the scale as ``t``."""
        import math

        from ..report import LayerStats

        scale = np.asarray(c.scale.cpu() if hasattr(c.scale, "cpu") else c.scale, dtype=np.float64)
        return LayerStats(name, list(shape), math.prod(shape), "merge", rows=len(scale), t=float(scale.mean()),
                          t_min=float(scale.min()), t_max=float(scale.max()))

    def describe(self) -> dict:
        """What the output's metadata records of the method."""
        return {"method": self.name}


def fixed(value: float, rows: int, like=None) -> Any:
    """``rows`` copies of ``value`` in fp64: a numpy array, or a torch tensor on ``like``'s device."""
    if like is not None and not isinstance(like, np.ndarray):
        import torch

        return torch.full((rows,), value, dtype=torch.float64, device=like.device)
    return np.full(rows, value, dtype=np.float64)


def _methods() -> dict:
    return {m.name: m for m in (ModelStock, Uniform, WiseFT)}


NAMES = ("model_stock", "uniform", "wise_ft")  # what --method offers


def resolve(method, *, eps: float | None = None, clamp: bool | None = None, alpha: float | None = None) -> MergeMethod:
    """A ``MergeMethod`` from a name ("model_stock", "uniform", "wise_ft") or an instance;
    Model Stock takes ``eps`` and ``clamp``, WiSE-FT ``alpha`` (default 0.5)."""
    if isinstance(method, MergeMethod):
        return method
    known = _methods()
    if method not in known:
        raise ValueError(f"method must be one of {sorted(known)} or a MergeMethod, got {method!r}")
    cls = known[method]
    if method == "model_stock":
        from ..ratio import EPS

        return cls(eps=EPS if eps is None else eps, clamp=True if clamp is None else clamp)
    if method == "wise_ft":
        return cls(alpha=0.5 if alpha is None else alpha)
    return cls()


# the methods, importable from here (after the contract they build on)
from .baselines import Uniform, WiseFT  # noqa: E402
from .model_stock import ModelStock  # noqa: E402

__all__ = ["Coefficients", "MergeMethod", "ModelStock", "NAMES", "Uniform", "WiseFT", "resolve"]
