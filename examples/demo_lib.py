"""The pieces of `make demo`: data, models, training and evaluation (examples/demo.py runs them;
tests/test_demo.py runs them on a tiny budget).

Data: scikit-learn's 1,797 handwritten digits (shipped inside its wheel), 8x8 upsampled to
16x16, split into train / held-out; out-of-distribution sets are the held-out images rotated,
noised, blurred and inverted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 16


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    ood: dict  # name -> images of the held-out set, shifted


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def _blur(x: torch.Tensor, sigma: float = 1.2) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None, :]) / k.sum() ** 2
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k[None, None])


def shifts(x: torch.Tensor, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"rotate": _rotate(x, 30.0), "noise": (x + 0.35 * torch.randn(x.shape, generator=g)).clamp(0, 1),
            "blur": _blur(x), "invert": 1.0 - x}


def load_data(seed: int = 0, limit: int | None = None) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if limit:
        perm = perm[:limit]
    cut = int(0.6 * len(perm))
    tr, te = perm[:cut], perm[cut:]
    return Data(x[tr], y[tr], x[te], y[te], shifts(x[te], seed))


def broad_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The pre-training distribution: every image randomly rotated, noised, blurred or
    inverted (milder than the test shifts), so the pre-trained model is broad, not sharp."""
    out = x.clone()
    kind = torch.randint(0, 5, (len(x),), generator=g)
    angle = float(torch.empty(()).uniform_(-25, 25, generator=g))
    out[kind == 1] = _rotate(x[kind == 1], angle) if bool((kind == 1).any()) else out[kind == 1]
    out[kind == 2] = (x[kind == 2] + 0.25 * torch.randn(x[kind == 2].shape, generator=g)).clamp(0, 1)
    out[kind == 3] = _blur(x[kind == 3]) if bool((kind == 3).any()) else out[kind == 3]
    out[kind == 4] = 1.0 - x[kind == 4]
    return out


class TinyViT(nn.Module):
    """open_clip's own VisionTransformer at a tiny width and depth; its output is the logits."""

    def __init__(self):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.visual = VisionTransformer(image_size=SIZE, patch_size=4, width=64, layers=4, heads=4,
                                        mlp_ratio=2.0, output_dim=10)

    def forward(self, x):
        return self.visual(x.expand(-1, 3, -1, -1))


class SmallCNN(nn.Module):
    """Three convolutions with 2x2 max pooling after the first two (replaced by DynOPool2d)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def train(models, data: Data, *, epochs: int, lr: float, seeds, augment: bool = False, batch: int = 64,
          on_epoch_end=None, extra_loss=None) -> None:
    """Train each model on the train split (each with its own seed for data order), side by
    side so that ``on_epoch_end`` (e.g. a periodic merge) sees them all at the same step."""
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for m in models]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(data.train_x)
    for _ in range(epochs):
        perms = [torch.randperm(n, generator=g) for g in gens]
        for start in range(0, n, batch):
            for m, opt, perm, g in zip(models, opts, perms, gens):
                idx = perm[start:start + batch]
                x = data.train_x[idx]
                if augment:
                    x = broad_augment(x, g)
                loss = F.cross_entropy(m(x), data.train_y[idx])
                if extra_loss is not None:
                    loss = loss + extra_loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
        if on_epoch_end is not None:
            on_epoch_end()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean()) * 100
    finally:
        model.train()


def evaluate(model, data: Data) -> dict:
    row = {"ID": accuracy(model, data.test_x, data.test_y)}
    for name, x in data.ood.items():
        row[name] = accuracy(model, x, data.test_y)
    row["OOD mean"] = sum(row[k] for k in data.ood) / len(data.ood)
    return row


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
