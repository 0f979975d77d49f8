"""What a pretrained network loses at surgery, and how fast it recovers: a torchvision
ResNet-18 trained here on scikit-learn's digits (16 px as make demo has them, grey repeated to 3
channels) to ~99%, then ``replace_pooling`` (pool first, the default, and conv first), then
100 steps of the same plain SGD over every parameter (one group). Test accuracy before, right
after the surgery and after the 100 steps; the untouched network trained 100 steps more beside
it. CPU, a few minutes; writes ``benchmarks/results/cpu-dynopool-pretrained-<date>.json``:

    .venv/bin/python benchmarks/dynopool_pretrained.py
"""
from __future__ import annotations

import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import demo_lib as L  # noqa: E402

from dynopool import replace_pooling  # noqa: E402

SIZE, BATCH, PRETRAIN, AFTER = 16, 32, 300, 100


def images(x):
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        right = (model(images(data.test_x)).argmax(1) == data.test_y).float().mean().item()
    model.train()
    return round(100 * right, 1)


def train(model, data, steps: int, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_x), (BATCH,), generator=g)
        loss = F.cross_entropy(model(images(data.train_x[idx])), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    torch.set_num_threads(2)
    data = L.load_data()
    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18(num_classes=10)
    start = time.perf_counter()
    train(pretrained, data, PRETRAIN, seed=1)
    rows = {"pretrained": accuracy(pretrained, data)}
    untouched = copy.deepcopy(pretrained)
    train(untouched, data, AFTER, seed=2)
    rows["untouched, 100 steps more"] = accuracy(untouched, data)
    for placement in ("pool_first", "conv_first"):
        model = copy.deepcopy(pretrained)
        report = replace_pooling(model, (1, 3, SIZE, SIZE), placement=placement)
        rows[f"{placement}: right after surgery"] = accuracy(model, data)
        train(model, data, AFTER, seed=2)
        rows[f"{placement}: after 100 steps"] = accuracy(model, data)
        rows[f"{placement}: MACs at init / original"] = round(report.macs_at_init / report.macs_original, 3)
    record = {"benchmark": "dynopool_pretrained", "torch": torch.__version__, "machine": "shared 2-core CPU",
              "network": "torchvision resnet18, 10 classes", "data": f"sklearn digits, {SIZE} px, test split of "
              f"{len(data.test_y)}", "pretraining": f"{PRETRAIN} steps of {BATCH}, SGD lr 0.05 momentum 0.9 wd 1e-4",
              "after_surgery": f"{AFTER} steps, the same SGD over every parameter", "test_accuracy_percent": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    for k, v in rows.items():
        print(f"{k}: {v}")
    out = ROOT / "benchmarks" / "results" / f"cpu-dynopool-pretrained-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
