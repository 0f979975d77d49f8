"""Ranks agree on an in-place merge's outcome before its collective.

A check that fails on one rank only (a NaN in an unsharded BatchNorm buffer of that rank, a
base of another shape there) used to raise on that rank while the others went on into the
merge's all-reduce and waited for it forever; a user's loop that caught the error on the
failing rank then paired its next collective (FSDP2's all-gather) with that all-reduce. Here
every rank reports whether its own checks passed in one small all-reduce before the merge's
collective; if any failed, every rank raises the same error (the first failing rank's, its
message naming the rank), and every rank has made the same collectives.
"""
from __future__ import annotations

import builtins
import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..backends import sharded
from ..errors import InputError


class Agreement:
    """The ranks an in-place merge runs on together: those of its sharded parameters' mesh
    (FSDP2) or of DistributedDataParallel's process group; none for a merge in one process,
    which agrees with itself at no cost."""

    def __init__(self, group=None, device=None, active: bool = False):
        self.group, self.device, self.active = group, device, active

    @classmethod
    def of(cls, targets, dicts) -> "Agreement":
        """For a merge into ``targets`` (modules or state dicts; ``dicts``: their state dicts):
        the mesh of the first sharded tensor, else the process group of the first
        DistributedDataParallel wrapper. Inputs alone do not count: an out-of-place merge of a
        DDP model's weights may run on one rank, and has no collective."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        t = next((v for d in dicts for v in d.values() if sharded.is_dtensor(v)), None)
        if t is not None:
            group, device = sharded.mesh_group(t.device_mesh), t.to_local().device
        else:
            ddp = next((m for m in targets if isinstance(m, nn.parallel.DistributedDataParallel)), None)
            if ddp is None:
                return cls()  # plain models on several ranks: independent merges, no collective
            group, device = ddp.process_group, next(ddp.parameters()).device
        return cls(group, device, dist.get_world_size(group) > 1)

    @contextlib.contextmanager
    def scope(self):
        """Run the block's checks and local work; at its end every rank leaves the same way:
        all normally, or all with the same error."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - each is settled with the other ranks, then raised
            self.settle(e)
            raise
        self.settle(None)

    def settle(self, error: Exception | None) -> None:
        if not self.active or getattr(error, "_agreed", False):  # the latter: settled in an inner scope
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not int(flag):
            return
        reports = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(reports, None if error is None else _describe(error), group=self.group)
        rank, report = next((r, x) for r, x in enumerate(reports) if x is not None)
        common = _rebuild(rank if self.group is None else dist.get_global_rank(self.group, rank), report)
        common._agreed = True
        raise common from error


def _describe(e: Exception) -> tuple:
    """What another rank needs to raise the same error: plain data, whatever the class."""
    if isinstance(e, InputError):
        return ("InputError", e.message, e.source, e.tensor)
    return (type(e).__name__, str(e), None, None)


def _rebuild(rank: int, report: tuple) -> Exception:
    kind, message, source, tensor = report
    if kind == "InputError":
        return InputError(message, f"{source} (rank {rank})" if source else f"rank {rank}", tensor)
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(f"rank {rank}: {message}")
        except TypeError:  # a builtin that takes other arguments
            pass
    return RuntimeError(f"rank {rank}: {kind}: {message}")
