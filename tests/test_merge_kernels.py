"""The Triton merge kernels (msdp_kernels/merge.py) against the reference, on CPU tensors under
TRITON_INTERPRET=1 (tests/conftest.py) or on CUDA where there is one. Small tensors: the
interpreter pays ~0.5 ms per program."""
import pytest
import torch
from torch import nn

import modelstock
from msdp_kernels import merge as kmerge
from modelstock import MergeReport

from .helpers import DEVICE, assert_within, finetuned_like, merge_tolerance, spec_merge_fp64

B2 = kmerge.block_size(2)  # elements per chunk for N = 2
T2 = kmerge.tile_size(2, 2)  # elements per program for N = 2 in a 2-byte dtype (several chunks)


def models(shapes, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{} for _ in range(n)]
    for k, w0 in base.items():
        for ft, w in zip(fts, finetuned_like(w0, n, cos=0.4, generator=g)):
            ft[k] = w.to(dtype).to(DEVICE)
    return {k: v.to(dtype).to(DEVICE) for k, v in base.items()}, fts


def check(out, base, fts, granularity="tensor", clamp=True, out_dtype=None):
    ref_impl = modelstock.merge(base, fts, granularity=granularity, clamp=clamp, out_dtype=out_dtype, backend="torch")
    for k, w0 in base.items():
        ref, t = spec_merge_fp64(w0.cpu(), [f[k].cpu() for f in fts], granularity=granularity, clamp=clamp)
        dtype = out_dtype or w0.dtype
        assert out[k].dtype == dtype and out[k].shape == w0.shape, k
        tol = merge_tolerance(ref, w0.cpu(), [f[k].cpu() for f in fts], dtype, t=t)
        assert_within(out[k].cpu(), ref, tol, k)
        assert_within(out[k].cpu(), ref_impl[k].cpu().double(), 2 * tol, k)


ODD = {"one": (1,), "seven": (7,), "prime": (1031,), "just_over": (B2 + 1,), "several": (3, B2 + 5), "scalar": (),
       "tiles": (2 * T2 + B2 + 13,)}  # two full tiles of any dtype, then full chunks and a rest


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_parity_odd_sizes(n, dtype):
    base, fts = models(ODD, n, dtype)
    check(modelstock.merge(base, fts, backend="triton"), base, fts)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_dtypes(out_dtype):
    base, fts = models({"w": (5, 311), "b": (311,)}, 2, torch.float32)
    check(modelstock.merge(base, fts, backend="triton", out_dtype=out_dtype), base, fts, out_dtype=out_dtype)


@pytest.mark.parametrize("clamp", [True, False])
def test_row_granularity_and_clamp(clamp):
    base, fts = models({"conv": (6, 3, 3, 3), "lin": (37, 23), "bias": (37,)}, 3)
    # one row pointing away: negative cos there, so clamp matters
    fts[1]["lin"][4] = 2 * base["lin"][4] - fts[0]["lin"][4]
    report = MergeReport()
    out = modelstock.merge(base, fts, backend="triton", granularity="row", clamp=clamp, report=report)
    check(out, base, fts, granularity="row", clamp=clamp)
    lin = next(layer for layer in report.layers if layer.name == "lin")
    assert lin.rows == 37 and (lin.rows_clamped > 0) == clamp


def test_many_tiny_tensors_and_one_large():
    shapes = {f"block{i}.ln.bias": (i % 5 + 1,) for i in range(60)}
    shapes["embed"] = (4 * B2 + 3,)
    base, fts = models(shapes, 2)
    report = MergeReport()
    out = modelstock.merge(base, fts, backend="triton", report=report)
    check(out, base, fts)
    ref = MergeReport()
    modelstock.merge(base, fts, backend="torch", report=ref)
    for a, b in zip(report.layers, ref.layers):
        assert a.name == b.name and a.t == pytest.approx(b.t, rel=1e-6, abs=1e-9)


def test_non_contiguous_inputs_are_made_contiguous():
    base, fts = models({"w": (40, 30)}, 2)
    tb = {"w": base["w"].t().contiguous().t()}  # same values, column-major
    tf = [{"w": f["w"].t().contiguous().t()} for f in fts]
    assert not tb["w"].is_contiguous()
    out = modelstock.merge(tb, tf, backend="triton")
    check(out, base, fts)


def test_deterministic():
    base, fts = models({"a": (3 * B2 + 1,), "b": (17, 13)}, 3)
    r1, r2 = MergeReport(), MergeReport()
    o1 = modelstock.merge(base, fts, backend="triton", report=r1)
    o2 = modelstock.merge(base, fts, backend="triton", report=r2)
    assert all(torch.equal(o1[k], o2[k]) for k in o1)
    assert [la.cos_pairs for la in r1.layers] == [la.cos_pairs for la in r2.layers]


def test_nan_is_refused_naming_the_input():
    base, fts = models({"a": (100,), "b": (50,)}, 2)
    fts[1]["b"][7] = float("nan")
    with pytest.raises(modelstock.InputError, match="NaN or inf") as e:
        modelstock.merge(base, fts, backend="triton")
    assert (e.value.source, e.value.tensor) == ("finetuned[1]", "b")


def test_in_place_merge_with_a_nan_leaves_every_model_untouched():
    # the merge pass is launched before the host's check: it must write nothing at all
    torch.manual_seed(2)
    net = lambda: nn.Sequential(nn.Linear(6, 20), nn.Linear(20, 2)).to(DEVICE)  # noqa: E731
    base, m1, m2 = net(), net(), net()
    with torch.no_grad():
        m2[1].bias[0] = float("nan")
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (m1, m2)]
    with pytest.raises(modelstock.InputError, match="NaN or inf"):
        modelstock.merge_([m1, m2], base, [m1, m2], backend="triton")
    for m, saved in zip((m1, m2), before):
        assert all(torch.equal(v, saved[k]) or torch.allclose(v, saved[k], equal_nan=True, rtol=0, atol=0)
                   for k, v in m.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # tiles of one chunk, of several
def test_gram_launcher_against_fp64_with_segments(dtype):
    # Two layers, the second cut into 3 rows: 4 segments, tiles never crossing one.
    n = 3
    block = kmerge.tile_size(4, dtype.itemsize)
    a, b = torch.randn(n + 1, 2 * block + kmerge.block_size(4) + 9), torch.randn(n + 1, 3 * 101)
    a, b = a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)
    inputs = kmerge.Addresses([list(a), list(b)], DEVICE)
    tiles, tile_seg, seg_tiles = kmerge.tile_table([a.shape[1], b.shape[1]], [1, 3], block, DEVICE)
    covered = torch.zeros(a.shape[1] + b.shape[1], dtype=torch.int64)
    for layer, start, end in tiles.cpu().tolist():
        lo = start + (0 if layer == 0 else a.shape[1])
        covered[lo: lo + min(block, end - start)] += 1
    assert torch.equal(covered, torch.ones_like(covered))  # every element in exactly one tile
    assert all(end - start <= block for _, start, end in tiles.cpu().tolist())
    g = kmerge.gram(inputs, tiles, seg_tiles, n, kmerge.aligned(False, inputs)).cpu()
    segs = [a.cpu().double()] + [b.cpu().double()[:, r * 101:(r + 1) * 101] for r in range(3)]
    for s, w in enumerate(segs):
        d = w[1:] - w[0]
        ref = d @ d.T
        assert torch.allclose(g[s], ref, rtol=1e-6, atol=1e-9), s


def test_merge_in_place_into_the_models_being_trained():
    torch.manual_seed(0)
    net = lambda: nn.Sequential(nn.Linear(9, 31), nn.LayerNorm(31), nn.Linear(31, 3)).to(DEVICE)  # noqa: E731
    base, m1, m2 = net(), net(), net()
    want = modelstock.merge(base, [m1, m2], backend="torch")
    report = MergeReport()
    modelstock.merge_([m1, m2], base, [m1, m2], backend="triton", report=report)
    for sd in (m1.state_dict(), m2.state_dict()):
        for k, v in want.items():
            assert_within(sd[k].cpu(), v.cpu().double(), 4 * torch.finfo(torch.float32).eps * (1 + v.cpu().double().abs()), k)
    assert len(report.layers) == len(want)
    # The second merge of the same models reuses the cached tables.
    from modelstock.backends import triton as triton_merge

    plans = len(triton_merge._PLANS)
    modelstock.merge_([m1, m2], base, [m1, m2], backend="triton")
    assert len(triton_merge._PLANS) == plans
    # After merging, both models hold the same weights: merging again gives t = 0 (no update)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_in_place_merge_planned_once_runs_many_times():
    torch.manual_seed(1)
    net = lambda: nn.Sequential(nn.Linear(6, 20), nn.Linear(20, 2)).to(DEVICE)  # noqa: E731
    base, m1, m2, out = net(), net(), net(), net()
    merger = modelstock.InPlaceMerge([out], base, [m1, m2], backend="triton")
    for step in range(2):  # the fine-tuned models move between merges; the plan stays valid
        with torch.no_grad():
            for p in list(m1.parameters()) + list(m2.parameters()):
                p.add_(0.01 * torch.randn_like(p))
        merger()
        want = modelstock.merge(base, [m1, m2], backend="torch")
        for k, v in out.state_dict().items():
            assert_within(v.cpu(), want[k].cpu().double(), 4 * torch.finfo(torch.float32).eps * (1 + want[k].cpu().double().abs()), k)
