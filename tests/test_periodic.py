"""Model Stock during training: PeriodicMerge against the reference merge, and under DDP."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import modelstock
from modelstock import PeriodicMerge


def net(seed=0, bn=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def batches(seed, steps, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def train_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("keep_base", ["device", "host"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_periodic_merge_equals_the_reference_merge_after_k_steps(keep_base, backend, device):
    pretrained = net(0)  # the base stays where the user has it; models train on the device
    models = [net(0).to(device) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    merger = PeriodicMerge(pretrained, models, every=3, keep_base=keep_base, backend=backend)
    data = [[(x.to(device), y.to(device)) for x, y in batches(10 + i, 6)] for i in range(2)]  # own order each
    for step in range(6):
        for m, o, d in zip(models, opts, data):
            train_step(m, o, *d[step])
        if (step + 1) % 3 == 0:
            snapshot = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
            momentum = [o.state[p]["momentum_buffer"].clone() for o, p in zip(opts, (models[0][0].weight, models[1][0].weight))]
        merged = merger.step()
        assert merged == ((step + 1) % 3 == 0)
        if merged:
            # Integer buffers (BatchNorm's step counter) follow the models, not w0.
            base = {k: v.to(device) for k, v in pretrained.state_dict().items()}
            base["1.num_batches_tracked"] = snapshot[0]["1.num_batches_tracked"]
            want = modelstock.merge(base, snapshot, backend="torch")
            for m in models:
                for k, v in m.state_dict().items():
                    if backend == "torch":
                        assert torch.equal(v, want[k]), k
                    else:  # the kernels' fp32 sums: within a few roundings of the inputs' magnitude
                        scale = torch.stack([s[k].double().abs() for s in snapshot]).amax(0) + base[k].double().abs()
                        assert ((v.double() - want[k].double()).abs() <= 8 * torch.finfo(torch.float32).eps * (scale + 1e-30)).all(), k
            # optimizer state is each model's own and untouched by the merge
            assert torch.equal(opts[0].state[models[0][0].weight]["momentum_buffer"], momentum[0])
    assert merger.merges == 2
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


def test_bad_options():
    with pytest.raises(ValueError, match="two models"):
        PeriodicMerge(net(), [net()])
    with pytest.raises(ValueError, match="every"):
        PeriodicMerge(net(), [net(), net()], every=0)
    with pytest.raises(ValueError, match="keep_base"):
        PeriodicMerge(net(), [net(), net()], keep_base="disk")


def _rank(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # No BatchNorm: DDP itself lets running statistics differ between ranks after a forward.
        pretrained = net(0, bn=False)
        models = [nn.parallel.DistributedDataParallel(net(0, bn=False)) for _ in range(2)]
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
        merger = PeriodicMerge(pretrained, models, every=2)
        data = [batches(100 * rank + i, 4) for i in range(2)]  # each rank its own shard
        for step in range(4):
            for m, o, d in zip(models, opts, data):
                train_step(m, o, *d[step])
            merger.step()
        torch.save([m.module.state_dict() for m in models], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_stay_identical_under_ddp(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0, r1):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(r0[0][k], r0[1][k]) for k in r0[0])  # merged: both models equal
    assert not torch.equal(r0[0]["0.weight"], net(0, bn=False).state_dict()["0.weight"])  # and trained
