"""Dtypes by name, the same for every backend and format: "float32", "bfloat16", ... (as
``str(torch.float32)`` without "torch."). numpy has no bfloat16: it travels as its uint16 bits.
The names users write (``bf16``, mergekit's ``bfloat16``, ``torch.float16``) resolve here."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FLOATS = ("float64", "float32", "float16", "bfloat16")
# The numpy dtype holding each.
NUMPY_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
}
ITEMSIZE = {name: np.dtype(d).itemsize for name, d in NUMPY_DTYPES.items()}
# Every spelling of a floating dtype that a user, a CLI or a mergekit config may give.
FLOAT_ALIASES = {
    "float64": "float64", "fp64": "float64", "double": "float64",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 (or for "bfloat16"): the names dtypes go by here."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def float_dtype(value, what: str = "dtype") -> str:
    """The canonical name of a floating dtype given as a torch dtype or any alias; ValueError
    naming ``what`` otherwise."""
    name = FLOAT_ALIASES.get(dtype_name(value).lower()) if value is not None else None
    if name is None:
        raise ValueError(f"{what} must be a floating dtype, got {dtype_name(value) if value is not None else value}")
    return name


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]
