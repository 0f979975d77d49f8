"""GPU cases of DynOPool fwd+bwd (skipped without CUDA): the Triton kernels against the
reference path and F.max_pool2d at ResNet-50 shapes, reported beside the README's targets.
The measurement is benchmarks/gpu_dynopool.py's (which also writes the JSON record)."""
import pytest
import torch

from .conftest import figure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_dynopool_kernels(benchmark, tmp_path):
    from . import gpu_dynopool

    record = benchmark.pedantic(lambda: gpu_dynopool.run(tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(record)
    for case in record["cases"]:
        ms, peak = case["ms"], case["peak_mb"]
        name = f"{case['name']} {case['dtype']} {case['layout']}"
        figure(name, "Triton / max_pool2d", ms["triton"] / ms["max_pool2d"], "x", "<= 2x")
        figure(name, "reference / Triton", ms["reference"] / ms["triton"], "x", ">= 5x")
        figure(name, "peak MB Triton / reference", peak["triton"] / peak["reference"], "x", "<= 1x")
