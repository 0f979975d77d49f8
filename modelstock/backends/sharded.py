"""Model Stock on sharded parameters: DTensors (FSDP2's ``fully_shard``, or any placement on a
device mesh), merged where they lie.

Each rank computes the Gram partial sums of its local shards of every layer (the reference's
fp32 products in runs, fp64 sums), at the layer's global rows (``row`` granularity: a row split
across ranks gets each rank's part). All layers' partials go through **one** all-reduce (fp64)
per merge (after one small all-reduce in which the ranks agree that every check passed:
``merging/agreement.py``); every rank then computes the same coefficients (the merge method's,
from the Gram; a method that needs none skips the all-reduce) and merges its own shards in
place. No
parameter is gathered: a rank's memory is its shards (and the base's local shards). A mesh
dimension the tensor is replicated on contributes once (from its first coordinate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference
from ..errors import InputError
from ..layer import check_result_finite, checked_coefficients, require_finite
from ..plan import Layer
from ..report import LayerStats
from . import LayerEntry


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed tensors
        return False
    return isinstance(t, DTensor)


def _local_view(d) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of DTensor ``d``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(d.shape, d.device_mesh, d.placements)
    return tuple(shape), tuple(offset)


def local_like(full: Tensor, like) -> Tensor:
    """This rank's shard of the full tensor ``full``, placed as DTensor ``like`` is: sliced
    locally, no communication."""
    from torch.distributed.tensor import DTensor

    shape, offset = _local_view(like)
    piece = full.detach()
    for dim, (size, start) in enumerate(zip(shape, offset)):
        piece = piece.narrow(dim, start, size)
    piece = piece.to(device=like.to_local().device, dtype=like.dtype, copy=True).contiguous()
    return DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def _counts_here(d) -> bool:
    """Whether this rank's partial sums count: a tensor replicated along a mesh dimension
    contributes from that dimension's first coordinate only."""
    from torch.distributed.tensor import Partial, Replicate

    coords = d.device_mesh.get_coordinate()
    for dim, placement in enumerate(d.placements):
        if isinstance(placement, Partial):
            raise InputError("is a DTensor with a pending (Partial) reduction; redistribute it first", None, None)
        if isinstance(placement, Replicate) and coords[dim] != 0:
            return False
    return True


def mesh_group(mesh):
    """The process group of ``mesh``'s ranks (None: every rank of the job)."""
    if mesh.size() == dist.get_world_size():
        return None  # the default group: every rank of the job
    if mesh.ndim == 1:
        return mesh.get_group()
    raise InputError(f"a {mesh.ndim}-D device mesh that does not span all ranks is not supported")


@dataclass
class _Piece:
    layer: Layer
    tensors: list  # DTensors: base, fine-tuned...
    out: object  # DTensor the result goes to
    rows: int  # global rows of the layer (1 for tensor granularity)
    row0: int  # first global row of this rank's shard
    local_rows: int
    counts: bool


class ShardedLayers:
    """The layer executor for DTensors (``modelstock/backends/__init__.py``): the entries'
    tensors and targets are DTensors throughout, all on one mesh (a full base is sliced to
    this rank's shard first: ``local_like``)."""

    def __init__(self, entries: list[LayerEntry], sources, *, method, compute_dtype: torch.dtype, **_):
        self.sources, self.method, self.compute_dtype = sources, method, compute_dtype
        self.pieces: list[_Piece] = []
        meshes = {id(t.device_mesh): t.device_mesh for e in entries for t in [*e.tensors, e.out]}
        if len(meshes) > 1:
            raise InputError("the sharded parameters live on more than one device mesh")
        self.mesh = next(iter(meshes.values())) if meshes else None
        for e in entries:
            layer, tensors, out = e.layer, e.tensors, e.out
            placements = {tuple(t.placements) for t in [*tensors, out]}
            if len(placements) > 1:
                raise InputError(f"is placed differently in the models ({sorted(map(str, placements))})", None,
                                 layer.name)
            shape, offset = _local_view(out)
            if layer.rows > 1:
                row0, local_rows = offset[0], shape[0]
            else:
                row0, local_rows = 0, 1
            self.pieces.append(_Piece(layer, list(tensors), out, layer.rows, row0, local_rows, _counts_here(out)))

    def __call__(self, stats: bool = True) -> dict[str, LayerStats]:
        return self.prepare()()

    def prepare(self):
        """This rank's part before the merge's collective: the checks that need no other rank
        (so that ranks can agree on them first: ``merging/agreement.py``) and the Gram partial
        sums. Returns the rest, to be called on every rank: the all-reduce, then the merge."""
        n = len(self.sources) - 1
        for p in self.pieces:
            if p.layer.kind == "average":
                require_finite(reference, [t.to_local() for t in p.tensors[1:]], self.sources[1:], p.layer.names[1:])
        merged = [p for p in self.pieces if p.layer.kind == "merge"]
        if not merged or self.method.statistics != "gram":  # a method that needs no Gram: no collective
            return lambda: self._finish(None)
        grams = torch.zeros(sum(p.rows for p in merged), n, n, dtype=torch.float64,
                            device=merged[0].out.to_local().device)
        start = 0
        for p in merged:
            local = [t.to_local().reshape(-1).to(self.compute_dtype) for t in p.tensors]
            if p.counts and local[0].numel():
                grams[start + p.row0: start + p.row0 + p.local_rows] += reference.gram(local[0], local[1:],
                                                                                      p.local_rows)
            start += p.rows
        return lambda: self._finish(grams)

    def _finish(self, grams) -> dict[str, LayerStats]:
        figures: dict[str, LayerStats] = {}
        if grams is not None:
            dist.all_reduce(grams, group=mesh_group(self.mesh))  # the one collective of the merge's math
        start = 0
        for p in self.pieces:
            local = [t.to_local() for t in p.tensors]
            out = p.out.to_local()
            flat = [t.reshape(-1).to(self.compute_dtype) for t in local]
            if p.layer.kind == "base":  # missing in some fine-tuned model: the base's shard
                out.copy_(local[0])
                figures[p.layer.name] = LayerStats(p.layer.name, list(p.layer.shape), p.layer.numel, "base")
                continue
            if p.layer.kind == "average":  # checked finite in prepare()
                result = reference.merge_into(torch.empty_like(flat[0]), None, flat[1:])
                figures[p.layer.name] = LayerStats(p.layer.name, list(p.layer.shape), p.layer.numel, "average")
            else:
                stats = None if grams is None else grams[start: start + p.rows]
                c = checked_coefficients(self.method, stats, p.layer, flat, self.sources, reference,
                                         elsewhere="holds NaN or inf (in another rank's shard)")
                start += p.rows
                here = slice(p.row0, p.row0 + p.local_rows) if p.rows > 1 else slice(None)
                weights = None if c.weights is None else c.weights[here]
                result = reference.merge_into(torch.empty_like(flat[0]), flat[0], flat[1:], c.scale[here], weights) \
                    if flat[0].numel() else flat[0]
                if stats is None:  # no Gram saw this shard: a NaN or inf shows in the result
                    check_result_finite(result, flat, self.sources, p.layer, reference)
                figures[p.layer.name] = self.method.layer_stats(p.layer.name, p.layer.shape, c)
            out.copy_(result.view(out.shape))
        return figures
