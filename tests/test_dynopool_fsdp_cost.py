"""ComputeCostLoss under FSDP2: ``task + cost()`` trains a fully_shard-ed network (2 gloo ranks on
the CPU, each stage and the root sharded) as one process trains it on the whole batch. The cost
is a plain tensor (it used to be a replicated DTensor whose backward met the task's plain one
and failed), its gradient reaches the sharded alphas (the root's own layer, unsharded from its
forward to its backward, and the stages' sharded ones), the alphas move enough that the output
sizes change and the cost traces the network again, and every rank ends with the same values.
A mesh of one runs the same on the device (nccl and CUDA where there is a GPU)."""
import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dynopool import ComputeCostLoss, DynOPool2d, read_sizes_once

from .test_dynopool_fsdp import one_thread

STEPS, GLOBAL_BATCH, SIZE, BUDGET = 4, 4, 24, 2e4
LR, POOL_LR = 0.05, 0.3  # large enough on alpha that the sizes change within the steps


class Block(nn.Module):
    def __init__(self, alpha):
        super().__init__()
        self.pool = DynOPool2d(alpha, 0.25, alpha_range=(1.0, 8.0))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(self.pool(x)))


def make_model(device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DynOPool2d((1.3, 1.5), 0.25, alpha_range=(1.0, 8.0)),
                          Block((1.6, 1.2)), Block((1.4, 1.7)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    read_sizes_once(model)
    return model.to(device)


def pools(model):
    return [m for m in model.modules() if isinstance(m, DynOPool2d)]


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def data(device):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)
    ys = torch.randint(0, 5, (STEPS, GLOBAL_BATCH), generator=g)
    return xs.to(device), ys.to(device)


def train(model, xs, ys):
    """STEPS SGD steps of task + cost; per step the cost, its type, the sizes and the alphas."""
    cost = ComputeCostLoss(model, (1, 3, SIZE, SIZE), budget=BUDGET)
    # after the loss's probing forward, as a user may: the parameters are still the sharded ones
    alphas = [p.alpha for p in pools(model)]
    rest = [p for p in model.parameters() if all(p is not a for a in alphas)]
    opt = torch.optim.SGD([{"params": rest, "lr": LR}, {"params": alphas, "lr": POOL_LR}])
    record = {"cost": [], "types": set(), "sizes": [], "alphas": []}
    sizes = []
    handles = [p.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:]))) for p in pools(model)]
    for x, y in zip(xs, ys):
        sizes.clear()
        task = nn.functional.cross_entropy(model(x), y)
        c = cost()  # between the forward and its backward: a re-trace runs another forward here
        record["types"].add(type(c))
        loss = task + c
        opt.zero_grad()
        loss.backward()
        opt.step()
        record["cost"].append(float(c.detach()))
        record["sizes"].append(list(sizes))
        record["alphas"].append([full(a) for a in alphas])
    for h in handles:
        h.remove()
    return record


def run_sharded(rank, world, device, mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_model(device)
    for block in (model[2], model[3]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    xs, ys = data(device)
    per = GLOBAL_BATCH // world
    return train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])


def _rank(rank, world, init_file, out):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        record = run_sharded(rank, world, "cpu", init_device_mesh("cpu", (world,)))
        gathered = [None] * world
        dist.all_gather_object(gathered, record)
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check(ranks, want):
    sizes = [s for step in want["sizes"] for s in step]
    assert len(set(sizes)) > len(pools(make_model())), "the sizes never changed: the test does not re-trace"
    for r in ranks:
        assert r["types"] == {torch.Tensor}  # a plain tensor, not a DTensor
        assert r["sizes"] == want["sizes"]
        torch.testing.assert_close(r["cost"], want["cost"])
        for got, ref in zip(r["alphas"], want["alphas"]):
            torch.testing.assert_close(got, ref)
        assert all(torch.equal(a, b) for step, first in zip(r["alphas"], ranks[0]["alphas"]) for a, b in zip(step, first))


def single_process(device):
    with one_thread():
        return train(make_model(device), *data(device))


def test_cost_loss_trains_under_fsdp2_as_one_process(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    ranks = torch.load(tmp_path / "out.pt", weights_only=False)
    want = single_process("cpu")
    # the cost moved the alphas (a budget under the network's cost pushes them up)
    assert all((last > first).any() for last, first in zip(want["alphas"][-1], want["alphas"][0]))
    check(ranks, want)


def test_cost_loss_under_fsdp2_on_a_mesh_of_one_on_the_device(tmp_path, device):
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with one_thread():
            record = run_sharded(0, 1, device, init_device_mesh(device.type, (1,)))
    finally:
        dist.destroy_process_group()
    check([record], single_process(device))
