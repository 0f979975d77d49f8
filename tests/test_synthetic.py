"""The generated checkpoints behind the demo and the benchmarks."""
import math

import pytest
import torch
from safetensors.torch import load_file

from modelstock.synthetic import clip_shapes, write_synthetic


def test_clip_shapes_are_open_clips():
    open_clip = pytest.importorskip("open_clip")
    shapes = clip_shapes("ViT-B-32")
    model = open_clip.create_model("ViT-B-32", pretrained=None, device="meta")
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == 151_277_313


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_synthetic_checkpoints(tmp_path, dtype):
    shapes = {"visual.proj": (64, 32), "ln_final.weight": (32,), "ln_final.bias": (32,), "logit_scale": ()}
    paths = write_synthetic(tmp_path, shapes, 3, dtype=dtype, scale=1e-2)
    assert [p.name for p in paths] == ["base.safetensors", "ft1.safetensors", "ft2.safetensors", "ft3.safetensors"]
    sds = [load_file(p) for p in paths]
    for sd in sds:
        assert {k: tuple(v.shape) for k, v in sd.items()} == shapes and all(v.dtype == dtype for v in sd.values())
    base = sds[0]
    assert torch.equal(base["ln_final.bias"], torch.zeros(32, dtype=dtype))
    assert torch.equal(base["ln_final.weight"], torch.ones(32, dtype=dtype))
    # The updates share a direction: pairwise cos in (0, 1), far from 0 for a 2048-element matrix.
    d = [(sd["visual.proj"].double() - base["visual.proj"].double()).flatten() for sd in sds[1:]]
    cos = [float(d[i] @ d[j] / (d[i].norm() * d[j].norm())) for i in range(3) for j in range(i + 1, 3)]
    assert all(0.05 < c < 0.95 for c in cos), cos
