"""Merging in place treats storage, not names: a tensor that a model holds under two names (tied
embeddings of a transformers model; a DynOPool2d that replace_pooling shares between a
ResNet block's path and its shortcut) is merged once, and both names hold the merge of the
inputs, as the out-of-place merge and the spec's fp64 formula give it: on the reference, on
the kernels, under DistributedDataParallel and under FSDP2 (2 gloo ranks against one process)."""
import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import modelstock
from modelstock import PeriodicMerge

from .helpers import DEVICE, spec_merge_fp64

REL = 1e-6  # the merge in fp32 against the fp64 formula, relative to the tensor's largest value


def tiny_gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one tensor, two names
    return model


def surgered_resnet():
    import torchvision

    from dynopool import replace_pooling

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    replace_pooling(model, (1, 3, 32, 32))
    return model


def small_surgered_cnn():
    """torchvision's own residual blocks, few channels: the same sharing as resnet18's, at a size
    the kernels' interpreter and gloo ranks take in seconds."""
    from torchvision.models.resnet import BasicBlock, conv1x1

    from dynopool import replace_pooling

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          BasicBlock(8, 16, stride=2, downsample=nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))),
                          BasicBlock(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    replace_pooling(model, (1, 3, 16, 16))
    return model


def shared_names(model):
    """Names of the state dict that another name shares its tensor with (the test's own count)."""
    by_id = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def finetunes(make, n=2):
    """n copies of make()'s model whose updates share a direction (so t is far from 0 and 1: a
    tensor merged twice ends visibly elsewhere); parameters() yields a shared one once."""
    out = []
    for i in range(n):
        m = make()
        shared, own = torch.Generator().manual_seed(99), torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * (torch.randn(p.shape, generator=shared) + torch.randn(p.shape, generator=own)))
        out.append(m)
    return out


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def snapshot(model):
    return {k: full(v) for k, v in model.state_dict().items()}


def check_against_truths(merged, base_sd, snap, names):
    """Every name of ``merged`` (a state dict) against the fp64 formula; each shared tensor's
    names are checked like any other."""
    for k, v in merged.items():
        if not v.is_floating_point():
            continue
        want, _ = spec_merge_fp64(base_sd[k], [s[k] for s in snap])
        err, scale = float((v.double().cpu() - want).abs().max()), float(want.abs().max())
        assert err <= REL * scale, (k, err / scale)
    for group in names:
        assert all(torch.equal(merged[group[0]].cpu(), merged[n].cpu()) for n in group)


@pytest.mark.parametrize("make, backend", [
    (tiny_gpt2, "torch"), (tiny_gpt2, "triton"), (surgered_resnet, "torch"),
    (small_surgered_cnn, "torch"), (small_surgered_cnn, "triton"),  # resnet18 on the interpreter: ~10 min
], ids=["tied-embeddings-torch", "tied-embeddings-triton", "resnet18-dynopool-torch", "small-dynopool-torch",
        "small-dynopool-triton"])
def test_a_shared_tensor_is_merged_once(make, backend):
    base = make()
    names = shared_names(base)
    assert names  # the case under test: some tensor has two names
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}  # two copies of a tied tensor: equal values
    models = [m.to(DEVICE) for m in finetunes(make)]
    snap = [snapshot(m) for m in models]
    out_of_place = modelstock.merge(base_sd, snap, backend="torch")
    report = modelstock.MergeReport()
    merger = PeriodicMerge(base, models, backend=backend)
    assert all(merger.base[g[0]] is merger.base[n] for g in names for n in g)  # w0 kept once, as the base has it
    merger.merge(report)
    for m in models:
        merged = snapshot(m)
        check_against_truths(merged, base_sd, snap, names)
        for k, v in merged.items():
            if backend == "torch":
                assert torch.equal(v, out_of_place[k]), k
            elif v.is_floating_point():
                err, scale = float((v - out_of_place[k]).abs().max()), float(out_of_place[k].abs().max())
                assert err <= REL * scale, (k, err / scale)
    # the report lists every name, a shared tensor's figures under each
    stats = {layer.name: layer for layer in report.layers}
    assert set(stats) == set(base_sd)
    for group in names:
        assert len({stats[n].t for n in group}) == 1


def test_names_tied_in_the_models_but_not_equal_in_an_input_are_refused():
    base = tiny_gpt2()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    base_sd["lm_head.weight"] += 1  # no longer the embedding: the tied models can hold one result only
    with pytest.raises(modelstock.InputError, match="tensor 'lm_head.weight': is one tensor with "
                                                    "'transformer.wte.weight'"):
        PeriodicMerge(base_sd, finetunes(tiny_gpt2), backend="torch")
    with pytest.raises(modelstock.InputError, match="merged and this one excluded"):
        PeriodicMerge(base, finetunes(tiny_gpt2), backend="torch", exclude=["lm_head.*"])


# ---------------------------------------------------------------------------------------- ranks

@contextlib.contextmanager
def process_group(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        yield
        dist.barrier()  # every rank done before any tears its gloo context down
    finally:
        dist.destroy_process_group()


def _distributed(rank, world, init_file, out_dir, wrap):
    torch.set_num_threads(1)
    with process_group(rank, world, init_file):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for make in (tiny_gpt2, small_surgered_cnn):
            base = make()
            models = finetunes(make)
            snap = [snapshot(m) for m in models]
            if wrap == "fsdp2":
                for m in models:
                    if make is small_surgered_cnn:
                        fully_shard(m[3], mesh=mesh)  # the block whose path and shortcut share a DynOPool2d
                    fully_shard(m, mesh=mesh)
                merger = PeriodicMerge(base, models, backend="torch")
            else:
                merger = PeriodicMerge(base, [nn.parallel.DistributedDataParallel(m) for m in models], backend="torch")
            merger.merge()
            results[make.__name__] = (snap, [snapshot(m) for m in models])
        torch.save(results, os.path.join(out_dir, f"{wrap}{rank}.pt"))


@pytest.mark.parametrize("wrap", ["fsdp2", "ddp"])
def test_shared_tensors_under_two_ranks_equal_one_process(tmp_path, wrap):
    mp.spawn(_distributed, args=(2, str(tmp_path / "init"), str(tmp_path), wrap), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{wrap}{r}.pt") for r in (0, 1)]
    for make in (tiny_gpt2, small_surgered_cnn):
        base = make()
        names = shared_names(base)
        base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        models = finetunes(make)
        PeriodicMerge(base, models, backend="torch").merge()
        one_process = [snapshot(m) for m in models]
        for snap, merged in (r[make.__name__] for r in ranks):
            for m, want in zip(merged, one_process):
                check_against_truths(m, base_sd, snap, names)
                for k, v in m.items():
                    tol = 0 if wrap == "ddp" else REL * float(want[k].abs().max())  # sharded: sums in another order
                    err = float((v.double() - want[k].double()).abs().max())
                    assert err <= tol, (k, err)


# ------------------------------------------------------------- both papers at once, under FSDP2

STEPS, BATCH = 4, 4  # a merge after steps 2 and 4; an equal share of each batch on 2 ranks


def train_and_merge(models, x, y, probe, mesh=None):
    """SGD steps on the models (BatchNorm in eval mode: a share of the batch gives the whole
    batch's gradients), PeriodicMerge every 2; returns the merged weights' fp64-formula error at
    the first merge, each model's final state and its output on ``probe``."""
    base = small_surgered_cnn()
    for m in models:
        m.eval()  # BatchNorm's running statistics; DynOPool learns the same in eval mode
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            fully_shard(m[3], mesh=mesh)
            fully_shard(m, mesh=mesh)
    from dynopool import param_groups

    opts = [torch.optim.SGD(param_groups(m, lr=0.05), lr=0.05) for m in models]
    merger = PeriodicMerge(base, models, every=2, backend="torch")
    errors = []
    for step in range(STEPS):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[step]), y[step]).backward()
            opt.step()
        before = [snapshot(m) for m in models]
        if merger.step() and not errors:
            base_sd = base.state_dict()
            for k, v in snapshot(models[0]).items():
                if v.is_floating_point():
                    want, _ = spec_merge_fp64(base_sd[k], [s[k] for s in before])
                    errors.append((k, float((v.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))))
    with torch.no_grad():
        outs = [m(probe).detach().cpu() for m in models]
    return {"errors": errors, "states": [snapshot(m) for m in models], "outs": outs}


def both_papers_data():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(STEPS, BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (STEPS, BATCH), generator=g),
            torch.randn(2, 3, 16, 16, generator=g))


def _both_papers(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    with process_group(rank, world, init_file):
        from torch.distributed.device_mesh import init_device_mesh

        x, y, probe = both_papers_data()
        per = BATCH // world
        share = slice(rank * per, (rank + 1) * per)
        record = train_and_merge(finetunes(small_surgered_cnn), x[:, share], y[:, share], probe,
                                 init_device_mesh("cpu", (world,)))
        torch.save(record, os.path.join(out_dir, f"both{rank}.pt"))


def test_both_papers_under_fsdp2_equal_one_process(tmp_path):
    mp.spawn(_both_papers, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' kernels
    try:
        want = train_and_merge(finetunes(small_surgered_cnn), *both_papers_data())
    finally:
        torch.set_num_threads(threads)
    for record in [want] + [torch.load(tmp_path / f"both{r}.pt") for r in (0, 1)]:
        assert record["errors"] and all(err <= REL for _, err in record["errors"]), \
            [e for e in record["errors"] if e[1] > REL]
    for r in (0, 1):
        got = torch.load(tmp_path / f"both{r}.pt")
        for a, b in zip(got["outs"], want["outs"]):
            torch.testing.assert_close(a, b)
        for sa, sb in zip(got["states"], want["states"]):
            for k in sb:
                torch.testing.assert_close(sa[k], sb[k])
