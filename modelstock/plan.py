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
from .errors import InputError, MergeWarning, require_two_finetuned
from .ratio import layer_rows

# What a merge does with a tensor some models lack: refuse (one line naming it), or take the
# base's (mergekit's choice; a tensor the base lacks is then left out).
MISSING = ("refuse", "base")
# Wrappers that training code puts in front of every name: DistributedDataParallel's
# `module.` and torch.compile's `_orig_mod.`. open_clip's own checkpoints carry `module.`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Layer:
    name: str                        # the output's name: the base's
    names: tuple[str, ...]           # the name in each input, base first
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]          # the storage dtype's name in each input, base first
    kind: str                        # "merge" | "average" (excluded) | "copy" (non-float) |
                                     # "base" (missing in some fine-tuned model: the base's)
    rows: int                        # ratios in this layer (1 unless granularity "row")

    def out_dtype(self, out_dtype: str | None) -> str:
        """The dtype the layer is written in: ``out_dtype`` (if any) for floating tensors."""
        return out_dtype if out_dtype and self.dtypes[0] in FLOATS else self.dtypes[0]

    @property
    def copied(self) -> bool:
        """Not computed: copied from the inputs (``names`` may then hold the base's alone)."""
        return self.kind in ("copy", "base")

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
    missing: str = "refuse",
    method=None,
) -> list[Layer]:
    """Match the inputs' tensors to the base's (in the base's order) and decide each one's fate.

    ``metas[0]`` is the base, the rest the fine-tuned models; each maps name -> (dtype name,
    shape).
    Raises InputError naming the input and tensor for a shape mismatch or a floating tensor
    stored as an integer elsewhere, and for a tensor missing in some models (``missing=
    "refuse"``); with ``missing="base"`` (mergekit's choice) such a tensor is the base's, and
    one the base lacks is left out (``dropped_tensors`` names them). ``method``: the merge
    method (``modelstock/methods``), which says how many fine-tuned models it takes (default:
    Model Stock's two or more).
    """
    if method is None:
        require_two_finetuned(len(metas) - 1)
    else:
        method.check_count(len(metas) - 1)
    layer_rows((1,), granularity)  # validates the granularity before anything else
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    maps = [_canonical_map(m, s) for m, s in zip(metas, sources)]
    base_keys = maps[0]
    if missing == "refuse":
        for m, source in zip(maps[1:], sources[1:]):
            for key in base_keys.keys() - m.keys():
                raise InputError("missing (the base has it; --missing base / missing='base' takes the base's)", source,
                                 base_keys[key])
            for key in m.keys() - base_keys.keys():
                raise InputError("not in the base checkpoint (--missing base / missing='base' leaves it out)", source, m[key])

    layers = []
    for key, name in base_keys.items():
        if any(key not in m for m in maps[1:]):
            dtype, shape = metas[0][name]
            if dtype not in ITEMSIZE:
                raise InputError(f"dtype {dtype} is not supported", sources[0], name)
            layers.append(Layer(name, (name,), tuple(int(x) for x in shape), (dtype,), "base", 1))
            continue
        names = tuple(m[key] for m in maps)
        entries = [meta[n] for meta, n in zip(metas, names)]
        shape = tuple(int(s) for s in entries[0][1])
        dtypes = tuple(e[0] for e in entries)
        for (dtype, s), n, source in zip(entries, names, sources):
            if dtype not in ITEMSIZE:
                raise InputError(f"dtype {dtype} is not supported", source, n)
            if tuple(int(x) for x in s) != shape:
                raise shape_differs(s, shape, source, n)
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


def shape_differs(shape, base_shape, source: str, name: str) -> InputError:
    return InputError(f"shape {[int(x) for x in shape]} differs from the base's {[int(x) for x in base_shape]}", source,
                      name)


def warn_unmatched(layers: Sequence[Layer], exclude: Sequence[str]) -> None:
    """A warning for each ``exclude`` pattern that names no tensor (a typo excludes nothing)."""
    import warnings

    for p in exclude:
        if not any(fnmatch.fnmatchcase(name, p) for layer in layers for name in (layer.name, canonical_name(layer.name))):
            warnings.warn(f"exclude pattern {p!r} matches no tensor", MergeWarning, stacklevel=3)


def dropped_tensors(metas: Sequence[Mapping[str, tuple]], sources: Sequence[str]) -> list[str]:
    """``"source: name"`` of each fine-tuned tensor the base lacks (left out with
    ``missing="base"``)."""
    base_keys = {canonical_name(n) for n in metas[0]}
    return [f"{source}: {name}" for meta, source in zip(metas[1:], sources[1:]) for name in meta
            if canonical_name(name) not in base_keys]
