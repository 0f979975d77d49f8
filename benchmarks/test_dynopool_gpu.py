"""GPU cases of DynOPool fwd+bwd (skipped without CUDA): the Triton kernels against the
reference path and F.max_pool2d at ResNet-50 shapes, with the issue's targets as assertions.
The measurement is benchmarks/gpu_dynopool.py's (which also writes the JSON record)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_dynopool_kernels_targets(benchmark, tmp_path):
    from . import gpu_dynopool

    record = benchmark.pedantic(lambda: gpu_dynopool.run(tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(record)
    for case in record["cases"]:
        ms, peak = case["ms"], case["peak_mb"]
        assert ms["triton"] * 5 <= ms["reference"], case
        assert ms["triton"] <= 2 * ms["max_pool2d"], case
        assert peak["triton"] <= peak["reference"], case
