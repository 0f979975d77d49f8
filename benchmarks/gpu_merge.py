"""GPU benchmark of the in-memory merge: Triton kernels vs the authors' per-tensor loop vs the
strongest torch._foreach_* code, on open_clip ViT-L-14 / ViT-bigG-14 shaped state dicts
(architectures built on the meta device, weights materialised on the GPU), fp32 and bf16, N = 2.

    python benchmarks/gpu_merge.py [--out benchmarks/results] [--models ViT-L-14 ViT-bigG-14]

Writes one JSON record per run: minimal bytes (inputs read twice, output written once), the
median ms of each implementation (triton.testing.do_bench after warm-up), and the
device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu_record  # noqa: E402
import modelstock  # noqa: E402
from modelstock.synthetic import clip_shapes  # noqa: E402

EPS = 1e-8


def materialise(shapes, n, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    base, fts = {}, [{} for _ in range(n)]
    for k, s in shapes.items():
        w0 = torch.randn(s, generator=g, device=device, dtype=torch.float32) * 0.02
        shared = torch.randn(s, generator=g, device=device, dtype=torch.float32)
        base[k] = w0.to(dtype)
        for ft in fts:
            own = torch.randn(s, generator=g, device=device, dtype=torch.float32)
            ft[k] = (w0 + 1e-3 * (0.7 * shared + 0.7 * own)).to(dtype)
        del w0, shared
    return base, fts


def loop_merge(base, fts):
    """The authors' per-tensor code (naver-ai/model-stock), written as a user would."""
    out = {}
    n = len(fts)
    for k, w0 in base.items():
        w0f = w0.float()
        ds = [(ft[k].float() - w0f).flatten() for ft in fts]
        cos = [torch.dot(ds[i], ds[j]) / (ds[i].norm() * ds[j].norm() + EPS) for i in range(n) for j in range(i + 1, n)]
        c = torch.stack(cos).mean().clamp(0, 1)
        t = n * c / (1 + (n - 1) * c)
        avg = sum(ft[k].float() for ft in fts) / n
        out[k] = (t * avg + (1 - t) * w0f).to(w0.dtype)
    return out


def foreach_merge(base, fts):
    """N = 2 with torch._foreach_*: one kernel per op over all tensors; <d1, d2> from norms
    (|d1 + d2|^2 - |d1|^2 - |d2|^2) / 2, since there is no foreach dot product."""
    w0, w1, w2 = list(base.values()), list(fts[0].values()), list(fts[1].values())
    d1 = torch._foreach_sub(w1, w0)
    d2 = torch._foreach_sub(w2, w0)
    n1 = torch.stack(torch._foreach_norm(d1)).double()
    n2 = torch.stack(torch._foreach_norm(d2)).double()
    torch._foreach_add_(d1, d2)
    ns = torch.stack(torch._foreach_norm(d1)).double()
    cos = ((ns ** 2 - n1 ** 2 - n2 ** 2) / (2 * n1 * n2 + EPS)).clamp(0, 1)
    t = (2 * cos / (1 + cos)).float()
    torch._foreach_mul_(d1, list((t / 2).to(w0[0].dtype).unbind()))  # t * (mean - w0) = t/2 * (d1 + d2)
    return dict(zip(base, torch._foreach_add(w0, d1)))


def passes(merger, bytes_read: int, total_ms: float) -> dict:
    """Where the Triton merge's time goes: the Gram pass alone, the merge pass alone (each with
    its GB/s: inputs read once; plus the output written for the merge pass), and the rest (the
    ratio's small torch ops between them and the host's NaN check). Overwrites the outputs."""
    from msdp_kernels import merge as kmerge

    groups = merger._kernel.groups

    def gram():
        for g in groups:
            kmerge.gram(g.inputs, g.tiles, g.seg_tiles, g.n, g.aligned, g.partials)

    ratios = [torch.full((g.seg_tiles.shape[0],), 0.5, device=g.tiles.device) for g in groups]
    ok = torch.ones(1, dtype=torch.int32, device=groups[0].tiles.device) if groups else None

    def merge():
        for g, t in zip(groups, ratios):
            kmerge.merge(g.inputs, g.outputs, g.tiles, g.tile_seg, t, g.n, g.aligned, ok)

    gram_ms = do_bench(gram, warmup=50, rep=300, return_mode="median")
    merge_ms = do_bench(merge, warmup=50, rep=300, return_mode="median")
    written = bytes_read // 3
    return {"gram_ms": gram_ms, "gram_gbps": bytes_read / gram_ms / 1e6,
            "merge_ms": merge_ms, "merge_gbps": (bytes_read + written) / merge_ms / 1e6,
            "rest_ms": total_ms - gram_ms - merge_ms}


def copy_gbps(nbytes: int, device) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def run(models, out_dir: Path, dtypes=("float32", "bfloat16"), only=None, tag="") -> dict:
    device = torch.device("cuda")
    cases = []
    for name in models:
        shapes = clip_shapes(name)
        params = sum(math.prod(s) for s in shapes.values())
        for dtype in (getattr(torch, d) for d in dtypes):
            base, fts = materialise(shapes, 2, dtype, device)
            out = {k: torch.empty_like(v) for k, v in base.items()}
            bytes_min = params * dtype.itemsize * (2 * 3 + 1)
            merger = modelstock.InPlaceMerge([out], base, fts, backend="triton")  # planned once
            fns = {
                "triton": merger,
                "loop": lambda: loop_merge(base, fts),
                "foreach": lambda: foreach_merge(base, fts),
            }
            ms = {}
            for key, fn in fns.items():
                if only and key not in only:
                    continue
                fn()
                torch.cuda.synchronize()
                ms[key] = do_bench(fn, warmup=100, rep=500, return_mode="median")
                torch.cuda.empty_cache()
            # the timed kernels' result against the reference formula on the same tensors
            want = modelstock.merge(base, fts, backend="torch") if not only else out
            err = max(float((out[k].float() - want[k].float()).abs().max()) for k in base)
            case = {"name": name, "dtype": str(dtype).removeprefix("torch."), "params": params, "bytes": bytes_min,
                    "ms": ms, "gbps": {k: bytes_min / v / 1e6 for k, v in ms.items()}, "max_abs_diff_vs_torch": err}
            if "triton" in ms:
                case["passes"] = passes(merger, params * dtype.itemsize * 3, ms["triton"])
            print(json.dumps(case), flush=True)
            cases.append(case)
            del base, fts, out, want, merger, fns
            torch.cuda.empty_cache()
    from msdp_kernels import merge as kmerge

    record = {**gpu_record.header("merge", device),
              "config": {"MODELSTOCK_MERGE_ELEMS": kmerge._CHUNK_ELEMS, "num_warps": kmerge._NUM_WARPS,
                         "pipeline": {f"{k}B": f"{c}x{st}" for k, (c, st) in kmerge._PIPELINE.items()}},
              "copy_gbps": copy_gbps(4 << 30, device), "cases": cases}
    gpu_record.write(record, out_dir, tag)
    return record


if __name__ == "__main__":
    ap = gpu_record.arg_parser(__doc__)
    ap.add_argument("--models", nargs="+", default=["ViT-L-14", "ViT-bigG-14"])
    args = ap.parse_args()
    run(args.models, Path(args.out), args.dtypes, args.only, args.tag)
