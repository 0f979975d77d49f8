"""Model Stock during training (the paper's periodic merging).

N models start from the pre-trained weights w0 and are fine-tuned side by side (different
seeds or data order). Every ``every`` optimizer steps (or whenever ``merge()`` is called, e.g.
at each epoch end) the Model Stock merge of their current weights replaces every model's
weights; w0 stays fixed. Each model keeps its own optimizer state (momentum, Adam moments):
the merge changes weights only, as in the paper's procedure.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..backends.sharded import is_dtensor, local_like
from ..plan import canonical_name, shape_differs
from ..ratio import EPS
from ..report import MergeReport
from .agreement import Agreement
from .in_memory import InPlaceMerge, state_dict_of
from .storage import memory_key


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class PeriodicMerge:
    """Merge ``models`` in place with Model Stock every ``every`` calls of :meth:`step`.

        merger = PeriodicMerge(pretrained_state, [m1, m2], every=len(loader))
        for x, y in loader:  ...; opt1.step(); opt2.step(); merger.step()

    ``base``: the pre-trained weights (a state dict or module); one copy is kept, on the
    models' device (``keep_base="device"``) or on the host (``"host"``, copied over for each
    merge to spare GPU memory). Models wrapped in DistributedDataParallel work as they are:
    the merge is local and deterministic, so ranks stay identical. Other options are
    :func:`modelstock.merge`'s (``method`` included: "uniform" averages the models each time);
    on CUDA the Triton kernels merge in place (no host round trip).
    """

    def __init__(self, base, models: Sequence[nn.Module], *, every: int | None = None, keep_base: str = "device",
                 granularity: str = "tensor", clamp: bool = True, exclude: Sequence[str] = (), eps: float = EPS,
                 backend: str = "auto", int_tensors: str = "max", missing: str = "refuse", method="model_stock"):
        if len(models) < 2:
            raise ValueError(f"PeriodicMerge needs at least two models, got {len(models)}")
        if every is not None and every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        if keep_base not in ("device", "host"):
            raise ValueError(f"keep_base must be 'device' or 'host', got {keep_base!r}")
        self.models = [_unwrap(m) for m in models]
        self._wrapped = list(models)  # what the merge is given: DDP's process group for the agreement
        self.every, self.keep_base, self.steps, self.merges = every, keep_base, 0, 0
        self.options = dict(granularity=granularity, clamp=clamp, exclude=exclude, eps=eps, backend=backend,
                            int_tensors=int_tensors, missing=missing, method=method)
        live_sd = self.models[0].state_dict()
        with Agreement.of(self._wrapped, [live_sd]).scope():  # a check that fails on one rank fails on all
            self.base = self._keep(base, live_sd)
            self._merge = InPlaceMerge(self._wrapped, self.base, self._wrapped, **self.options) \
                if keep_base == "device" else None

    def _keep(self, base, live_sd) -> dict:
        """The one copy of w0 (floating tensors; integer buffers are the live ones). A tensor that
        the base and the models both hold under several names (tied embeddings) is kept once."""
        device = next(self.models[0].parameters()).device
        where = device if self.keep_base == "device" else torch.device("cpu")
        # Floating weights: one fixed copy of w0. Integer buffers (BatchNorm's step counters)
        # move on with training: they are read from the first model, so the merge keeps them
        # as long as the models agree (and refuses if they drift apart).
        live = {canonical_name(k): (k, v) for k, v in live_sd.items()}
        kept, copies = {}, {}
        for k, v in state_dict_of(base, "base").items():
            name, model_tensor = live.get(canonical_name(k), (None, None))
            memory = (memory_key(v), None if model_tensor is None else memory_key(model_tensor))
            if not v.is_floating_point():
                kept[k] = model_tensor if model_tensor is not None else v
            elif memory[0] is not None and memory in copies:
                kept[k] = copies[memory]
            elif is_dtensor(model_tensor) or is_dtensor(v):
                # sharded models (FSDP2): keep only this rank's shard of w0, sliced from the full
                # base where the full shapes agree (the plain models' check, on the full shape)
                if not is_dtensor(v) and tuple(v.shape) != tuple(model_tensor.shape):
                    raise shape_differs(model_tensor.shape, v.shape, "finetuned[0]", name)
                shard = v.detach() if is_dtensor(v) else local_like(v, model_tensor)
                kept[k] = shard if self.keep_base == "device" else _HostShard(shard)
            else:
                kept[k] = v.detach().to(where, copy=True)
            if memory[0] is not None and v.is_floating_point():
                copies[memory] = kept[k]
        return kept

    def step(self) -> bool:
        """Count one optimizer step; merge when ``every`` steps have passed. Returns whether
        it merged."""
        self.steps += 1
        if self.every is not None and self.steps % self.every == 0:
            self.merge()
            return True
        return False

    @torch.no_grad()
    def merge(self, report: MergeReport | None = None) -> None:
        """Merge now: every model gets the Model Stock merge of the models' current weights."""
        if self._merge is not None:
            self._merge(report)
        else:
            device = next(self.models[0].parameters()).device
            moved: dict[int, object] = {}  # a tensor kept under several names moves once
            for v in self.base.values():
                if id(v) not in moved:
                    moved[id(v)] = v.restore() if isinstance(v, _HostShard) else v.to(device, non_blocking=True)
            base = {k: moved[id(v)] for k, v in self.base.items()}
            InPlaceMerge(self._wrapped, base, self._wrapped, **self.options)(report)
        self.merges += 1


class _HostShard:
    """This rank's shard of w0 kept on the host (``keep_base="host"``), rebuilt as a DTensor
    on the models' device for each merge."""

    def __init__(self, shard):
        self.local = shard.to_local().to("cpu", copy=True)
        self.mesh, self.placements, self.shape, self.stride = shard.device_mesh, shard.placements, shard.shape, shard.stride()
        self.device = shard.to_local().device

    def restore(self):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(self.local.to(self.device, non_blocking=True), self.mesh, self.placements,
                                  run_check=False, shape=self.shape, stride=self.stride)
