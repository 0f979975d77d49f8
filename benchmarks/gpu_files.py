"""File-to-file merge on a GPU machine: ``merge_files(device="cuda")`` and the CPU merge, as GB/s
of checkpoint read, beside a plain sequential read of the same files measured in the same run.

    python benchmarks/gpu_files.py [--out benchmarks/results] [--models ViT-L-14] [--tmp /tmp/mfiles]

Synthetic open_clip-shaped checkpoints (base + 2 fine-tuned, fp32) are written to --tmp. Each
measurement runs twice: with the page cache cold (files fsynced, then dropped from the cache
with posix_fadvise(DONTNEED): the disk's speed, no root needed) and warm (the files just read).
Writes one JSON record: {"suite": "merge_files", "cases": [{"name", "dtype", "cache",
"bytes_read", "seconds": {"plain_read", "cpu", "cuda"}, "gbps": {...}}]}.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu_record  # noqa: E402
import modelstock  # noqa: E402
from modelstock.synthetic import clip_shapes, write_synthetic  # noqa: E402


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read_seconds(paths, block: int = 64 << 20) -> float:
    """Every byte of ``paths``, read in order into one reused buffer: the disk's (or the page
    cache's) sequential speed for this process."""
    buf = memoryview(np.empty(block, dtype=np.uint8))
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - start


def run(models: dict[str, dict], out_dir: Path, tmp: Path, device: str = "cuda", chunk_size="256MiB") -> dict:
    cases = []
    for name, shapes in models.items():
        folder = tmp / name
        paths = [str(p) for p in write_synthetic(folder, shapes, 2, dtype=torch.float32)]
        out = folder / "merged.safetensors"
        bytes_read = sum(os.path.getsize(p) for p in paths)
        merges = {
            "cpu": lambda: modelstock.merge_files(paths[0], paths[1:], out, force=True),
            "cuda": lambda: modelstock.merge_files(paths[0], paths[1:], out, force=True, device=device,
                                                   chunk_size=chunk_size),
        }
        merges["cuda"]()  # warm-up: kernels compiled, pinned memory pooled
        for cache in ("cold", "warm"):
            seconds = {}
            for key, fn in [("plain_read", lambda: plain_read_seconds(paths)), *merges.items()]:
                if cache == "cold":
                    drop_cache(paths)
                else:
                    plain_read_seconds(paths)
                start = time.perf_counter()
                result = fn()
                seconds[key] = result if key == "plain_read" else time.perf_counter() - start
            case = {"name": name, "dtype": "float32", "n": 2, "cache": cache, "bytes_read": bytes_read,
                    "chunk_size": chunk_size, "seconds": seconds,
                    "gbps": {k: bytes_read / v / 1e9 for k, v in seconds.items()}}
            print(case, flush=True)
            cases.append(case)
        shutil.rmtree(folder)
    dev = torch.device(device if torch.cuda.is_available() else "cpu")
    record = {**gpu_record.header("merge_files", dev), "cpu_count": os.cpu_count(), "cases": cases}
    gpu_record.write(record, out_dir)
    return record


if __name__ == "__main__":
    ap = gpu_record.arg_parser(__doc__)
    ap.add_argument("--models", nargs="+", default=["ViT-L-14"])
    ap.add_argument("--tmp", default="/tmp/modelstock-files-bench")
    args = ap.parse_args()
    run({m: clip_shapes(m) for m in args.models}, Path(args.out), Path(args.tmp))
