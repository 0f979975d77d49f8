"""In-place merges on several ranks (FSDP2, DistributedDataParallel; 2 and 3 gloo processes): a
check that fails on one rank only (a NaN in an unsharded BatchNorm buffer there, a base of
another shape there) is the same clear error on every rank, and the ranks stay paired in their
collectives when the user's loop catches it and goes on; under FSDP2 the base's shapes are
checked whole, with the error plain models get. A rank that hangs fails the test (deadline)."""
import datetime
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import modelstock
from modelstock import InputError, PeriodicMerge

BAD = 1  # the rank whose models go wrong
DEADLINE_S = 300


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 7))


def finetunes(n=2):
    out = []
    for i in range(n):
        m = net()
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for t in [*m.parameters(), m[1].running_mean, m[1].running_var]:
                t.add_(0.01 * torch.rand(t.shape, generator=g))
        out.append(m)
    return out


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - what each rank saw is the test's subject
        return type(e).__name__, str(e), getattr(e, "message", None)
    return None


def resized(sd, name, rows):
    sd = dict(sd)
    sd[name] = torch.zeros(rows, *sd[name].shape[1:])
    return sd


def _rank(rank, world, init_file, out_dir, wrap, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))

        def wrapped(models):
            if wrap == "ddp":
                return [nn.parallel.DistributedDataParallel(m) for m in models]
            for m in models:
                fully_shard(m, mesh=mesh)
            return models

        seen = {}
        base_sd = net().state_dict()
        if "whole-shape" in cases:
            # a base of another shape on every rank: the full shape is checked (the message plain
            # models get), not this rank's shard of it
            for rows in (8, 6):
                seen[f"rows{rows}"] = outcome(lambda: PeriodicMerge(resized(base_sd, "4.weight", rows),
                                                                    wrapped(finetunes()), backend="torch"))
        if "one-rank" in cases:
            # a NaN in an unsharded buffer (FSDP2 shards parameters only) of this rank's models
            models = finetunes()
            merger = PeriodicMerge(base_sd, wrapped(models), backend="torch")
            if rank == BAD:
                models[1][1].running_mean[0] = float("nan")
            seen["nan"] = outcome(merger.merge)
            # the user's loop caught it and goes on: the ranks' collectives still pair up
            with torch.no_grad():
                models[1][1].running_mean.copy_(base_sd["1.running_mean"])
            seen["after"] = outcome(merger.merge)
            total = torch.tensor([float(rank)])
            dist.all_reduce(total)
            seen["paired"] = float(total)
            # a base of another shape on one rank only: every rank refuses
            base = resized(base_sd, "4.weight", 8) if rank == BAD else base_sd
            seen["one-base"] = outcome(lambda: PeriodicMerge(base, wrapped(finetunes()), backend="torch"))
            # an out-of-place merge of the models' weights on one rank (to save them) waits for no other
            models = wrapped(finetunes())  # on every rank: wrapping is collective
            if rank == 0:
                seen["alone"] = outcome(lambda: modelstock.merge(base_sd, models, backend="torch"))
        torch.save(seen, os.path.join(out_dir, f"{wrap}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_within_deadline(fn, args, nprocs):
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    end = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=max(1.0, end - time.monotonic())):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"a rank still runs after {DEADLINE_S} s: hung in a collective")


@pytest.mark.parametrize("wrap", ["fsdp2", "ddp"])
@pytest.mark.parametrize("world", [2, 3])
def test_one_ranks_error_is_every_ranks_error(tmp_path, world, wrap):
    spawn_within_deadline(_rank, (world, str(tmp_path / "init"), str(tmp_path), wrap, ["one-rank"]), world)
    seen = [torch.load(tmp_path / f"{wrap}{r}.pt") for r in range(world)]
    for case in ("nan", "one-base"):
        errors = [s[case] for s in seen]
        assert errors[0] is not None and all(e == errors[0] for e in errors), (case, errors)
        assert errors[0][0] == "InputError" and f"rank {BAD}" in errors[0][1], errors[0]
    assert re.search(r"tensor '(module\.)?1\.running_mean': holds NaN or inf", seen[0]["nan"][1])
    assert re.search(r"tensor '(module\.)?4\.weight': shape \[7, 144\] differs from the base's \[8, 144\]",
                     seen[0]["one-base"][1])
    assert all(s["after"] is None and s["paired"] == world * (world - 1) / 2 for s in seen)
    if wrap == "ddp":
        assert seen[0]["alone"] is None


def test_fsdp2_checks_the_base_whole_shape(tmp_path):
    spawn_within_deadline(_rank, (2, str(tmp_path / "init"), str(tmp_path), "fsdp2", ["whole-shape"]), 2)
    seen = [torch.load(tmp_path / f"fsdp2{r}.pt") for r in range(2)]
    for rows in (8, 6):  # larger: was sliced silently; smaller: was torch's own error
        try:  # the message plain models get
            PeriodicMerge(resized(net().state_dict(), "4.weight", rows), finetunes(), backend="torch")
        except InputError as e:
            plain = e.message
        assert all(s[f"rows{rows}"][0] == "InputError" and s[f"rows{rows}"][2] == plain for s in seen), \
            [s[f"rows{rows}"] for s in seen]
