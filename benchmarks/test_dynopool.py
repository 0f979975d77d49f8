"""DynOPool's CPU path (the reference), forward + backward, against F.max_pool2d on the same
input in the same run. Target (README): at most 4x max_pool2d's time on [32, 64, 56, 56] fp32,
alpha = (1.7, 2.3)."""
import statistics
import time

import torch
import torch.nn.functional as F

from dynopool import dynopool2d

from .conftest import figure, machine_record, save_record

SHAPE = (32, 64, 56, 56)
ROUNDS = 7


def fwd_bwd_seconds(fn, x) -> float:
    x.grad = None
    start = time.perf_counter()
    fn(x).sum().backward()
    return time.perf_counter() - start


def test_dynopool_fwd_bwd_vs_max_pool2d(benchmark):
    torch.manual_seed(0)
    x = torch.randn(SHAPE, requires_grad=True)
    alpha = torch.tensor([1.7, 2.3], requires_grad=True)
    delta = torch.tensor([0.25, 0.25], requires_grad=True)
    ours = lambda t: dynopool2d(t, alpha, delta)  # noqa: E731
    pool = lambda t: F.max_pool2d(t, 2)  # noqa: E731
    for fn in (ours, pool):
        fwd_bwd_seconds(fn, x)  # warm-up
    pooled = []

    def setup():
        pooled.append(fwd_bwd_seconds(pool, x))

    benchmark.pedantic(lambda: fwd_bwd_seconds(ours, x), setup=setup, rounds=ROUNDS, iterations=1)
    ours_s = benchmark.stats.stats.median
    pool_s = statistics.median(pooled)
    record = {"suite": "dynopool_cpu", **machine_record(), "shape": list(SHAPE), "alpha": [1.7, 2.3],
              "seconds": {"dynopool": ours_s, "max_pool2d": pool_s}, "ratio": ours_s / pool_s}
    benchmark.extra_info.update(record)
    save_record(f"cpu-dynopool-{record['date']}.json", record)
    figure("DynOPool CPU [32,64,56,56]", "fwd+bwd / max_pool2d (medians)", record["ratio"], "x", "<= 4x")
