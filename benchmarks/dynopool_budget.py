"""Where training to a cost budget ends: the README's recipe against the previous one, on make
demo's data and CNN (scikit-learn's digits, two 2x2 pools replaced), over budgets, input sizes
and seeds. Prints one line per case: the final MACs as a fraction of the budget per seed, and
the smallest feature map of any convolution. CPU, a few minutes:

    .venv/bin/python benchmarks/dynopool_budget.py

- recipe: SGD (lr 0.05, momentum 0.9, weight decay 1e-4) for the weights, the pooling
  parameters by ``torch.optim.Adam(lr=0.01, betas=(0.0, 0.999))``, ``ComputeCostLoss(...,
  weight=10, floor=0.9)`` (min_size 2, the default);
- previous: one SGD with ``param_groups`` (pooling parameters at 0.01x the rate), weight 1, no
  floor, no min_size (what the README said before).
300 steps of 64 images each; the digits upsampled bilinearly for 32 px.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import demo_lib as L  # noqa: E402

import dynopool  # noqa: E402
from dynopool import ComputeCostLoss, count_macs, probe, replace_pooling  # noqa: E402


def run(data, size: int, ratio: float, recipe: str, seed: int, steps: int = 300) -> tuple[float, int]:
    torch.manual_seed(seed)
    model = L.SmallCNN()
    shape = (1, 1, size, size)
    budget = ratio * replace_pooling(model, shape).macs_original
    weights, pools = dynopool.split_parameters(model)
    if recipe == "recipe":
        opts = [torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=1e-4),
                torch.optim.Adam(pools, lr=0.01, betas=(0.0, 0.999))]
        cost = ComputeCostLoss(model, shape, budget=budget, weight=10.0, floor=0.9)
    else:
        opts = [torch.optim.SGD(dynopool.param_groups(model, lr=0.05, weight_decay=1e-4), lr=0.05, momentum=0.9)]
        cost = ComputeCostLoss(model, shape, budget=budget, weight=1.0, min_size=0)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_x), (64,), generator=g)
        x = data.train_x[idx] if size == L.SIZE else F.interpolate(data.train_x[idx], size=(size, size), mode="bilinear")
        loss = F.cross_entropy(model(x), data.train_y[idx]) + cost()
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    maps = []
    probe.run(model, torch.zeros(shape), [m.register_forward_hook(lambda m, i, o: maps.append(min(o.shape[-2:])))
                                          for m in model.modules() if isinstance(m, nn.Conv2d)])
    return int(count_macs(model, shape)) / budget, min(maps)


def main() -> None:
    data = L.load_data()
    print(f"torch {torch.__version__}; 300 steps; final MACs / budget for seeds 0, 1, 2; smallest conv map")
    for recipe, size, ratio in itertools.product(("recipe", "previous"), (16, 32), (0.5, 0.6, 0.7)):
        results = [run(data, size, ratio, recipe, seed) for seed in range(3)]
        ends = ", ".join(f"{r:.3f}" for r, _ in results)
        inside = sum(abs(r - 1) <= 0.1 for r, _ in results)
        print(f"{recipe:8s} {size} px budget {ratio}x: {ends}  within 10%: {inside}/3  smallest map: "
              f"{min(m for _, m in results)}", flush=True)


if __name__ == "__main__":
    main()
