"""The options every merge takes, checked once, whichever entry point a user calls."""
from __future__ import annotations

from dataclasses import dataclass

from msdp_kernels.dispatch import check_backend

from ..dtypes import dtype_name, float_dtype
from ..layer import INT_POLICIES
from ..methods import resolve
from ..plan import MISSING
from ..ratio import EPS, layer_rows


@dataclass(frozen=True)
class MergeOptions:
    granularity: str = "tensor"      # "tensor" (the paper) or "row" (one ratio per slice along dim 0)
    clamp: bool = True               # cos in [0, 1]; False: the authors' formula
    exclude: tuple[str, ...] = ()    # globs: these get the fine-tuned models' plain average
    eps: float = EPS
    backend: str = "auto"            # "auto" | "torch" | "triton" (msdp_kernels/dispatch.py)
    out_dtype: str | None = None     # None: each tensor keeps the base's dtype
    compute_dtype: str = "float32"   # or "float64"
    int_tensors: str = "max"         # non-float tensors that differ: "max" | "base" | "refuse" (layer.py)
    missing: str = "refuse"          # tensors some models lack: "refuse" | "base" (plan.py)
    method: object = "model_stock"   # a name or a MergeMethod (modelstock/methods); Model Stock takes eps, clamp

    def __post_init__(self):
        layer_rows((1,), self.granularity)  # raises for an unknown granularity
        check_backend(self.backend)
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.out_dtype is not None:
            object.__setattr__(self, "out_dtype", float_dtype(self.out_dtype, "out_dtype"))
        compute = dtype_name(self.compute_dtype)
        if compute not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be float32 or float64, got {compute}")
        object.__setattr__(self, "compute_dtype", compute)
        if self.int_tensors not in INT_POLICIES:
            raise ValueError(f"int_tensors must be one of {INT_POLICIES}, got {self.int_tensors!r}")
        if self.missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}, got {self.missing!r}")
        object.__setattr__(self, "method", resolve(self.method, eps=self.eps, clamp=self.clamp))

    @property
    def torch_compute_dtype(self):
        import torch

        return getattr(torch, self.compute_dtype)
