"""``dynopool2d`` and ``DynOPool2d``: the public face of the operator (dispatch + module).

The output size is alpha's value rounded: the host must know it before the output exists.
``dynopool2d`` reads it per call (one device-to-host copy) unless it is given. ``DynOPool2d``
gets it from a plan that ``plan_sizes`` (a forward pre-hook that ``replace_pooling`` and
``read_sizes_once`` install) makes for every layer of a model in one copy per model forward.
With the sizes known, the Triton path does no host read at all: the GPU never waits for the
host, CUDA graphs can capture it, and torch.compile traces it (a custom op) without a break.
"""
from __future__ import annotations

import math
import operator
import sys
import weakref

import torch
from torch import Tensor, nn

from msdp_kernels.dispatch import check_backend, choose_backend

from . import _compat, probe, reference, small_maps, torch_pool, triton_pool

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def dynopool2d(x: Tensor, alpha, delta, *, backend: str = "auto",
               output_size: tuple[int, int] | None = None) -> Tensor:
    """DynOPool: learnable output size (``alpha`` = inverse scale per axis, (h, w)) and query
    spread (``delta``, in output cells), by bilinear sampling and a max over 4 queries per
    cell. Differentiable in x, alpha and delta; ``alpha`` gets the straight-through gradient
    of the output size. See ``docs/spec.md``, "DynOPool".

    ``alpha`` and ``delta``: tensors of 2 values (h, w), or numbers or pairs (constants, as
    ``DynOPool2d`` takes them). ``x``: floating point.
    ``output_size``: (h_out, w_out) if the caller knows it (``reference.output_size`` of
    alpha's value, or a ``DynOPool2d``'s size rule); without it, alpha and delta are read to
    the host and checked (alpha finite and > 0, delta finite) on every call. With it they are
    checked where that reads nothing from a device: when they are on the host."""
    alpha, delta = _as_values(alpha, x, "alpha"), _as_values(delta, x, "delta")
    if output_size is None:
        return _read_size_and_pool(x, alpha, delta, backend)
    size = _size_pair(output_size)
    reference.check_shapes(x, alpha, delta)
    if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
        values = torch.cat([alpha.detach().reshape(2), delta.detach().reshape(2)]).tolist()
        reference.check_values(values[:2], values[2:])
    return _pool(x, alpha, delta, backend, size)


def _pool(x: Tensor, alpha: Tensor, delta: Tensor, backend: str, size: tuple[int, int]) -> Tensor:
    """The dispatch, for checked inputs and a known output size."""
    if resolve_backend(backend, x) == "triton":
        return triton_pool.dynopool2d(x, alpha, delta, *size)
    return _reference(x, alpha, delta, size)


# A host read cannot be traced: under torch.compile these are one graph break each, and the
# compiled regions around them recompile when a rounded size changes.
@torch.compiler.disable
def _read_size_and_pool(x: Tensor, alpha: Tensor, delta: Tensor, backend: str) -> Tensor:
    resolve_backend(backend, x)  # a bad name is an error before anything is read
    return _pool(x, alpha, delta, backend, reference.check_inputs(x, alpha, delta))


# The PyTorch path (backend "torch", and "auto" off CUDA): torch_pool, held to reference.py by
# the tests. Not traced: it checks its output for NaN on the host (inputs with inf or NaN are
# computed again on the reference).
@torch.compiler.disable
def _reference(x: Tensor, alpha: Tensor, delta: Tensor, size: tuple[int, int]) -> Tensor:
    return torch_pool.dynopool2d(x, alpha, delta, size)


def _as_values(v, x: Tensor, name: str) -> Tensor:
    """A tensor as it is; a number or a pair as an fp32 (2,) tensor on x's device."""
    if isinstance(v, Tensor):
        return v
    return _pair(v, name).to(x.device if isinstance(x, Tensor) else None)


def _size_pair(size) -> tuple[int, int]:
    try:
        h, w = (operator.index(v) for v in size)
        if isinstance(size, (str, bytes)) or h < 1 or w < 1 or any(isinstance(v, bool) for v in size):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be two integers >= 1 (h_out, w_out), got {size!r}") from None
    return h, w


def resolve_backend(backend: str, x: Tensor) -> str:
    """"auto" sends CUDA tensors in fp32 / fp16 / bf16 to the Triton kernels and everything
    else to the reference; "triton" also runs CPU tensors under TRITON_INTERPRET=1 (tests).
    The rule both packages share: ``msdp_kernels/dispatch.py``."""
    return choose_backend(backend, x.device, kernels_take=x.dtype in triton_pool.DTYPES)


STATIC_GRAPH_ERROR = (
    "DynOPool2d takes its output size from alpha's value at run time, which a static graph "
    "(torch.export, ONNX, TorchScript, compile(fullgraph=True)) cannot hold: freeze the trained model "
    "first, frozen = dynopool.freeze(model, example_input), and export, trace or script `frozen` "
    "(docs/dynopool.md, Deployment)")


def _disabled_for_graphs(fn):
    """torch.compiler.disable, with the reason a fullgraph compile reports (torch >= 2.7 takes it)."""
    try:
        return torch.compiler.disable(reason=STATIC_GRAPH_ERROR)(fn)
    except TypeError:
        return torch.compiler.disable(fn)


def _in_static_graph() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or exporting() or torch.onnx.is_in_onnx_export()


def refuse_static_graph() -> None:
    """One clear error where a static graph is being made of a layer whose size is dynamic."""
    if _in_static_graph():
        raise RuntimeError(STATIC_GRAPH_ERROR)


class DynOPool2d(nn.Module):
    """Pooling with a learned output size and receptive field (Jang et al., CVPR 2022).

    ``alpha`` (per axis h, w) is the inverse scale factor: 2 halves the resolution like a
    stride-2 pooling, values below 1 upsample. ``delta`` is half the spread of the 4 query
    points of each output cell, in cells (0.25 with alpha 2 is exactly 2x2 max pooling).

    Output size per axis: max(1, round(H / alpha)) (half to even), or with ``size_offset`` b
    (a number or a pair (b_h, b_w)) max(1, floor(H / alpha + b)): ``replace_pooling`` gives
    each layer the rule of the site it replaced (b = 0 keeps a 2x2 pool's floor(H / 2) at
    alpha 2, b = 1/2 a padded stride-2 conv's ceil(H / 2)). The gradient is that of H / alpha
    either way.

    Valid range: before each forward the layer projects its parameters onto
    ``alpha_range`` (per axis; the lower bound caps the upsampling, every alpha > 0 gives an
    output of at least 1 cell) and ``delta_range``, in place and without a gradient, so any
    optimizer step that leaves them finite is safe, and the value stored is the value used
    (projected gradient descent). A non-finite alpha or delta (a diverged run) is an error.

    Gradient (``grad_scale``): "mean" (default) gives alpha and delta the gradient of the mean
    over the layer's outputs per sample (the spec's sum divided by C h_out w_out, each call's
    share limited to +-0.5), so that one optimizer over every parameter (SGD at lr 0.1, AdamW)
    moves alpha by fractions of a cell, not by tens; "sum" is the spec's gradient as it is.
    ``dynopool2d`` (the function) always gives the spec's gradient. Casting the model
    (``model.to(torch.bfloat16)``, ``.half()``) leaves alpha and delta in fp32.

    Deployment: the output size is read from alpha at run time, so the layer has no static
    graph; ``dynopool.freeze`` turns it into one with constant sizes (``FrozenDynOPool2d``).
    """

    def __init__(self, alpha=2.0, delta=0.25, learn_alpha: bool = True, learn_delta: bool = True,
                 backend: str = "auto", alpha_range=(0.25, 64.0), delta_range=(0.0, 1.0), size_offset=None,
                 grad_scale: str = "mean"):
        super().__init__()
        if grad_scale not in ("mean", "sum"):
            raise ValueError(f"grad_scale must be 'mean' or 'sum', got {grad_scale!r}")
        self.grad_scale = grad_scale
        self.alpha = nn.Parameter(_pair(alpha, "alpha"), requires_grad=learn_alpha)
        self.delta = nn.Parameter(_pair(delta, "delta"), requires_grad=learn_delta)
        self.backend = backend
        self.alpha_range = _bounds(alpha_range, "alpha_range", positive=True)
        self.delta_range = _bounds(delta_range, "delta_range")
        self.size_offset = _offsets(size_offset)
        values = self.alpha.tolist() + self.delta.tolist()
        reference.check_values(values[:2], values[2:])
        for name, v, (lo, hi) in (("alpha", values[:2], self.alpha_range), ("delta", values[2:], self.delta_range)):
            if not all(lo <= t <= hi for t in v):
                raise ValueError(f"{name} {v} is outside its valid range [{lo}, {hi}]")
        # ((H, W), (h_out, w_out), project): this forward's sizes for an input of H x W,
        # planned by plan_sizes; None: read alpha here
        self._plan = None
        self._last_input = None  # (H, W) of the last input, for the next plan
        self.register_load_state_dict_pre_hook(_refuse_conflicting_aliases)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(value)  # here, not at the first forward
        self._backend = value

    def forward(self, x: Tensor) -> Tensor:
        refuse_static_graph()
        hw = (x.shape[-2], x.shape[-1])
        plan = self._plan
        if torch.compiler.is_compiling():
            # sizes compared and used as the plan's symbols (_traced_plan): one graph for all
            if plan is None or not _fits(plan, hw):
                plan = self._input_plan(hw)
            else:
                plan = _traced_plan(plan)
        else:
            if self._last_input != hw:
                self._last_input = hw
            if plan is None or plan[0] != hw:
                plan = self._read_plan(hw)
        if plan[2]:
            with torch.no_grad():
                self.alpha.clamp_(*self.alpha_range)
                self.delta.clamp_(*self.delta_range)
            # a layer called twice per forward (a shared pool) projects once: a second
            # in-place write would invalidate what the first call saved for its backward
            # (without a model's plan, the second call reads the projected values itself)
            if self._plan is plan or (len(plan) > 3 and self._plan is not None and self._plan[-1] is plan[3]):
                self._plan = (self._plan[0], self._plan[1], False) + self._plan[3:]
        return _pool(x, *self._scaled_parameters(x, plan[1]), self.backend, plan[1])

    def _scaled_parameters(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """alpha and delta as the op takes them: their values, and (``grad_scale="mean"``, the
        default) the gradient of the mean over the layer's outputs per sample rather than of
        their sum, each value's share limited to +-``GRAD_LIMIT`` per call. The spec's gradient
        (``"sum"``) sums over every channel and cell: at init 4-6x the largest weight gradient
        of a ResNet-18, growing with the map and with the activations, so one plain SGD step
        at lr 0.1 moved alpha by tens and the projection pinned it to a bound. The mean is a
        per-cell average (a constant factor per layer and input size: Adam's steps do not
        change, and DDP's and FSDP2's averages are the single process's); the limit acts only
        where the network diverges, so that a step of lr moves alpha by at most lr x 0.5 per
        call whatever the weights do."""
        if getattr(self, "grad_scale", "sum") == "sum":
            return self.alpha, self.delta
        k = 1.0 / max(1, x.shape[1] * size[0] * size[1])
        return _MeanGradient.apply(self.alpha, k), _MeanGradient.apply(self.delta, k)

    @_disabled_for_graphs  # a host read: one graph break, only where no plan was made
    def _read_plan(self, hw) -> tuple:
        return self._make_plan(hw, _read_values([self])[0])

    @_disabled_for_graphs  # the compiled forward's first call, or an input of a new size
    def _input_plan(self, hw) -> tuple:
        self._last_input = (int(hw[0]), int(hw[1]))
        return self._read_plan(self._last_input)

    def _make_plan(self, hw, values) -> tuple:
        """The plan for an input of size hw from host values (alpha_h, alpha_w, delta_h, delta_w)
        read before any projection."""
        a_used, d_used = self._project(values)
        b = self.size_offset or (None, None)
        size = (reference.output_size(hw[0], a_used[0], b[0]), reference.output_size(hw[1], a_used[1], b[1]))
        return hw, size, a_used + d_used != list(values)

    def _project(self, values) -> tuple[list[float], list[float]]:
        """(alpha, delta) as a forward uses them: host values projected onto the ranges."""
        a, d = values[:2], values[2:]
        if not all(map(math.isfinite, values)):
            raise ValueError(f"DynOPool2d parameters are not finite (alpha {a}, delta {d}): the "
                             "training has diverged (docs/dynopool.md, Training, has learning rates that train)")
        return ([min(max(v, self.alpha_range[0]), self.alpha_range[1]) for v in a],
                [min(max(v, self.delta_range[0]), self.delta_range[1]) for v in d])

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The output size for an h x w input at the current (projected) alpha."""
        return self._read_plan((h, w))[1]

    def size_rule(self) -> str:
        if self.size_offset is None:
            return "round(H / alpha)"
        if self.size_offset[0] == self.size_offset[1]:
            return _rule(self.size_offset[0], "H") + " (W alike)"
        return ", ".join(_rule(b, axis) for b, axis in zip(self.size_offset, "HW"))

    def extra_repr(self) -> str:
        dt = _distributed_tensor()
        if dt is not None and isinstance(self.alpha, dt.DTensor):
            # sharded (FSDP2): the values are on several ranks, and a repr printed on one rank
            # must not wait for the others
            values = f"alpha, delta: DTensors placed {tuple(self.alpha.placements)}"
        else:
            a, d = self.alpha.detach().cpu().tolist(), self.delta.detach().cpu().tolist()
            values = (f"alpha=({a[0]:.3f}, {a[1]:.3f}), scale=({1 / a[0]:.3f}, {1 / a[1]:.3f}), "
                      f"delta=({d[0]:.3f}, {d[1]:.3f})")
        return (f"{values}, size={self.size_rule()}, learn_alpha={self.alpha.requires_grad}, "
                f"learn_delta={self.delta.requires_grad}, alpha_range={self.alpha_range}, "
                f"delta_range={self.delta_range}")

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` / ``.half()`` cast alpha and delta too: bf16 holds 2.3 as
        2.297 and a step of 1e-3 rounds away at 2.0. They stay in their own (fp32 or fp64)
        dtype, as norm statistics do under autocast; device moves and fp64 casts apply."""
        def keep_precision(t):
            out = fn(t)
            if (isinstance(out, Tensor) and out.dtype in _LOW_PRECISION and t.is_floating_point()
                    and t.dtype not in _LOW_PRECISION):
                return t.to(device=out.device)  # from the original: no round trip through 16 bits
            return out
        return super()._apply(keep_precision, recurse)

    def __prepare_scriptable__(self):  # torch.jit.script calls this first
        raise RuntimeError(STATIC_GRAPH_ERROR)


# Per layer, the first of its names a load in progress met: (that load's error list, the
# name's prefix, the values under it). torch.nn.Module.load_state_dict makes one error list
# per call and hands it to every module, so it tells one load from the next. Weak keys: a
# layer never lives longer for being loaded.
_LOADING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refuse_conflicting_aliases(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                unexpected_keys, error_msgs) -> None:
    """A layer shared between sites (``replace_pooling`` shares one per feature level) has one
    name per site, and load_state_dict loads it once per name, keeping the last silently. Two
    names holding different values is a corrupt or hand-edited state dict: refuse it, naming
    both keys, before the second is copied in."""
    values = {n: state_dict[prefix + n] for n in ("alpha", "delta") if prefix + n in state_dict}
    seen = _LOADING.get(module)
    if seen is None or seen[0] is not error_msgs:
        # the layer's own values before this load: a state dict taken from this very model
        # holds them by reference, and the first name's copy overwrites them in place
        before = {n: getattr(module, n).detach().clone() for n in ("alpha", "delta")}
        _LOADING[module] = (error_msgs, prefix, {n: v.detach().clone() for n, v in values.items()}, before)
        return
    first_prefix, first, before = seen[1], seen[2], seen[3]
    for name, value in values.items():
        if _aliases(value, getattr(module, name)):
            value = before[name]
        other = first.setdefault(name, value)
        if not _same_values(other, value):
            raise ValueError(f"load_state_dict: '{first_prefix}{name}' and '{prefix}{name}' are one DynOPool2d "
                             f"parameter (a layer shared between sites) but hold different values "
                             f"({_shown(other)} and {_shown(value)}); make them equal")


def _aliases(a, b) -> bool:
    try:
        return a.data_ptr() == b.data_ptr() and a.data_ptr() != 0
    except RuntimeError:  # a tensor without storage (a DTensor): no alias of a local tensor
        return False


def _same_values(a, b) -> bool:
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 - DTensor (FSDP2)
    a, b = full(a), full(b)
    return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())


def _shown(t) -> list:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return [round(v, 6) for v in t.detach().float().cpu().reshape(-1).tolist()]


GRAD_LIMIT = 0.5  # the most a call adds to alpha's or delta's gradient, per value (grad_scale="mean")


class _MeanGradient(torch.autograd.Function):
    """The value as it is; the gradient times k (1 / the outputs per sample), clipped to
    +-GRAD_LIMIT."""

    @staticmethod
    def forward(t: Tensor, k: float) -> Tensor:
        return t.clone()  # not a view: the projection writes alpha in place before the next call

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.k = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad * ctx.k).clamp(-GRAD_LIMIT, GRAD_LIMIT), None


def _rule(b: float, axis: str) -> str:
    if b == 0:
        return f"floor({axis} / alpha)"
    return f"floor({axis} / alpha {'+' if b > 0 else '-'} {abs(b):g})"


def _read_values(layers) -> list[list[float]]:
    """Every layer's (alpha_h, alpha_w, delta_h, delta_w), in one device-to-host copy. Parameters
    that are DTensors (FSDP2's shards) are made full first, in one collective for all of them
    (``_full_values``); on every rank the same values, so every rank plans the same sizes."""
    flat = torch.cat(_full_values([t.detach() for m in layers for t in (m.alpha, m.delta)])).tolist()
    return [flat[4 * i: 4 * i + 4] for i in range(len(layers))]


def _distributed_tensor():
    """``torch.distributed.tensor`` where something has loaded it (no DTensor exists before):
    importing it here would cost every user ~0.5 s."""
    return sys.modules.get("torch.distributed.tensor")


def _full_values(tensors: list[Tensor]) -> list[Tensor]:
    """The (2,)-element parameters as plain (2,) tensors. A DTensor's value is spread over the
    ranks (FSDP2 shards dim 0: one element each on 2 ranks, an empty shard on a third): the
    DTensors on one mesh with the same placements are stacked as one (2, n) DTensor, and one
    ``full_tensor()`` gathers them all (FSDP2 gives every such parameter the same placements:
    one collective per read, whatever the number of layers; none for replicated ones). Every
    rank reads the same layers in the same order (the model's pre-hook runs on each), so the
    collectives pair up."""
    dt = _distributed_tensor()
    if dt is None:  # nothing can be a DTensor
        return [t.reshape(2) for t in tensors]
    out, groups = [], {}
    for i, t in enumerate(tensors):
        out.append(t if isinstance(t, dt.DTensor) else t.reshape(2))
        if isinstance(t, dt.DTensor):
            # any other placement (a strided shard) is gathered on its own
            stackable = all(type(p) is dt.Replicate or (type(p) is dt.Shard and p.dim == 0) for p in t.placements)
            groups.setdefault((t.device_mesh, t.placements) if stackable else i, []).append(i)
    for key, idx in groups.items():
        if not isinstance(key, tuple):
            out[key] = tensors[key].full_tensor()
            continue
        local = torch.stack([tensors[i].to_local().reshape(-1) for i in idx], dim=1)
        full = dt.DTensor.from_local(local, *key, run_check=False, shape=(2, len(idx)), stride=(len(idx), 1))
        full = full.full_tensor()
        for j, i in enumerate(idx):
            out[i] = full[:, j]
    return out


def _stored_parameters(model: nn.Module) -> dict:
    """(id(module), name) -> the parameter FSDP2 keeps for it, for each parameter that
    ``fully_shard`` manages in ``model``. While a module is unsharded (its forward; the root from
    its forward to its backward) it registers a gathered copy, whose writes FSDP2 drops; the
    sharded DTensor is what the optimizer steps and the next all-gather reads. FSDP2 has no
    public way to it, hence its private names here, kept to this one place."""
    stored = {}
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)  # an FSDPModule
        if state is None:
            continue
        try:
            state = state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch before per-parameter meshes
                groups = [g for g in (state._fsdp_param_group,) if g is not None]
            for group in groups:
                for p in group.fsdp_params:
                    info = p._module_info
                    for owner, name in ((info.module, info.param_name),
                                        *zip(info.shared_modules, info.shared_param_names)):
                        stored[(id(owner), name)] = p.sharded_param
        except AttributeError as e:
            raise RuntimeError(f"DynOPool2d: this torch ({torch.__version__}) keeps FSDP2's sharded parameters "
                               "where dynopool does not look for them, so it cannot project alpha and delta "
                               "onto their valid range") from e
    return stored


def _project_stored(model: nn.Module, layers) -> None:
    """Project these layers' parameters onto their ranges where they are stored: under FSDP2
    the sharded DTensors the optimizer steps (each rank clamps its own shard or replica, no
    collective), which a layer's own projection cannot reach while it runs on a gathered copy."""
    if not layers:
        return
    stored = _stored_parameters(model)
    dt = _distributed_tensor()
    with torch.no_grad():
        for m in layers:
            for name, bounds in (("alpha", m.alpha_range), ("delta", m.delta_range)):
                p = stored.get((id(m), name), getattr(m, name))
                (p.to_local() if dt is not None and isinstance(p, dt.DTensor) else p).clamp_(*bounds)


@_disabled_for_graphs  # the one host read per model forward: a graph break at the model's start
def plan_sizes(model: nn.Module) -> None:
    """Read every DynOPool2d's alpha and delta in ``model`` in one copy and plan each layer's
    output size for an input of the size it saw last. A layer without a plan for its input
    size (the first forward, a new resolution) reads its own values when it runs. A plan holds
    until it is replaced or dropped: ``read_sizes_once`` makes one per forward and drops it at
    the end; called by hand (to freeze the sizes for a CUDA graph), call it again when alpha
    has moved, or the layers keep the sizes it planned.

    Under FSDP2 (DTensor parameters) every rank must call it, as the hook does: the read
    gathers the shards (one collective), and values out of range are projected where FSDP2
    stores them."""
    _plan_sizes(model, compiling=False)


@_disabled_for_graphs
def _plan_sizes(model: nn.Module, compiling: bool, args=()) -> None:
    layers = [m for m in model.modules() if isinstance(m, DynOPool2d)]
    if not layers:
        return
    values = _read_values(layers)
    _project_stored(model, [m for m, v in zip(layers, values) if m._project(v) != (v[:2], v[2:])])
    plans = [m._make_plan(m._last_input, v) if m._last_input is not None else None for m, v in zip(layers, values)]
    if compiling:
        plans = _compiled_plans(model, layers, values, plans, args)
    for m, plan in zip(layers, plans):
        # a plan that says "project" still has each layer project what it registers when it
        # runs: under FSDP2 a copy gathered before _project_stored (the root's), or after it
        m._plan = plan


# ---- the planned sizes under torch.compile
# A plan's sizes are Python ints: compiled code that read them would specialize on each (a
# recompile per size, until Dynamo's limit). plan_sizes also gives each plan an empty tensor of
# shape (0, H, W, h_out, w_out), its sizes marked dynamic: the compiled forward compares and
# uses those dims, which Dynamo traces as symbols (guards relate them: the layer's input is
# the planned one), so one graph serves every size. (Outside compile the ints are used.)

def _compiled_plans(model: nn.Module, layers, values, plans, args) -> list:
    """The plans a compiled forward takes: one for every layer, with its sizes as symbols, so
    that the compiled code never breaks its graph to read a layer's own values (a break inside
    a loop, as nn.Sequential's, makes Dynamo run the whole loop eagerly from then on). A
    layer's input size follows from the sizes upstream: at the first forward, or when some
    layer's output size has changed since the last one, the layers' input sizes are found by
    running the model eagerly on one sample of the batch first (eval mode, no grad: one
    sample's forward where the sizes change, none otherwise). Without FSDP2 the projection has
    written the values in range where the layers read them: no plan needs the layer's own
    projection (an in-place write inside the graph)."""
    outputs = [None if p is None else p[1] for p in plans]
    if (any(p is None for p in plans) or outputs != getattr(model, "_dynopool_planned_outputs", None)) \
            and args and isinstance(args[0], Tensor):
        probe.run(model, args[0][:1])
        plans = [m._make_plan(m._last_input, v) if m._last_input is not None else None for m, v in zip(layers, values)]
        outputs = [None if p is None else p[1] for p in plans]
    model._dynopool_planned_outputs = outputs
    sharded = _distributed_tensor() is not None and bool(_stored_parameters(model))
    return [None if p is None else _with_symbols(p if sharded else (p[0], p[1], False), m.alpha.device)
            for m, p in zip(layers, plans)]


def _with_symbols(plan: tuple, device) -> tuple:
    (h, w), (h_out, w_out) = plan[0], plan[1]
    sizes = torch.empty((0, h, w, h_out, w_out), device=device)
    _compat.mark_dynamic_sizes(sizes, [1, 2, 3, 4])
    return plan + (sizes,)


def _fits(plan: tuple, hw) -> bool:
    """The plan is for an input of size hw (as symbols where the plan has them)."""
    planned = plan[3].shape[1:3] if len(plan) > 3 else plan[0]
    return planned[0] == hw[0] and planned[1] == hw[1]


def _traced_plan(plan: tuple) -> tuple:
    if len(plan) <= 3:
        return plan
    sizes = plan[3].shape
    return (sizes[1], sizes[2]), (sizes[3], sizes[4]), plan[2], plan[3]


# Module-level functions, not closures: a model with these hooks pickles (torch.save(model)).
def _plan_hook(module: nn.Module, args) -> None:
    refuse_static_graph()  # before the host read, which would fail less clearly
    _plan_sizes(module, torch.compiler.is_compiling(), args)


def _drop_plans_hook(module: nn.Module, args, output) -> None:
    for m in module.modules():
        if isinstance(m, DynOPool2d):
            m._plan = None


def read_sizes_once(model: nn.Module) -> None:
    """Install ``plan_sizes`` as a forward pre-hook of ``model`` (once): every forward of the
    model then reads all its DynOPool2d layers' parameters in one device-to-host copy, at its
    start, instead of one per layer; the plans are dropped when the forward ends (the
    parameters move with the next optimizer step). ``replace_pooling`` calls this;
    ``remove_read_sizes_once`` undoes it."""
    if _plan_hook in model._forward_pre_hooks.values():
        return
    model._dynopool_plan_hooks = (model.register_forward_pre_hook(_plan_hook),
                                  model.register_forward_hook(_drop_plans_hook, always_call=True))
    small_maps.install(model)  # a map too small for a later layer: an error naming the DynOPool2d


def remove_read_sizes_once(model: nn.Module) -> None:
    """Remove ``read_sizes_once``'s hooks from ``model`` and every module in it."""
    for m in model.modules():
        for hooks, fn in ((m._forward_pre_hooks, _plan_hook), (m._forward_hooks, _drop_plans_hook)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)
        m.__dict__.pop("_dynopool_plan_hooks", None)
    small_maps.remove(model)


def output_sizes(layers, input_sizes) -> list[tuple[int, int]]:
    """Each layer's output size for its (H, W) input size, from one read of all their values."""
    if not layers:
        return []
    return [m._make_plan(hw, values)[1] for m, hw, values in zip(layers, input_sizes, _read_values(layers))]


def _pair(v, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.repeat(2)
    if t.numel() != 2:
        raise ValueError(f"{name} must be a number or a pair (h, w), got {v!r}")
    return t.clone()


def _offsets(v) -> tuple[float, float] | None:
    if v is None:
        return None
    t = _pair(v, "size_offset").tolist()
    if not all(math.isfinite(b) for b in t):
        raise ValueError(f"size_offset must be finite, got {v!r}")
    return t[0], t[1]


def _bounds(v, name: str, positive: bool = False) -> tuple[float, float]:
    """(lo, hi) as the fp32 values the parameters are clamped to on the device."""
    lo, hi = (float(torch.tensor(float(b), dtype=torch.float32)) for b in v)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (lo > 0 or not positive)):
        raise ValueError(f"{name} must be finite (lo, hi) with lo <= hi{' and lo > 0' if positive else ''}, got {v!r}")
    return lo, hi
