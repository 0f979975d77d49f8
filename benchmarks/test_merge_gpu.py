"""GPU cases of the in-memory merge (skipped without CUDA): the Triton kernels against the
authors' loop and torch._foreach_*, with the issue's targets as assertions. The measurement is
benchmarks/gpu_merge.py's (which also writes the JSON record); run it alone with
`python benchmarks/gpu_merge.py`, or everything with `bash benchmarks/gpu_check.sh`."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("model", ["ViT-L-14", "ViT-bigG-14"])
def test_merge_kernels_targets(benchmark, model, tmp_path):
    pytest.importorskip("open_clip")
    from . import gpu_merge

    record = benchmark.pedantic(lambda: gpu_merge.run([model], tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(record)
    for case in record["cases"]:
        ms, gbps = case["ms"], case["gbps"]["triton"]
        assert ms["triton"] * 3 <= ms["loop"], case
        assert ms["triton"] <= ms["foreach"], case
        assert gbps >= 0.8 * record["copy_gbps"], f"{case['name']} {case['dtype']}: {gbps:.0f} GB/s"
