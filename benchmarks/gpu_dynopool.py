"""GPU benchmark of DynOPool forward + backward: the Triton kernels vs the reference path vs
F.max_pool2d(x, 2) on the same input, at ResNet-50's pooling shapes, batch 64 and 128, fp32
and bf16, channels_last and NCHW, alpha = (1.7, 2.3), delta = 0.25, alpha and delta learnable.
The output size is given, as DynOPool2d gives it inside a model (one read of all the layers'
alphas per forward): the call itself reads nothing to the host.

    python benchmarks/gpu_dynopool.py [--out benchmarks/results] [--dtypes float32 bfloat16]

Writes one JSON record per run: per case the median ms of fwd+bwd of each implementation
(triton.testing.do_bench after warm-up, L2 flushed between runs), the peak GPU memory each
allocates beyond its inputs, and the largest difference of the kernels' output and gradients
from the reference's in the same run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu_record  # noqa: E402
from dynopool import dynopool2d  # noqa: E402
from dynopool.reference import output_size  # noqa: E402

SHAPES = [(b, c, s, s) for b in (64, 128) for c, s in ((64, 112), (256, 56), (512, 28), (1024, 14))]
LAYOUTS = ("channels_last", "nchw")
ALPHA, DELTA = (1.7, 2.3), (0.25, 0.25)


def implementations(alpha, delta, size):
    return {
        "triton": lambda x: dynopool2d(x, alpha, delta, backend="triton", output_size=size),
        "reference": lambda x: dynopool2d(x, alpha, delta, backend="torch", output_size=size),
        "max_pool2d": lambda x: F.max_pool2d(x, 2),
    }


def fwd_bwd(fn, x, grad, params):
    def step():
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).backward(grad)
    return step


def peak_bytes(step, device) -> int | None:
    """GPU memory one fwd+bwd allocates beyond what is already allocated (inputs, grads)."""
    step()  # gradients exist: the measured step only replaces them
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def median_ms(step, device) -> float:
    if device.type == "cuda":
        return do_bench(step, warmup=10, rep=60, return_mode="median")
    times = []  # CPU (a smoke run of this script under the interpreter): a plain timer
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def run(out_dir: Path, dtypes=("float32", "bfloat16"), only=None, tag="", shapes=SHAPES, device="cuda",
        layouts=LAYOUTS) -> dict:
    device = torch.device(device)
    alpha = torch.tensor(ALPHA, device=device, requires_grad=True)
    delta = torch.tensor(DELTA, device=device, requires_grad=True)
    cases = []
    for shape, layout, dtype in ((s, lay, getattr(torch, d)) for s in shapes for lay in layouts for d in dtypes):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=device).to(dtype)
        x = x.contiguous(memory_format=fmt).requires_grad_()
        ms, peak, outs = {}, {}, {}
        size = (output_size(shape[2], ALPHA[0]), output_size(shape[3], ALPHA[1]))
        for key, fn in implementations(alpha, delta, size).items():
            if only and key not in only:
                continue
            with torch.no_grad():
                out_shape = fn(x).shape
            grad = torch.randn(out_shape, generator=g, device=device).to(dtype)
            grad = grad.contiguous(memory_format=fmt)
            step = fwd_bwd(fn, x, grad, (alpha, delta))
            peak[key] = peak_bytes(step, device)
            ms[key] = median_ms(step, device)
            if key in ("triton", "reference"):  # the gradients are the last timed step's
                outs[key] = (fn(x).detach().float(), x.grad.float(), alpha.grad.clone(), delta.grad.clone())
        case = {"name": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."),
                "layout": layout, "ms": ms,
                "peak_mb": {k: v / 2**20 for k, v in peak.items() if v is not None}}
        if "triton" in ms and "reference" in ms:
            case["x_reference"] = ms["reference"] / ms["triton"]
            case["vs_max_pool2d"] = ms["triton"] / ms["max_pool2d"] if "max_pool2d" in ms else None
            (o1, gx1, ga1, gd1), (o2, gx2, ga2, gd2) = outs["triton"], outs["reference"]
            case["max_abs_diff_vs_reference"] = {
                "out": float((o1 - o2).abs().max()), "grad_x": float((gx1 - gx2).abs().max()),
                "grad_alpha_rel": float(((ga1 - ga2).abs() / ga2.abs().clamp_min(1e-12)).max()),
                "grad_delta_rel": float(((gd1 - gd2).abs() / gd2.abs().clamp_min(1e-12)).max())}
        print(json.dumps(case), flush=True)
        cases.append(case)
        del x, outs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from msdp_kernels import dynopool as kdyn

    record = {**gpu_record.header("dynopool", device), "alpha": list(ALPHA), "delta": list(DELTA),
              "config": {"elems_per_program": kdyn._ELEMS, "num_warps": kdyn._NUM_WARPS}, "cases": cases}
    gpu_record.write(record, out_dir, tag)
    return record


if __name__ == "__main__":
    args = gpu_record.arg_parser(__doc__).parse_args()
    run(Path(args.out), args.dtypes, args.only, args.tag)
