"""The compute cost of a network with DynOPool layers, differentiable in every DynOPool's alpha.

The cost is the multiply-accumulates of the network's ``nn.Conv2d`` and ``nn.Linear`` layers at
the current (integer) resolutions. A layer downstream of DynOPool layers sees its spatial size
scaled by each one's (H_hat W_hat) / (H_out W_out): value 1, gradient that of the
straight-through sizes, so the count equals the integer MACs and its gradient says how they
move with each alpha.

Which DynOPool layers are upstream of a layer is read off the autograd graph of one forward
pass: each DynOPool output is tagged by multiplying it with a leaf of value 1, and a layer's
input is upstream of the tags its graph reaches. This follows the real data flow, so a
residual block's shortcut (which bypasses the block's pooling) is not scaled by it.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import Tensor, nn

from .pool import DynOPool2d, _full_values, output_sizes
from .probe import example_tensor, run
from .reference import output_size, straight_through_size


def _layer_macs(module: nn.Module, out: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    return out.numel() * module.in_features  # nn.Linear


def _upstream(t: Tensor, tags: dict[int, DynOPool2d]) -> frozenset:
    found, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in tags:
            found.add(tags[id(var)])
        stack.extend(f for f, _ in fn.next_functions)
    return frozenset(found)


class _Trace:
    """One forward pass's record: each layer's integer MACs and the DynOPools upstream of it,
    and each DynOPool's input size."""

    def __init__(self, model: nn.Module, input_shape):
        self.model, self.input_shape = model, input_shape
        self._held: dict[int, set] = {}  # by min_size: what held() found at these sizes
        self.layers: list[tuple[int, frozenset, tuple | None]] = []  # MACs, DynOPools upstream, conv output size
        self.pool_inputs: dict[DynOPool2d, tuple[int, int]] = {}
        tags: dict[int, DynOPool2d] = {}
        keep = []

        def tag_pool(module, inputs, output):
            self.pool_inputs[module] = tuple(inputs[0].shape[-2:])
            leaf = torch.ones((), dtype=output.dtype, device=output.device, requires_grad=True)
            tags[id(leaf)] = module
            keep.append(leaf)
            return output * leaf

        def count(module, inputs, output):
            hw = tuple(output.shape[-2:]) if isinstance(module, nn.Conv2d) else None
            self.layers.append((_layer_macs(module, output), _upstream(inputs[0], tags), hw))

        handles = []
        for m in model.modules():
            if isinstance(m, DynOPool2d):
                handles.append(m.register_forward_hook(tag_pool))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(count))
        run(model, example_tensor(model, input_shape, requires_grad=True), handles, grad=True)
        _reshard(model)
        self.sizes = self.current_sizes()

    def current_sizes(self) -> dict:
        """Every DynOPool's output size now, from one device-to-host read of their alphas."""
        pools = list(self.pool_inputs)
        return dict(zip(pools, output_sizes(pools, [self.pool_inputs[p] for p in pools])))

    def stale(self) -> bool:
        return self.current_sizes() != self.sizes

    def held(self, min_size: int) -> set:
        """(DynOPool, axis) pairs that one output cell fewer along that axis would give a conv
        map of fewer than ``min_size`` cells there (or that cannot lose a cell). Only the pools
        upstream of a conv whose map is within reach of min_size (a cell fewer into a layer
        takes at most ceil(1 / its lowest alpha) cells off its output) are candidates; each is tried by one forward at the
        example size with its alpha set to give one cell fewer. A layer-4 map at 2 cells then
        holds only the pools whose next smaller size would shrink it, not every pool upstream."""
        if min_size <= 0:
            return set()
        if min_size not in self._held:
            # a cell fewer into a layer with alpha >= lo takes at most ceil(1 / lo) cells off its
            # output, and a stride-1 conv's one: only maps that close to min_size can fall below it
            reach = max(math.ceil(1 / p.alpha_range[0]) for p in self.pool_inputs) if self.pool_inputs else 1
            candidates = dict.fromkeys((p, axis) for _, ups, hw in self.layers if hw is not None
                                       for axis in (0, 1) if hw[axis] < min_size + reach for p in ups)
            self._held[min_size] = {c for c in candidates if not self._can_lose_a_cell(*c, min_size)}
        return self._held[min_size]

    def _can_lose_a_cell(self, pool: DynOPool2d, axis: int, min_size: int) -> bool:
        size, out = self.pool_inputs[pool][axis], self.sizes[pool][axis]
        offset = pool.size_offset[axis] if pool.size_offset is not None else None
        # the alpha halfway into the next smaller size's interval, floor(size / alpha + b) = out - 1
        # (round(size / alpha) = out - 1 without an offset)
        target = out - 1 if offset is None else out - 0.5 - offset
        if out <= 1 or target <= 0:
            return False
        alpha = size / target
        lo, hi = pool.alpha_range
        if not lo <= alpha <= hi or output_size(size, alpha, offset) != out - 1:
            return False
        maps = []

        def record(module, inputs, output):
            maps.append(output.shape[-2 + axis])

        handles = [m.register_forward_hook(record) for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        # a stand-in parameter, not a write: the task's graph may hold alpha for its backward
        stored = pool._parameters["alpha"]
        moved = stored.detach().clone()
        moved[axis] = alpha
        pool._parameters["alpha"] = nn.Parameter(moved, requires_grad=False)
        try:
            run(self.model, example_tensor(self.model, self.input_shape), handles)
        except Exception:  # noqa: BLE001 - a map too small for a kernel: that cell cannot go
            return False
        finally:
            pool._parameters["alpha"] = stored
        return min(maps, default=min_size) >= min_size

    def cost(self, min_size: int = 0) -> Tensor:
        """The MACs, differentiable in every alpha. With ``min_size``, an alpha (per axis) gets no
        gradient from the cost once a conv downstream of its DynOPool works on a map of
        ``min_size`` or fewer cells along that axis: the cost stops squeezing a map that small
        (the value is the same)."""
        held = self.held(min_size)
        factors = {}
        for (p, hw), alpha in zip(self.pool_inputs.items(), _plain_alphas(self.pool_inputs)):
            factor = torch.ones((), dtype=torch.float64)
            for axis in (0, 1):
                out = self.sizes[p][axis]
                size_hat = out if (p, axis) in held else straight_through_size(hw[axis], alpha[axis].double(), out)
                factor = factor * size_hat / out
            factors[p] = factor
        total = torch.zeros((), dtype=torch.float64)
        for macs, ups, _ in self.layers:
            scale = torch.ones((), dtype=torch.float64)
            for p in ups:
                scale = scale * factors[p].to(scale.device)
            total = total + macs * scale
        return total


def _reshard(model: nn.Module) -> None:
    """Under FSDP2, leave the model sharded as the probing forward found it: that forward
    leaves the root unsharded (its backward never comes), and a root layer's ``alpha`` would
    then be the gathered copy, which FSDP2 frees at its next reshard (an optimizer made from
    ``model.parameters()`` after the loss would step that copy). FSDP2 gathers again for the
    task's backward where it needs to."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not loaded: nothing is sharded
    if fsdp is None or not hasattr(fsdp, "FSDPModule"):
        return
    for m in model.modules():
        if isinstance(m, fsdp.FSDPModule):
            m.reshard()


def _plain_alphas(pools) -> list[Tensor]:
    """Each layer's alpha as a plain (2,) tensor whose gradient reaches the parameter. Under
    FSDP2 a layer outside its forward holds a sharded DTensor: a cost made of DTensors is a
    DTensor, which cannot meet the task loss (a plain tensor) in one backward. They are made
    full in one collective for all (``_full_values``); each rank computes the same cost, and
    its gradient returns to each rank's own shard (no reduction: every rank already has the
    whole of it), which FSDP2's averaged gradient of the task then meets, as in one process.
    (The root's layers are still unsharded after its forward: plain tensors, whose gradient
    FSDP2 averages over ranks: the same value on each.)"""
    return _full_values([p.alpha for p in pools])


def count_macs(model: nn.Module, input_shape) -> Tensor:
    """MACs of ``model``'s Conv2d and Linear layers for one input of ``input_shape`` (batch
    included) at the current sizes, as an fp64 tensor differentiable in every DynOPool's alpha.
    Its value is half the FLOPs torch.utils.flop_counter counts for those layers."""
    return _Trace(model, input_shape).cost()


class ComputeCostLoss(nn.Module):
    """The cost term added to the task loss. With a budget (MACs): ``weight * relu(cost / budget
    - 1)``, plus ``weight * relu(floor - cost / budget)`` with a ``floor`` (a fraction of the
    budget below which the cost is pushed back up; default 0, the spec's one-sided hinge).
    Without one: ``weight * cost / cost_at_init``. The layer structure is traced once and again
    only when some DynOPool's integer output size changes.

    ``min_size`` (default 2): the cost stops pushing an alpha (per axis) where one output cell
    fewer would give some convolution a map of fewer than ``min_size`` cells along that axis,
    so the budget never squeezes a map below it (the task loss still may; 0: no such floor).
    Only those alphas stop: with a late map at 2 cells, earlier pools whose next smaller size
    leaves it at 2 go on. Over budget with every alpha held, no single DynOPool can lose a
    cell without a map below ``min_size``: a warning says so (once).

    The recipe that lands within 10% of the budget (docs/dynopool.md, Training to a budget):
    ``weight=10, floor=0.9`` and the pooling parameters stepped by their own
    ``torch.optim.Adam(pools, lr=0.01, betas=(0.0, 0.999))`` (``split_parameters``)."""

    def __init__(self, model: nn.Module, input_shape, budget: float | None = None, weight: float = 1.0,
                 min_size: int = 2, floor: float = 0.0):
        super().__init__()
        if budget is not None and not budget > 0:
            raise ValueError(f"budget must be a positive number of MACs, got {budget!r}")
        if not 0 <= floor < 1:
            raise ValueError(f"floor must be a fraction of the budget in [0, 1), got {floor!r}")
        self.model, self.input_shape, self.budget, self.weight = [model], tuple(input_shape), budget, weight
        self.min_size, self.floor = min_size, floor
        self._trace = _Trace(model, self.input_shape)
        self.cost_at_init = float(self._trace.cost().detach())
        self._warned = False

    def cost(self) -> Tensor:
        if self._trace.stale():
            self._trace = _Trace(self.model[0], self.input_shape)
        return self._trace.cost(self.min_size)

    def forward(self) -> Tensor:
        cost = self.cost()
        if self.budget is None:
            return self.weight * cost / self.cost_at_init
        ratio = cost / self.budget
        if not self._warned and float(ratio.detach()) > 1 and self._all_held():
            self._warned = True
            warnings.warn(f"ComputeCostLoss: the cost is {float(ratio.detach()):.3f}x the budget and no DynOPool "
                          f"can lose an output cell (along either axis) without giving a convolution a map of "
                          f"fewer than {self.min_size} cells at {self.input_shape}: the cost stops pushing here "
                          "(min_size=0 allows smaller maps; a larger input leaves room)", stacklevel=2)
        return self.weight * (torch.relu(ratio - 1) + torch.relu(self.floor - ratio))

    def _all_held(self) -> bool:
        trace = self._trace
        return {(p, axis) for p in trace.pool_inputs for axis in (0, 1)} <= trace.held(self.min_size)
