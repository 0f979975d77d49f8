"""DynOPool's CPU path (``dynopool/torch_pool.py``), forward + backward, against F.max_pool2d
on the same input in the same run, in NCHW and channels_last; and a surgered ResNet-18's
training step against the original's.

Targets (README, docs/benchmarks.md): the op at most 3x max_pool2d's time in both layouts on [32, 64, 56, 56]
fp32, alpha = (1.7, 2.3); channels_last at most 2x the NCHW path's time. Every figure is a
ratio of medians over rounds that alternate between the things compared, so a machine's load
(the CPUs here are shared) slows both sides alike."""
import statistics
import time

import torch
import torch.nn.functional as F

from dynopool import dynopool2d

from .conftest import figure, machine_record, save_record

SHAPE = (32, 64, 56, 56)
ROUNDS = 7


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, rounds: int) -> dict:
    """Median seconds of each fn, run in turn round after round (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def fwd_bwd(op, x):
    def run():
        x.grad = None
        op(x).sum().backward()
    return run


def write(record: dict) -> None:
    save_record(f"cpu-{record['suite']}-{record['date']}.json", record)


def test_dynopool_fwd_bwd_vs_max_pool2d_in_both_layouts(benchmark):
    torch.manual_seed(0)
    alpha = torch.tensor([1.7, 2.3], requires_grad=True)
    delta = torch.tensor([0.25, 0.25], requires_grad=True)
    base = torch.randn(SHAPE)
    fns = {}
    for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x = base.contiguous(memory_format=fmt).requires_grad_()
        fns[f"dynopool_{layout}"] = fwd_bwd(lambda t: dynopool2d(t, alpha, delta), x)
        fns[f"max_pool2d_{layout}"] = fwd_bwd(lambda t: F.max_pool2d(t, 2), x)
    med = benchmark.pedantic(alternate, args=(fns, ROUNDS), rounds=1, iterations=1)
    ratios = {"nchw": med["dynopool_nchw"] / med["max_pool2d_nchw"],
              "channels_last": med["dynopool_channels_last"] / med["max_pool2d_channels_last"],
              "channels_last_vs_nchw": med["dynopool_channels_last"] / med["dynopool_nchw"]}
    record = {"suite": "dynopool", **machine_record(), "shape": list(SHAPE), "alpha": [1.7, 2.3],
              "rounds": ROUNDS, "seconds": med, "ratio": ratios}
    benchmark.extra_info.update(record)
    write(record)
    case = "DynOPool CPU [32,64,56,56]"
    figure(case, "fwd+bwd / max_pool2d, NCHW", ratios["nchw"], "x", "<= 3x")
    figure(case, "fwd+bwd / max_pool2d, channels_last", ratios["channels_last"], "x", "<= 3x")
    figure(case, "channels_last / NCHW", ratios["channels_last_vs_nchw"], "x", "<= 2x")


def test_surgered_resnet18_train_step_vs_original(benchmark):
    import copy

    import torchvision

    from dynopool import replace_pooling

    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10)
    surgered = copy.deepcopy(original)
    report = replace_pooling(surgered, (1, 3, 112, 112))
    x, y = torch.randn(16, 3, 112, 112), torch.randint(0, 10, (16,))
    fns = {}
    for name, model in (("original", original), ("surgered", surgered)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, opt=opt):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        fns[name] = step
    med = benchmark.pedantic(alternate, args=(fns, 5), rounds=1, iterations=1)
    record = {"suite": "dynopool-resnet18-step", **machine_record(), "input": [16, 3, 112, 112],
              "sites": len(report), "macs_at_init_vs_original": report.macs_at_init / report.macs_original,
              "seconds": med, "ratio": med["surgered"] / med["original"]}
    benchmark.extra_info.update(record)
    write(record)
    figure("ResNet-18 step, b16 112 px", "surgered / original", record["ratio"], "x")
