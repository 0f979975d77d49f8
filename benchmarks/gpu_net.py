"""A network's training step with DynOPool, on the GPU: torchvision ResNet-50 after
``replace_pooling`` (every stride-2 conv at stride 1 + a DynOPool, shared in the residual
blocks), batch 128, 224 px, bf16 autocast, channels_last, forward + backward + SGD step:

    dynopool     DynOPool on the Triton kernels (sizes read once per forward, as installed)
    reference    DynOPool on the reference path
    maxpool      nn.MaxPool2d(2) in each DynOPool's place: the same topology, the same sizes
    torchvision  the original network (stride-2 convs)

eager and torch.compile (the reference is left out of the compiled cases: it is one graph
break per layer by design). The pooling parameters get a learning rate of 0 so the sizes, and
so the work, stay those of max pooling; their gradients are computed as in training.

    python benchmarks/gpu_net.py [--out benchmarks/results] [--batch 128] [--size 224]

Writes {"suite": "dynopool_net", "device", "torch", "triton", "date", "cases": [{"name":
"resnet50-b128-224-bf16-cl-eager", "ms": {"dynopool": m, "maxpool": m, "reference": m,
"torchvision": m}, "vs_maxpool": m_dynopool / m_maxpool}, ...]}: median ms per step after
warm-up (CUDA-synchronised wall time of the whole step: host and device).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu_record  # noqa: E402
from dynopool import DynOPool2d, replace_pooling  # noqa: E402

VARIANTS = ("dynopool", "maxpool", "torchvision", "reference")


def build(variant: str, arch: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    if variant != "torchvision":
        replace_pooling(model)
    if variant == "maxpool":  # no DynOPool left: no size read at the start of each forward
        for hook in model._dynopool_plan_hooks:
            hook.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DynOPool2d):
                if variant == "maxpool":
                    setattr(parent, name, nn.MaxPool2d(2))
                else:
                    child.backend = "torch" if variant == "reference" else "auto"
    return model.to(device, memory_format=torch.channels_last)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    pool = [p for n, p in model.named_parameters() if n.endswith(("alpha", "delta"))]
    rest = [p for n, p in model.named_parameters() if not n.endswith(("alpha", "delta"))]
    groups = [{"params": rest}] + ([{"params": pool, "lr": 0.0}] if pool else [])
    return torch.optim.SGD(groups, lr=0.01, momentum=0.9)


def step_fn(model, opt, x, y, dtype):
    def step():
        with torch.autocast(x.device.type, dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def median_ms(step, device, warmup: int, steps: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run(out_dir: Path, *, arch="resnet50", batch=128, size=224, dtype="bfloat16", device="cuda", warmup=5,
        steps=15, compile_modes=("eager", "compile"), variants=VARIANTS, tag="") -> dict:
    device = torch.device(device)
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=g, device=device)
    name = f"{arch}-b{batch}-{size}-{'bf16' if dt == torch.bfloat16 else dtype}-cl"
    ms = {mode: {} for mode in compile_modes}
    record = {**gpu_record.header("dynopool_net", device), "batch": batch, "size": size, "arch": arch,
              "warmup": warmup, "steps": steps, "cases": []}
    models = {v: build(v, arch, device) for v in variants}
    opts = {v: optimizer(m) for v, m in models.items()}
    # every eager case first, then the compiled ones (the most telling first: a run cut off by
    # its time limit keeps them); a compiled model starts with its sizes known from eager steps
    order = [(v, m) for m in compile_modes for v in variants if not (m == "compile" and v == "reference")]
    for variant, mode in order:
        started = time.perf_counter()
        target = torch.compile(models[variant]) if mode == "compile" else models[variant]
        ms[mode][variant] = median_ms(step_fn(target, opts[variant], x, y, dt), device, warmup, steps)
        print(json.dumps({"case": f"{name}-{mode}", "variant": variant, "ms": ms[mode][variant],
                          "seconds_incl_warmup": round(time.perf_counter() - started, 1)}), flush=True)
        record["cases"] = cases(name, ms)
        path = gpu_record.write(record, out_dir, tag)  # after each case: a cut-off run keeps its figures
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"final {path}")
    return record


def cases(name: str, ms: dict) -> list[dict]:
    out = []
    for mode, times in ms.items():
        case = {"name": f"{name}-{mode}", "ms": dict(times)}
        if "dynopool" in times and "maxpool" in times:
            case["vs_maxpool"] = times["dynopool"] / times["maxpool"]
        out.append(case)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    run(Path(args.out), arch=args.arch, batch=args.batch, size=args.size, steps=args.steps,
        compile_modes=tuple(args.modes), tag=args.tag, device=args.device)
