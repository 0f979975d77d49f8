"""torch.compile of a network with DynOPool layers whose alphas move: the output sizes change
every few steps, and the compiled code does not recompile per size (it used to, up to Dynamo's
limit of 8 per function, then ran eagerly). On the CPU's PyTorch path (not traced: one graph
break per layer) every compiled function compiles at most 3 times over 50 training steps that
see more sizes than that limit (aot_eager; inductor over 25); on the custom-op path (the
Triton kernels: CUDA, or the interpreter here) the forward after the size read is one graph,
compiled once for every size. The compiled training equals the eager one step for step. A
tiny network on small images, aot_eager where the compiler is not the point."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dynopool import DynOPool2d, read_sizes_once

STEPS, SIZE = 50, 16


def make_model(backend="auto"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DynOPool2d(1.3, 0.25, alpha_range=(1.0, 4.0), backend=backend),
                          nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          DynOPool2d(1.2, 0.25, alpha_range=(1.0, 4.0), backend=backend),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    read_sizes_once(model)
    return model


class CountingBackend:
    """A Dynamo backend that records the compile id (frame, its nth compile) of each graph and
    counts the graphs' runs."""

    def __init__(self, backend):
        self.backend, self.compiles, self.runs = backend, [], 0

    def __call__(self, gm, example_inputs):
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
        self.compiles.append((cid.frame_id, cid.frame_compile_id))
        inner = torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return inner(*args)

        return run


def train(model, forward, steps, device="cpu", counter=None, batch=2, size=SIZE):
    """``steps`` SGD steps of the weights on a fixed batch, calling ``forward`` (``model`` or its
    compiled form), each after the alphas are set to new values (moving alphas, as training
    moves them). Returns each step's input and output sizes at the DynOPool layers, the
    compiled graphs run per step (with a ``counter``), and the last output."""
    pools = [m for m in model.modules() if isinstance(m, DynOPool2d)]
    weights = [p for n, p in model.named_parameters() if not n.endswith(("alpha", "delta"))]
    opt = torch.optim.SGD(weights, lr=0.01)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, size, size, generator=g).to(device), torch.randint(0, 3, (batch,), generator=g).to(device)
    sizes, runs = [], []
    for step in range(steps):
        with torch.no_grad():
            for i, p in enumerate(pools):
                p.alpha.fill_(1.0 + (step * (0.13 + 0.05 * i)) % 2.5)
        before = counter.runs if counter is not None else 0
        out = forward(x)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
        sizes.append(tuple((p._last_input, p.output_size(*p._last_input)) for p in pools))
        runs.append((counter.runs if counter is not None else 0) - before)
    return sizes, runs, out


def check_compiles(counter, sizes):
    assert len(set(sizes)) > 8, "the sizes changed too rarely to test Dynamo's recompile limit"
    per_frame = {}
    for frame, nth in counter.compiles:
        per_frame[frame] = max(per_frame.get(frame, 0), nth)
    # at most 2 recompiles of any compiled function, whatever the number of sizes
    assert max(per_frame.values()) <= 2, counter.compiles


@pytest.mark.parametrize("dynamo_backend", ["aot_eager", "inductor"])
def test_compile_does_not_recompile_per_size(dynamo_backend):
    torch._dynamo.reset()
    steps = STEPS if dynamo_backend == "aot_eager" else 25  # inductor: enough sizes, less compile time
    model = make_model()
    eager = copy.deepcopy(model)
    counter = CountingBackend(dynamo_backend)
    sizes, _, out = train(model, torch.compile(model, backend=counter), steps, counter=counter)
    check_compiles(counter, sizes)
    # and it computes what the eager model does, step for step
    want_sizes, _, want = train(eager, eager, steps)
    assert sizes == want_sizes
    torch.testing.assert_close(out, want)


def test_compiled_custom_op_path_is_one_graph_for_every_size(device):
    # the Triton kernels' custom op (CUDA; the interpreter on the CPU, hence few small steps):
    # after the size read, each forward is one graph, the same one whatever the sizes
    torch._dynamo.reset()
    model = make_model(backend="triton").to(device)
    counter = CountingBackend("aot_eager")
    sizes, runs, out = train(model, torch.compile(model, backend=counter), 3, device, counter, batch=1, size=12)
    assert len(set(sizes)) == 3  # a new size at every step
    assert counter.compiles == [(counter.compiles[0][0], 0)], counter.compiles  # one compile, never again
    assert runs == [1, 1, 1], runs  # no graph break in a layer
