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

``--net resnet18`` (or ``mobilenet_v2``, any torchvision classifier): the recipe on that
network after ``replace_pooling`` (pool first), on the digits upsampled to ``--size`` px with
the grey channel repeated, over the budgets 0.5x, 0.6x, 0.7x of the original's MACs; one
seed, ``--steps`` steps of ``--batch`` images. Writes a record to
``benchmarks/results/cpu-dynopool-budget-<net>-<size>-<date>.json`` (the final MACs / budget,
every DynOPool's alpha and output size, the smallest conv map, seconds):

    .venv/bin/python benchmarks/dynopool_budget.py --net resnet18 --size 128 --steps 150
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import time
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


def run_net(data, net: str, size: int, ratio: float, steps: int, batch: int, seed: int = 0) -> dict:
    """The README's recipe on a torchvision network after pool-first surgery."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, net)(weights=None, num_classes=10)
    shape = (1, 3, size, size)
    report = replace_pooling(model, shape)
    budget = ratio * report.macs_original
    weights, pools = dynopool.split_parameters(model)
    opt = torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=1e-4)
    pool_opt = torch.optim.Adam(pools, lr=0.01, betas=(0.0, 0.999))
    cost = ComputeCostLoss(model, shape, budget=budget, weight=10.0, floor=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    start, trail = time.perf_counter(), []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data.train_x), (batch,), generator=g)
        x = F.interpolate(data.train_x[idx], size=(size, size), mode="bilinear").expand(-1, 3, -1, -1)
        loss = F.cross_entropy(model(x), data.train_y[idx]) + cost()
        opt.zero_grad()
        pool_opt.zero_grad()
        loss.backward()
        opt.step()
        pool_opt.step()
        if step % 10 == 9 or step == steps - 1:
            trail.append(round(float(cost.cost().detach()) / budget, 4))
            print(f"  step {step + 1}: {trail[-1]:.3f}x the budget, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    now = dynopool.sizes(model, shape)
    maps = []
    probe.run(model, torch.zeros(shape), [m.register_forward_hook(lambda m, i, o: maps.append(min(o.shape[-2:])))
                                          for m in model.modules() if isinstance(m, nn.Conv2d)])
    pools_now = list(dict.fromkeys((n, tuple(round(a, 3) for a in mod.alpha.tolist()), i, o)
                                   for n, mod, i, o in now["calls"]))
    return {"net": net, "size": size, "budget_ratio": ratio, "steps": steps, "batch": batch, "seed": seed,
            "macs_original": report.macs_original, "macs_at_init": report.macs_at_init,
            "final_over_budget": round(now["macs"] / budget, 4), "final_over_original": round(now["macs"] /
                                                                                          report.macs_original, 4),
            "within_10_percent": abs(now["macs"] / budget - 1) <= 0.1, "smallest_conv_map": min(maps),
            "cost_over_budget_every_10_steps": trail, "pools": [
                {"name": n, "alpha": a, "input": i, "output": o} for n, a, i, o in pools_now],
            "seconds": round(seconds, 1)}


def main_net(args) -> None:
    data = L.load_data()
    torch.set_num_threads(args.threads)
    results = []
    out = ROOT / "benchmarks" / "results" / \
        f"cpu-dynopool-budget-{args.net}-{args.size}-{datetime.date.today().isoformat()}.json"
    for ratio in args.budgets:
        r = run_net(data, args.net, args.size, ratio, args.steps, args.batch)
        results.append(r)
        print(f"{args.net} {args.size} px budget {ratio}x: {r['final_over_budget']:.3f}x the budget "
              f"({r['final_over_original']:.3f}x the original), smallest conv map {r['smallest_conv_map']}, "
              f"{r['seconds']:.0f} s", flush=True)
        record = {"benchmark": "dynopool_budget", "machine": f"{platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads, shared CPU", "torch": torch.__version__,
                  "recipe": "SGD(lr 0.05, momentum 0.9, wd 1e-4) + Adam(pools, lr 0.01, betas (0, 0.999)), "
                            "ComputeCostLoss(weight 10, floor 0.9, min_size 2)", "results": results}
        out.write_text(json.dumps(record, indent=1) + "\n")  # after each budget: a long run keeps what it has
    print(f"wrote {out.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", help="a torchvision classifier (resnet18, mobilenet_v2, ...); "
                                      "without it, make demo's CNN")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    args = parser.parse_args()
    if args.net:
        main_net(args)
        return
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
