"""GPU cases of the in-memory merge (skipped without CUDA): the Triton kernels against the
authors' loop and torch._foreach_*, reported beside the README's targets. The measurement is
benchmarks/gpu_merge.py's (which also writes the JSON record); run it alone with
`python benchmarks/gpu_merge.py`, or everything with `bash benchmarks/gpu_check.sh`."""
import pytest
import torch

from .conftest import figure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("model", ["ViT-L-14", "ViT-bigG-14"])
def test_merge_kernels(benchmark, model, tmp_path):
    pytest.importorskip("open_clip")
    from . import gpu_merge

    record = benchmark.pedantic(lambda: gpu_merge.run([model], tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(record)
    for case in record["cases"]:
        ms, name = case["ms"], f"{case['name']} {case['dtype']}"
        figure(name, "Triton merge", ms["triton"], "ms")
        figure(name, "GB/s / device copy", case["gbps"]["triton"] / record["copy_gbps"], "x", ">= 0.8x")
        figure(name, "loop / Triton", ms["loop"] / ms["triton"], "x", ">= 3x")
        figure(name, "foreach / Triton", ms["foreach"] / ms["triton"], "x", ">= 1x")
