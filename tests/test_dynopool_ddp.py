"""A DynOPool model under DistributedDataParallel (gloo, two CPU processes): alpha and delta
stay identical across ranks and equal the single-process result for the same global batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dynopool import DynOPool2d

STEPS, GLOBAL_BATCH = 3, 8


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), DynOPool2d(alpha=1.8, delta=0.3), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), DynOPool2d(alpha=2.2, delta=0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 1, 12, 12, generator=g), torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=g)


def train(model, xs, ys):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _rank(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        xs, ys = data()
        per = GLOBAL_BATCH // world
        train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])
        torch.save({k: v for k, v in model.module.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_with_single_process(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = make_model()
    train(single, *data())
    want = single.state_dict()
    for k in want:
        assert torch.equal(r0[k], r1[k]), k
        if k.endswith(("alpha", "delta")):
            torch.testing.assert_close(r0[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(r0["1.alpha"], torch.tensor([1.8, 1.8]))  # alpha did learn
