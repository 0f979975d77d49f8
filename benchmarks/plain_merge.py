"""The merge a user would write by hand: the baseline the file-to-file benchmark compares with.

    python benchmarks/plain_merge.py BASE FT1 FT2 OUT

safetensors ``load_file`` for every input, the authors' per-tensor torch formula, ``save_file``.
"""
import sys

import torch
from safetensors.torch import load_file, save_file


def main(base_path, ft_paths, out_path, eps=1e-8):
    base = load_file(base_path)
    fts = [load_file(p) for p in ft_paths]
    n = len(fts)
    merged = {}
    for k, w0 in base.items():
        ds = [(ft[k].float() - w0.float()).flatten() for ft in fts]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                cos.append(torch.dot(ds[i], ds[j]) / (ds[i].norm() * ds[j].norm() + eps))
        c = torch.stack(cos).mean().clamp(0, 1)
        t = n * c / (1 + (n - 1) * c)
        avg = sum(ft[k].float() for ft in fts) / n
        merged[k] = (t * avg + (1 - t) * w0.float()).to(w0.dtype)
    save_file(merged, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:-1], sys.argv[-1])
