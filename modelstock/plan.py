"""Which tensors are merged, averaged or copied, matched across the N + 1 inputs.

Works on names, dtypes and shapes only (a safetensors header is enough), so a bad input is
refused before a byte of weights is read.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from .dtypes import FLOATS, ITEMSIZE, nbytes
from .errors import InputError, require_two_finetuned
from .ratio import layer_rows

# Wrappers that training code puts in front of every name: DistributedDataParallel's
# `module.` and torch.compile's `_orig_mod.`. open_clip's own checkpoints carry `module.`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Layer:
    name: str                        # the output's name: the base's
    names: tuple[str, ...]           # the name in each input, base first
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]          # the storage dtype's name in each input, base first
    kind: str                        # "merge" | "average" (excluded) | "copy" (non-float)
    rows: int                        # ratios in this layer (1 unless granularity "row")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes_in(self) -> int:
        """The layer's bytes in all the inputs together (what reading it costs)."""
        return sum(nbytes(d, self.shape) for d in self.dtypes)


def canonical_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _canonical_map(meta: Mapping[str, tuple], source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in meta:
        key = canonical_name(name)
        if key in out:
            raise InputError(f"holds both '{out[key]}' and '{name}', the same tensor under two names", source)
        out[key] = name
    return out


def plan_layers(
    metas: Sequence[Mapping[str, tuple[str, Sequence[int]]]],
    sources: Sequence[str],
    *,
    granularity: str = "tensor",
    exclude: Sequence[str] = (),
) -> list[Layer]:
    """Match the inputs' tensors to the base's (in the base's order) and decide each one's fate.

    ``metas[0]`` is the base, the rest the fine-tuned models; each maps name -> (dtype name,
    shape).
    Raises InputError naming the input and tensor for a missing or extra tensor, a shape
    mismatch, or a floating tensor stored as an integer elsewhere.
    """
    require_two_finetuned(len(metas) - 1)
    layer_rows((1,), granularity)  # validates the granularity before anything else
    maps = [_canonical_map(m, s) for m, s in zip(metas, sources)]
    base_keys = maps[0]
    for m, source in zip(maps[1:], sources[1:]):
        for key in base_keys.keys() - m.keys():
            raise InputError("missing (the base has it)", source, base_keys[key])
        for key in m.keys() - base_keys.keys():
            raise InputError("not in the base checkpoint", source, m[key])

    layers = []
    for key, name in base_keys.items():
        names = tuple(m[key] for m in maps)
        entries = [meta[n] for meta, n in zip(metas, names)]
        shape = tuple(int(s) for s in entries[0][1])
        dtypes = tuple(e[0] for e in entries)
        for (dtype, s), n, source in zip(entries, names, sources):
            if dtype not in ITEMSIZE:
                raise InputError(f"dtype {dtype} is not supported", source, n)
            if tuple(int(x) for x in s) != shape:
                raise InputError(f"shape {list(s)} differs from the base's {list(shape)}", source, n)
            if (dtype in FLOATS) != (dtypes[0] in FLOATS):
                raise InputError(f"dtype {dtype} where the base has {dtypes[0]}", source, n)
        if dtypes[0] not in FLOATS:
            kind = "copy"
        elif any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(key, p) for p in exclude):
            kind = "average"
        else:
            kind = "merge"
        rows = layer_rows(shape, granularity) if kind == "merge" else 1
        layers.append(Layer(name, names, shape, dtypes, kind, rows))
    return layers
