"""DynOPool under FSDP2: a torchvision ResNet-18 after replace_pooling, fully_shard on each stage
and on the root, BatchNorm in eval mode, on 2 and 3 gloo processes (CPU), 1-D and HSDP 2-D
meshes. SGD steps with param_groups on each rank's share of a batch equal the same steps on one
process with the whole batch; a large step that pushes alpha and delta out of their ranges is
projected where FSDP2 stores them (the root's own layer included, which is unsharded when the
sizes are read); every rank plans the same sizes; a forward reads the host once, with one
collective for all the sharded parameters; torch.distributed.checkpoint round-trips the sharded
model. A mesh of one runs the same on the device (nccl and CUDA where there is a GPU)."""
import contextlib
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

from dynopool import DynOPool2d, param_groups, replace_pooling
from dynopool import pool as pool_module

STEPS, GLOBAL_BATCH, SIZE = 3, 6, 32  # 6: an equal share on 2 and on 3 ranks
LR = 0.01
PUSH_STEP, PUSH_POOL_LR = 1, 1e5  # this step's pooling learning rate throws alpha and delta far out of range
NORMAL_POOL_LR = LR * 0.01  # param_groups' pool_lr_scale


@contextlib.contextmanager
def one_thread():
    # the ranks and the single process use the same kernels; and on a busy 2-core machine two
    # intra-op threads per process made a ResNet-18 step ~15x slower (measured)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_model(device="cpu"):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    replace_pooling(model, (1, 3, SIZE, SIZE))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # running statistics: a rank's share of the batch gives the whole batch's gradients
    return model.to(device)


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        fully_shard(stage, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def pools(model):
    return list(dict.fromkeys(m for m in model.modules() if isinstance(m, DynOPool2d)))


def data(device):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)
    ys = torch.randint(0, 10, (STEPS, GLOBAL_BATCH), generator=g)
    probe = torch.randn(2, 3, SIZE, SIZE, generator=g)
    return xs.to(device), ys.to(device), probe.to(device)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def train(model, xs, ys, probe, before_forward=lambda: None):
    """STEPS SGD steps on (xs, ys), then a forward of ``probe``. Returns what the runs are compared
    on: the pooling parameters as stored (the optimizer's) after the large step and after the
    forward that follows it, and at the end; every DynOPool call's output size; the output."""
    opt = torch.optim.SGD(param_groups(model, lr=LR), lr=LR, momentum=0.9)
    stored = opt.param_groups[1]["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    ranges = {id(t): r for p in pools(model) for t, r in ((p.alpha, p.alpha_range), (p.delta, p.delta_range))}
    record = {"names": [names[id(p)] for p in stored], "ranges": [ranges[id(p)] for p in stored]}
    sizes = []
    handles = [p.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:]))) for p in pools(model)]
    for step, (x, y) in enumerate(zip(xs, ys)):
        before_forward()
        out = model(x)
        if step == PUSH_STEP + 1:
            record["projected"] = [full(p) for p in stored]
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.param_groups[1]["lr"] = PUSH_POOL_LR if step == PUSH_STEP else NORMAL_POOL_LR
        opt.step()
        if step == PUSH_STEP:
            record["pushed"] = [full(p) for p in stored]
    before_forward()
    with torch.no_grad():
        record["out"] = model(probe).detach().cpu()
    for h in handles:
        h.remove()
    record["sizes"] = sizes
    record["final"] = [full(p) for p in stored]
    return record


def run_sharded(rank, world, base, mesh, device, checkpoint_dir=None, prefetch=False):
    """One rank's run on its share of each batch; with ``checkpoint_dir`` also a DCP round trip."""
    from torch.distributed.tensor.debug import CommDebugMode

    model = shard(copy.deepcopy(base), mesh)
    if prefetch:
        # the root gathers layer2 before the sizes are read: that layer's copy is gathered
        # before the projection, and the layer must project it itself
        model.set_modules_to_forward_prefetch([model.layer2])
    placements = {tuple(p.placements) for p in model.parameters()}  # before a forward unshards the root
    xs, ys, probe = data(device)
    per = GLOBAL_BATCH // world
    reads = []  # per forward: (layers read, collectives issued) for each host read
    real = pool_module._read_values

    def counting(layers):
        with CommDebugMode() as comm:
            values = real(layers)
        reads[-1].append((len(layers), comm.get_total_counts()))
        return values

    pool_module._read_values = counting
    try:
        record = train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per], probe,
                       before_forward=lambda: reads.append([]))
    finally:
        pool_module._read_values = real
    record["reads"] = reads
    record["placements"] = placements
    assert "DTensors placed" in repr(model)  # printing a sharded model reads nothing from other ranks
    if checkpoint_dir is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(model.state_dict(), checkpoint_id=checkpoint_dir)
        loaded = shard(copy.deepcopy(base), mesh)
        state = loaded.state_dict()
        dcp.load(state, checkpoint_id=checkpoint_dir)
        loaded.load_state_dict(state)
        record["loaded_pools"] = [full(p) for p in param_groups(loaded, lr=LR)[1]["params"]]
        with torch.no_grad():
            record["loaded_out"] = loaded(probe).detach().cpu()
    return record


def _rank(rank, world, init_file, out_dir, meshes):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # see one_thread
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        base = make_model()
        for i, shape in enumerate(meshes):
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard") if len(shape) == 2 else None)
            record = run_sharded(rank, world, base, mesh, "cpu", os.path.join(out_dir, "ckpt") if i == 0 else None,
                                 prefetch=world == 3)
            gathered = [None] * world
            dist.all_gather_object(gathered, record)
            if rank == 0:
                torch.save(gathered, os.path.join(out_dir, f"{i}.pt"))
        # every rank done before any tears its gloo context down
        dist.barrier()
    finally:
        dist.destroy_process_group()


_SINGLE = {}


def single_process(device):
    """The same steps on one process with the whole batch (once per device and session)."""
    if device not in _SINGLE:
        with one_thread():
            _SINGLE[device] = train(make_model(device), *data(device))
    return _SINGLE[device]


def check_against_single_process(ranks, want):
    for r in ranks:
        # the large step left the range at the root's own layer (conv1's pool: unsharded while
        # the sizes are read) and at a stage's; the forward after it projected them where
        # they are stored, to exactly what the single process has
        left = {n for n, p, (lo, hi) in zip(r["names"], r["pushed"], r["ranges"]) if ((p < lo) | (p > hi)).any()}
        stages = {n for n in left if n.startswith("layer") and n.endswith(".alpha")}
        assert "conv1.0.alpha" in left and stages, left  # pool first: the DynOPool is <site>.0
        for got, pushed, (lo, hi) in zip(r["projected"], r["pushed"], r["ranges"]):
            assert torch.equal(got, pushed.clamp(lo, hi)), (got, pushed)
        for got, ref in zip(r["projected"], want["projected"]):
            torch.testing.assert_close(got, ref)
        assert r["sizes"] == want["sizes"]  # every call planned the whole batch's size
        for got, ref in zip(r["final"], want["final"]):
            torch.testing.assert_close(got, ref)
        torch.testing.assert_close(r["out"], want["out"])
        # all ranks alike (replicas of an HSDP mesh too)
        assert all(torch.equal(a, b) for a, b in zip(r["final"], ranks[0]["final"]))
        assert torch.equal(r["out"], ranks[0]["out"])


POOLS = 5  # ResNet-18 after the surgery: the stem's 3x3 max pool and the 4 stride-2 levels


def check_reads(reads, collectives):
    """One host read of all 5 layers per forward, issuing ``collectives``; only the forward after
    the large step (whose sizes changed) adds the layers' own reads of their unsharded copies,
    which issue none."""
    for i, forward in enumerate(reads):
        assert forward[0] == (POOLS, collectives), (i, forward)
        if i == PUSH_STEP + 1:
            assert len(forward) > 1 and all(r == (1, 0) for r in forward[1:]), forward
        else:
            assert len(forward) == 1, (i, forward)


@pytest.mark.parametrize("world, meshes", [
    (2, [(2,), (2, 1)]),  # 1-D; HSDP with two replicas of unsharded parameters
    (3, [(1, 3)]),  # HSDP sharding a (2,) parameter over 3 ranks, one shard empty; explicit prefetch
])
def test_fsdp2_steps_equal_one_process_with_the_whole_batch(tmp_path, world, meshes):
    from torch.distributed.tensor import Replicate, Shard

    mp.spawn(_rank, args=(world, str(tmp_path / "init"), str(tmp_path), meshes), nprocs=world, join=True)
    want = single_process("cpu")
    for i, shape in enumerate(meshes):
        ranks = torch.load(tmp_path / f"{i}.pt", weights_only=False)
        assert ranks[0]["placements"] == {(Shard(0),) if len(shape) == 1 else (Replicate(), Shard(0))}
        check_against_single_process(ranks, want)
        for r in ranks:  # a shard dimension of one rank needs no collective to make the values full
            check_reads(r["reads"], collectives=int(shape[-1] > 1))
        if i == 0:  # the checkpoint: the same parameters and outputs after a DCP round trip
            for r in ranks:
                assert all(torch.equal(a, b) for a, b in zip(r["loaded_pools"], r["final"]))
                assert torch.equal(r["loaded_out"], r["out"])


def test_fsdp2_on_a_mesh_of_one_on_the_device(tmp_path, device):
    # on a GPU machine: nccl and CUDA DTensors (the Triton kernels); here gloo on the CPU
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with one_thread():
            record = run_sharded(0, 1, make_model(device), init_device_mesh(device.type, (1,)), device)
    finally:
        dist.destroy_process_group()
    check_against_single_process([record], single_process(device))
    check_reads(record["reads"], collectives=0)
