"""Which names of a state dict are one tensor in memory (tied embeddings, a DynOPool2d that
``replace_pooling`` registers on a block's path and on its shortcut, any module registered
twice). An in-place merge writes such a tensor once: merging it under each name would read the
result of the first write as the second one's input."""
from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from ..backends.sharded import is_dtensor
from ..errors import InputError
from ..plan import canonical_name


def memory_key(t):
    """What two tensors share when they are one tensor in memory (the same elements, the same
    layout); None for an empty one, which shares nothing that a write could reach. A DTensor
    is keyed by its local shard."""
    local = t.to_local() if is_dtensor(t) else t
    if local.numel() == 0 or local.device.type == "meta":
        return None
    return local.device, local.data_ptr(), local.dtype, tuple(local.shape), local.stride()


def tied_names(pairs) -> list[list[str]]:
    """The canonical names that are one tensor in memory, in groups of two or more, in the
    first state dict's order. ``pairs``: (module or state dict, its state dict) for each model
    written in place; a name tied in any of them is tied. A module's parameters and buffers are
    matched by object (the same on every rank, whatever its shard holds), any tensor also by
    its memory (two parameters made over one storage)."""
    parent: dict[str, str] = {}
    first: dict = {}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def tie(name, key):
        if name not in parent or key is None:
            return
        if key in first:
            parent[root(name)] = root(first[key])
        else:
            first[key] = name

    for m, sd in pairs:
        parent.update((n, n) for n in map(canonical_name, sd) if n not in parent)
        if isinstance(m, nn.Module):
            for n, t in chain(m.named_parameters(remove_duplicate=False), m.named_buffers(remove_duplicate=False)):
                tie(canonical_name(n), ("object", id(t)))
        for n, t in sd.items():
            tie(canonical_name(n), memory_key(t))
    groups: dict[str, list[str]] = {}
    for n in parent:
        groups.setdefault(root(n), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _local(t):
    return t.to_local() if is_dtensor(t) else t


def tied_layers(layers, groups, sds, sources) -> dict:
    """{name of a layer that is another's tensor: that layer (the group's first in plan
    order)}. The two must be merged alike, and every input must hold the same values under
    both names (one that keeps them as two tensors too: a state dict copied name by name):
    an in-place merge can write one result for them."""
    order = {canonical_name(layer.name): i for i, layer in enumerate(layers)}
    tied = {}
    for group in groups:
        members = sorted(order[n] for n in group if n in order)
        lead = layers[members[0]] if members else None
        for layer in (layers[i] for i in members[1:]):
            if layer.kind != lead.kind:
                raise InputError(f"is one tensor with '{lead.name}' in the models merged in place, but that name is "
                                 f"{_KINDS[lead.kind]} and this one {_KINDS[layer.kind]}: give both the same "
                                 "treatment", None, layer.name)
            for sd, a, b, source in zip(sds, lead.names, layer.names, sources):
                x, y = sd[a], sd[b]
                if memory_key(x) != memory_key(y) and not (x.dtype == y.dtype and torch.equal(_local(x), _local(y))):
                    raise InputError(f"is one tensor with '{lead.name}' in the models merged in place, but differs "
                                     "from it here: an in-place merge writes one result for both", source, b)
            tied[layer.name] = lead
    return tied


_KINDS = {"merge": "merged", "average": "excluded (averaged)", "copy": "copied", "base": "the base's"}


def mirror_copies(layers, tied, dest) -> tuple[list, list]:
    """(destinations, sources) of the copies that follow the executors, which write each merged
    tensor into the first target only: every other tensor in memory of every target that a
    merged layer's names reach, once each."""
    by_lead: dict[str, list[str]] = {}
    for layer in layers:
        by_lead.setdefault(tied[layer.name].name if layer.name in tied else layer.name, []).append(
            canonical_name(layer.name))
    dst, src = [], []
    for lead, names in by_lead.items():
        out = _local(dest[0][canonical_name(lead)])
        seen = {memory_key(out)}
        for d in dest:
            for n in names:
                t = _local(d[n])
                key = memory_key(t)
                if key is not None and key not in seen:
                    seen.add(key)
                    dst.append(t)
                    src.append(out)
    return dst, src
