"""Merge methods behind one contract (modelstock/methods): the baselines and a user's own method
run through every pipeline (torch reference, Triton kernels, numpy file merge, GPU file pipeline,
the command line), each against its fp64 formula; Model Stock's figures stay its own."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import modelstock
from modelstock import InputError
from modelstock.cli import main
from modelstock.merging import gpu_pipeline
from modelstock.methods import Coefficients, MergeMethod, WiseFT

from .helpers import DEVICE, assert_within, merge_tolerance, spec_merge_fp64
from .test_files import save_models
from .test_merge import make_models


@dataclass(frozen=True)
class Weighted(MergeMethod):
    """Task arithmetic with fixed per-model weights: c_i = lam_i (a method a user might add)."""

    lam: tuple = (0.2, 0.9, -0.3)
    name = "weighted"

    def coefficients(self, stats, n, rows):
        assert stats is None
        return Coefficients(np.full(rows, float(n)), np.tile(np.array(self.lam[:n]), (rows, 1)))


@dataclass(frozen=True)
class Cosine(MergeMethod):
    """Statistics-driven per-model weights: c_i = ||d_i||^-1 / N (reads the Gram's diagonal)."""

    name = "cosine"
    statistics = "gram"

    def coefficients(self, gram, n, rows):
        diag = gram.diagonal(0, -2, -1)
        return Coefficients(diag.sum(1) * 0 + 1, 1 / (diag ** 0.5 + 1e-12))


def fp64_combine(w0, ws, coef):
    """w0 + sum_i c_i (w_i - w0) in fp64; ``coef``: (N,) or (rows, N)."""
    w0 = w0.double()
    out = w0.clone()
    for i, w in enumerate(ws):
        c = torch.as_tensor(coef, dtype=torch.float64)
        c = c[..., i].reshape(-1, *[1] * (w0.ndim - 1)) if c.ndim > 1 else c[i]
        out += c * (w.double() - w0)
    return out


def expected(method, w0, ws, granularity="tensor"):
    n = len(ws)
    if method == "uniform":
        return fp64_combine(w0, ws, [1 / n] * n)
    if isinstance(method, WiseFT):
        return fp64_combine(w0, ws, [method.alpha])
    if isinstance(method, Weighted):
        return fp64_combine(w0, ws, method.lam[:n])
    if isinstance(method, Cosine):
        ds = [(w.double() - w0.double()).flatten() for w in ws]
        return fp64_combine(w0, ws, [1 / (d.norm() + 1e-12) / n for d in ds])
    return spec_merge_fp64(w0, ws, granularity=granularity)[0]


METHODS = ["uniform", WiseFT(alpha=0.3), WiseFT(alpha=1.4), Weighted(), Cosine()]


def _n(method):
    return 1 if isinstance(method, WiseFT) else 3


def _check(got, base, fts, method, what):
    for k, w0 in base.items():
        if not w0.is_floating_point():
            continue
        ref = expected(method, w0, [f[k] for f in fts])
        gain = 3.0  # coefficients up to ~1.4 in size, of either sign
        tol = merge_tolerance(ref, w0, [f[k] for f in fts], got[k].dtype) * gain
        assert_within(got[k], ref, tol, f"{what} {k}")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: getattr(m, "name", m))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_in_memory_methods_match_their_formula(method, backend, device):
    base, fts = make_models(_n(method), torch.float32)
    base = {k: v.to(device) for k, v in base.items()}
    fts = [{k: v.to(device) for k, v in f.items()} for f in fts]
    report = modelstock.MergeReport()
    got = modelstock.merge(base, fts, method=method, backend=backend, report=report)
    _check(got, base, fts, method, backend)
    assert report.method == getattr(method, "name", method)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: getattr(m, "name", m))
def test_file_merges_carry_any_method(tmp_path, method, monkeypatch):
    base, fts = make_models(_n(method), torch.bfloat16)
    paths = save_models(tmp_path, base, fts)
    modelstock.merge_files(paths[0], paths[1:], tmp_path / "cpu.safetensors", method=method)
    _check(load_file(tmp_path / "cpu.safetensors"), base, fts, method, "numpy")
    if not torch.cuda.is_available():
        monkeypatch.setattr(gpu_pipeline, "check_device", lambda device: torch.device("cpu"))
    modelstock.merge_files(paths[0], paths[1:], tmp_path / "dev.safetensors", method=method, device="cuda",
                           backend="triton", chunk_size=600)
    _check(load_file(tmp_path / "dev.safetensors"), base, fts, method, "gpu pipeline")


def test_model_stock_is_the_default_and_keeps_its_figures():
    base, fts = make_models(2, torch.float32)
    r1, r2 = modelstock.MergeReport(), modelstock.MergeReport()
    a = modelstock.merge(base, fts, report=r1)
    b = modelstock.merge(base, fts, method=modelstock.methods.ModelStock(), report=r2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert r1.to_dict()["method"] == "model_stock" and r1.layers[0].cos is not None
    assert [s.t for s in r1.layers] == [s.t for s in r2.layers]


def test_cli_method_options(tmp_path, capsys):
    base, fts = make_models(2, torch.float32)
    paths = [str(p) for p in save_models(tmp_path, base, fts)]
    assert main(["merge", paths[0], paths[1], "-o", str(tmp_path / "w.safetensors"), "--method", "wise_ft",
                 "--alpha", "0.25", "--quiet"]) == 0
    _check(load_file(tmp_path / "w.safetensors"), base, fts[:1], WiseFT(alpha=0.25), "cli wise_ft")
    assert main(["merge", *paths, "-o", str(tmp_path / "u.safetensors"), "--method", "uniform"]) == 0
    _check(load_file(tmp_path / "u.safetensors"), base, fts, "uniform", "cli uniform")
    assert "Merged 2 fine-tuned checkpoints" in capsys.readouterr().out  # the summary, without angles
    assert main(["merge", *paths, "-o", str(tmp_path / "p.safetensors"), "--method", "uniform", "--plot",
                 str(tmp_path / "p.png")]) == 2
    assert "--plot draws Model Stock's" in capsys.readouterr().err
    assert main(["merge", *paths, "-o", str(tmp_path / "e.safetensors"), "--method", "wise_ft"]) == 2
    assert capsys.readouterr().err.strip() == ("modelstock: error: wise_ft needs exactly 1 fine-tuned "
                                               "checkpoint(s), got 2")
    assert main(["merge", *paths, "-o", str(tmp_path / "e.safetensors"), "--alpha", "0.3"]) == 2
    assert "--alpha is WiSE-FT's" in capsys.readouterr().err


def test_methods_without_statistics_still_name_a_nan_input(tmp_path):
    base, fts = make_models(2, torch.float32)
    fts[1]["proj.weight"][1, 2] = float("nan")
    with pytest.raises(InputError, match=r"finetuned\[1\]: tensor .proj.weight.: holds NaN or inf"):
        modelstock.merge(base, fts, method="uniform")
    paths = save_models(tmp_path, base, fts)
    with pytest.raises(InputError, match="ft1.safetensors: tensor .proj.weight.: holds NaN or inf"):
        modelstock.merge_files(paths[0], paths[1:], tmp_path / "o.safetensors", method="uniform")
    assert not (tmp_path / "o.safetensors").exists()


def test_periodic_merge_takes_a_method():
    torch.manual_seed(0)
    nets = [torch.nn.Linear(6, 4) for _ in range(2)]
    pre = {k: v.clone() for k, v in nets[0].state_dict().items()}
    nets[1].load_state_dict(pre)
    with torch.no_grad():
        for i, n in enumerate(nets):
            n.weight.add_(0.1 * (i + 1))
    want = {k: (nets[0].state_dict()[k] + nets[1].state_dict()[k]) / 2 for k in pre}
    modelstock.PeriodicMerge(pre, nets, method="uniform").merge()
    for n in nets:
        for k, v in n.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)


def test_unknown_method_is_one_line():
    base, fts = make_models(2, torch.float32)
    with pytest.raises(ValueError, match="method must be one of"):
        modelstock.merge(base, fts, method="ties")


def test_row_coefficients_reach_the_kernels_per_segment(device):
    # Cosine at row granularity: each row its own per-model weights (the kernel's (segment, i) table)
    base, fts = make_models(3, torch.float32)
    got = modelstock.merge({k: v.to(device) for k, v in base.items()}, [{k: v.to(device) for k, v in f.items()}
                           for f in fts], method=Cosine(), granularity="row", backend="triton")
    for k, w0 in base.items():
        rows = w0.reshape(w0.shape[0], -1) if w0.ndim >= 2 else w0.reshape(1, -1)
        ds = [f[k].double().reshape(rows.shape) - rows.double() for f in fts]
        coef = torch.stack([1 / (d.norm(dim=1) + 1e-12) / 3 for d in ds], 1)  # (rows, N)
        ref = (rows.double() + sum(coef[:, i:i + 1] * d for i, d in enumerate(ds))).reshape(w0.shape)
        assert_within(got[k], ref, merge_tolerance(ref, w0, [f[k] for f in fts], torch.float32) * 3, k)


def _sharded_rank(rank, world, init_file):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .test_sharded import check_equal_to_single_process, full_state, models_from, net

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        real, calls = dist.all_reduce, []
        # merge_ = InPlaceMerge built and run once: the ranks agree twice (after the checks at
        # construction, before the merge: merging/agreement.py), then the Gram's all-reduce for
        # a method that needs it
        for method, granularity, collectives in (("uniform", "tensor", 2), (Cosine(), "row", 3)):
            torch.manual_seed(0)
            base = net()
            base_sd = {k: v.clone() for k, v in base.state_dict().items()}
            models = models_from(base, 2, seed=3)
            snapshot = [full_state(m) for m in models]
            for m in models:
                fully_shard(m, mesh=mesh)
            calls.clear()
            dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
            try:
                modelstock.merge_(models, base_sd, models, method=method, granularity=granularity)
            finally:
                dist.all_reduce = real
            assert len(calls) == collectives  # a method without statistics needs no Gram all-reduce
            check_equal_to_single_process(models, base_sd, snapshot, method=method, granularity=granularity)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_merges_carry_any_method(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_rank, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
