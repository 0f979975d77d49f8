"""Checkpoints shaped like real models, for demos, tests and benchmarks (nothing is downloaded).

The architecture is open_clip's (built on the meta device, so only names and shapes are
taken); the weights are random with open_clip-like statistics: zero biases, unit LayerNorm
scales, small Gaussian matrices. Each fine-tuned model is ``w0 + scale * (sqrt(c) u +
sqrt(1 - c) v_i)`` with one direction ``u`` shared by all models and one ``v_i`` of their own,
so the updates of a tensor meet at cos ~ c, drawn per tensor (as real fine-tuning runs do).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .extras import require


def clip_shapes(model_name: str = "ViT-B-32") -> dict[str, tuple[int, ...]]:
    """Names and shapes of an open_clip model's state dict, without allocating its weights."""
    open_clip = require("open_clip", "open_clip-shaped checkpoints")

    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and ("ln" in name or "norm" in name):
        return torch.ones(shape)
    if len(shape) == 0:  # logit_scale
        return torch.tensor(4.6052)
    return torch.randn(shape, generator=g) * 0.02


def write_synthetic(
    out_dir: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    n: int = 2,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 1e-3,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write a base and ``n`` fine-tuned safetensors checkpoints into ``out_dir``, streamed one
    tensor at a time (memory stays small for any model size). Returns [base, ft1, ..., ftn]."""
    from .dtypes import dtype_name
    from .io import CheckpointWriter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names or ["base"] + [f"ft{i + 1}" for i in range(n)])
    paths = [out_dir / f"{name}.safetensors" for name in names]
    entries = [(k, dtype_name(dtype), s) for k, s in shapes.items()]
    g = torch.Generator().manual_seed(seed)
    writers = [CheckpointWriter(p, entries, {"format": "pt", "synthetic": "modelstock.synthetic"}) for p in paths]
    try:
        for name, shape in shapes.items():
            w0 = _base_tensor(name, shape, g)
            c = float(torch.empty(()).uniform_(0.1, 0.9, generator=g))
            shared = torch.randn(shape, generator=g)
            writers[0].write(name, w0.to(dtype))
            for w in writers[1:]:
                d = c ** 0.5 * shared + (1 - c) ** 0.5 * torch.randn(shape, generator=g)
                w.write(name, (w0 + scale * d).to(dtype))
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return paths
