"""Model Stock on FSDP2-sharded models (DTensor parameters), two and three gloo processes on the
CPU: the gathered result against the single-process merge of the full state dicts, placements
kept, one collective per merge (after one int for the ranks' agreement), repeated merges while
training, bad mixes refused."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import modelstock
from modelstock import InputError, PeriodicMerge

EPS32 = torch.finfo(torch.float32).eps


def net():
    # dim-0 sizes 7, 3 and 5: none divides 2 or 3 (uneven shards, an empty one for 3 ranks at 2)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 5))


def models_from(base, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = net()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            shared = [torch.randn(p.shape, generator=torch.Generator().manual_seed(99)) for p in m.parameters()]
            for p, s in zip(m.parameters(), shared):
                p.add_(0.05 * (0.7 * s + 0.3 * torch.randn(p.shape, generator=g)))
        out.append(m)
    return out


def full_state(m):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in m.state_dict().items()}


def check_equal_to_single_process(models, base_sd, snapshot, **options):
    want = modelstock.merge(base_sd, snapshot, backend="torch", **options)
    for m in models:
        for k, v in full_state(m).items():
            scale = torch.stack([s[k].double().abs() for s in snapshot]).amax(0) + base_sd[k].double().abs()
            err = (v.double() - want[k].double()).abs()
            assert (err <= 8 * EPS32 * scale + 1e-30).all(), (k, float(err.max()))


def _rank(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (world,))
        calls = []
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append((tensor.dtype, tensor.numel()))
            return real(tensor, *args, **kwargs)

        for n in (2, 3):
            for granularity in ("tensor", "row"):
                for clamp in (True, False):
                    torch.manual_seed(0)
                    base = net()
                    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
                    models = models_from(base, n, seed=10 * n)
                    for m in models:
                        fully_shard(m, mesh=mesh)
                    placements = {k: v.placements for k, v in models[0].state_dict().items()}
                    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
                    merger = PeriodicMerge(base_sd, models, every=2, granularity=granularity, clamp=clamp)
                    assert [type(e).__name__ for e in merger._merge._executors] == ["ShardedLayers"]  # all sharded
                    # w0 is kept as this rank's shards only
                    assert all(isinstance(v, DTensor) for v in merger.base.values())
                    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
                    for step in range(4):
                        for m, o in zip(models, opts):
                            o.zero_grad()
                            m(torch.randn(4, 5, generator=g)).square().mean().backward()
                            o.step()
                        snapshot = [full_state(m) for m in models]
                        calls.clear()
                        dist.all_reduce = counting
                        try:
                            merged = merger.step()
                        finally:
                            dist.all_reduce = real
                        assert merged == (step % 2 == 1)
                        if merged:
                            # the ranks' agreement that every check passed (one int), then one
                            # collective for every layer's Gram together
                            assert len(calls) == 2 and calls[0] == (torch.int64, 1), calls
                            check_equal_to_single_process(models, base_sd, snapshot, granularity=granularity,
                                                          clamp=clamp)
                            for m in models:
                                for k, v in m.state_dict().items():
                                    assert isinstance(v, DTensor) and v.placements == placements[k], k
        # the base as DTensors (sharded like the models) gives the same as the full base
        torch.manual_seed(0)
        base = net()
        base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        models = models_from(base, 2, seed=7)
        snapshot = [full_state(m) for m in models]
        sharded_base = net()
        sharded_base.load_state_dict(base_sd)
        for m in [*models, sharded_base]:
            fully_shard(m, mesh=mesh)
        modelstock.merge_(models, sharded_base, models, backend="torch")
        check_equal_to_single_process(models, base_sd, snapshot)
        # w0 kept on the host (as this rank's shards), moved over for each merge
        models = models_from(base, 3, seed=9)
        for m in models:
            fully_shard(m, mesh=mesh)
        snapshot = [full_state(m) for m in models]
        merger = PeriodicMerge(base_sd, models, keep_base="host", granularity="row")
        assert all(v.local.device.type == "cpu" for v in merger.base.values())
        merger.merge()
        check_equal_to_single_process(models, base_sd, snapshot, granularity="row")
        # a model sharded and one not: a clear error
        plain = models_from(base, 1, seed=8)[0]
        with pytest.raises(InputError, match="DTensor in some models and a plain tensor in others"):
            modelstock.merge_([models[0]], base_sd, [models[0], plain], backend="torch")
        # every rank done before any tears its gloo context down: a rank that left early
        # aborted another's exit now and then ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_sharded_merge_equals_the_single_process_merge(tmp_path, world):
    mp.spawn(_rank, args=(world, str(tmp_path / "init")), nprocs=world, join=True)


def _mesh_of_one(rank, init_file, device):
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device, (1,))
        torch.manual_seed(0)
        base = net().to(device)
        base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        models = [m.to(device) for m in models_from(base.cpu(), 2, seed=3)]
        for m in models:
            fully_shard(m, mesh=mesh)
        snapshot = [full_state(m) for m in models]
        PeriodicMerge(base_sd, models).merge()
        check_equal_to_single_process(models, base_sd, snapshot)
    finally:
        dist.destroy_process_group()


def test_sharded_merge_on_the_device_with_a_mesh_of_one(tmp_path, device):
    # on a GPU machine: nccl and CUDA DTensors; here: gloo on the CPU (the same DTensor path)
    mp.spawn(_mesh_of_one, args=(str(tmp_path / "init"), device.type), nprocs=1, join=True)
