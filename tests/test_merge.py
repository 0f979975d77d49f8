"""modelstock.merge (in memory) against the spec's formula computed independently in fp64."""
import math

import pytest
import torch
from torch import nn

import modelstock
from modelstock import InputError, MergeReport
from modelstock.reference import gram, merge_into

from .helpers import assert_within, finetuned_like, merge_tolerance, spec_merge_fp64

# Shapes a state dict holds: matrices, odd sizes, a conv filter bank, LayerNorm vectors, a scalar.
SHAPES = {
    "proj.weight": (37, 23),
    "proj.bias": (37,),
    "conv.weight": (6, 3, 3, 3),
    "ln.weight": (257,),
    "embed": (513, 8),
    "logit_scale": (),
    "one": (1,),
}


def make_models(n, dtype=torch.float32, cos=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = [{} for _ in range(n)]
    for k, w0 in base.items():
        for ft, w in zip(fts, finetuned_like(w0, n, cos=cos, generator=g)):
            ft[k] = w.to(dtype)
    return {k: v.to(dtype) for k, v in base.items()}, fts


def check_against_spec(out, base, fts, *, granularity="tensor", clamp=True, out_dtype=None, compute_dtype=torch.float32):
    assert list(out) == list(base)
    for k, w0 in base.items():
        ref, t = spec_merge_fp64(w0, [f[k] for f in fts], granularity=granularity, clamp=clamp)
        dtype = out_dtype or w0.dtype
        assert out[k].dtype == dtype and out[k].shape == w0.shape
        tol = merge_tolerance(ref, w0, [f[k] for f in fts], dtype, compute_dtype, t)
        assert_within(out[k], ref, tol, k)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_merge_matches_fp64_formula(n, dtype, granularity):
    base, fts = make_models(n, dtype)
    out = modelstock.merge(base, fts, granularity=granularity)
    check_against_spec(out, base, fts, granularity=granularity)


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("n", [2, 3])
def test_clamp_on_and_off_with_opposed_updates(clamp, n):
    # Updates that point away from each other: the mean cos is negative (about -0.6 for N = 2,
    # -0.2 for N = 3), far enough from -1/(N-1) that the formula is well conditioned.
    base, fts = make_models(n, cos=0.0)
    for k, w0 in base.items():
        d = torch.randn(w0.shape) * 1e-2
        fts[0][k] = w0 + d
        fts[1][k] = w0 - 0.4 * d + 0.5e-2 * torch.randn(w0.shape)
    report = MergeReport()
    out = modelstock.merge(base, fts, clamp=clamp, report=report)
    check_against_spec(out, base, fts, clamp=clamp)
    for layer in report.layers:
        _, t = spec_merge_fp64(base[layer.name], [f[layer.name] for f in fts], clamp=clamp)
        assert layer.t == pytest.approx(float(t), rel=1e-6, abs=1e-12)
        assert layer.clamped == (clamp and layer.cos == 0.0)
    if clamp and n == 2:  # every layer's cos is negative: t = 0, the base is kept exactly
        assert all(layer.clamped and layer.t == 0 for layer in report.layers)
        assert all(torch.equal(out[k], base[k]) for k in base)
    if not clamp:
        assert any(layer.t < 0 for layer in report.layers)


def test_one_element_layer_with_opposite_updates():
    # logit_scale-like: two updates of opposite sign. The authors' formula extrapolates far
    # (cos close to -1); the project's clamp keeps the base.
    base = {"logit_scale": torch.tensor(4.6)}
    fts = [{"logit_scale": torch.tensor(4.7)}, {"logit_scale": torch.tensor(4.55)}]
    clamped = modelstock.merge(base, fts)
    assert clamped["logit_scale"] == base["logit_scale"]
    raw = modelstock.merge(base, fts, clamp=False)
    ref, t = spec_merge_fp64(base["logit_scale"], [f["logit_scale"] for f in fts], clamp=False)
    assert float(t) < -100  # what mergekit and the authors' code produce here
    tol = merge_tolerance(ref, base["logit_scale"], [f["logit_scale"] for f in fts], torch.float32, t=t)
    assert_within(raw["logit_scale"], ref, tol, "logit_scale")


def test_undefined_ratio_without_clamp_is_an_error():
    # d2 = -d1 with |d|^2 >> eps: cos rounds to -1 exactly and 1 + (N - 1) cos = 0.
    base = {"w": torch.zeros(4)}
    fts = [{"w": torch.full((4,), 1e6)}, {"w": torch.full((4,), -1e6)}]
    with pytest.raises(InputError, match="undefined") as e:
        modelstock.merge(base, fts, clamp=False)
    assert e.value.tensor == "w"
    assert torch.equal(modelstock.merge(base, fts)["w"], base["w"])  # clamp on: t = 0


def test_degenerate_layer_gives_base_and_no_nan():
    base, fts = make_models(3)
    for f in fts:
        f["proj.weight"] = base["proj.weight"].clone()
    fts[0]["ln.weight"] = base["ln.weight"].clone()  # one zero update among non-zero ones
    report = MergeReport()
    out = modelstock.merge(base, fts, report=report)
    assert torch.equal(out["proj.weight"], base["proj.weight"])
    stats = {layer.name: layer for layer in report.layers}
    assert stats["proj.weight"].t == 0 and stats["proj.weight"].norms == [0.0, 0.0, 0.0]
    assert all(math.isfinite(v) for layer in report.layers for v in [layer.t, layer.cos, *layer.cos_pairs])
    check_against_spec(out, base, fts)


def test_fp64_compute_matches_formula_to_fp64_rounding():
    base, fts = make_models(3, torch.float64)
    out = modelstock.merge(base, fts, compute_dtype=torch.float64)
    check_against_spec(out, base, fts, compute_dtype=torch.float64)


def test_out_dtype_and_mixed_input_dtypes():
    base, fts = make_models(2)
    fts[0] = {k: v.to(torch.bfloat16) for k, v in fts[0].items()}
    fts[1] = {k: v.to(torch.float16) for k, v in fts[1].items()}
    out = modelstock.merge(base, fts, out_dtype=torch.bfloat16)
    check_against_spec(out, base, fts, out_dtype=torch.bfloat16)


def test_exclude_gets_plain_average():
    base, fts = make_models(3)
    report = MergeReport()
    out = modelstock.merge(base, fts, exclude=["proj.*", "logit_scale"], report=report)
    for k in ("proj.weight", "proj.bias", "logit_scale"):
        ref = sum(f[k].double() for f in fts) / 3
        assert_within(out[k], ref, merge_tolerance(ref, base[k], [f[k] for f in fts], torch.float32), k)
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds["proj.weight"] == "average" and kinds["conv.weight"] == "merge"


def test_non_float_buffers_copied_or_chosen_by_policy():
    base, fts = make_models(2)
    for sd in [base, *fts]:
        sd["bn.num_batches_tracked"] = torch.tensor(7)
    out = modelstock.merge(base, fts)
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == 7
    fts[1]["bn.num_batches_tracked"] = torch.tensor(8)
    assert int(modelstock.merge(base, fts)["bn.num_batches_tracked"]) == 8  # the largest, by default
    assert int(modelstock.merge(base, fts, int_tensors="base")["bn.num_batches_tracked"]) == 7
    with pytest.raises(InputError) as e:
        modelstock.merge(base, fts, int_tensors="refuse")
    assert e.value.source == "finetuned[1]" and e.value.tensor == "bn.num_batches_tracked"


@pytest.mark.parametrize("where", ["base", "finetuned[0]", "finetuned[1]"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_refused_naming_the_input(where, bad):
    base, fts = make_models(2)
    sds = {"base": base, "finetuned[0]": fts[0], "finetuned[1]": fts[1]}
    sds[where]["conv.weight"][1, 2, 0, 1] = bad
    with pytest.raises(InputError, match="NaN or inf") as e:
        modelstock.merge(base, fts)
    assert (e.value.source, e.value.tensor) == (where, "conv.weight")


def test_nan_in_excluded_layer_is_refused():
    base, fts = make_models(2)
    fts[1]["proj.bias"][3] = float("nan")
    with pytest.raises(InputError, match="NaN or inf") as e:
        modelstock.merge(base, fts, exclude=["proj.bias"])
    assert (e.value.source, e.value.tensor) == ("finetuned[1]", "proj.bias")


def test_mismatches_are_refused_naming_input_and_tensor():
    base, fts = make_models(2)
    missing = dict(fts[1])
    del missing["embed"]
    with pytest.raises(InputError, match="missing") as e:
        modelstock.merge(base, [fts[0], missing])
    assert (e.value.source, e.value.tensor) == ("finetuned[1]", "embed")
    extra = dict(fts[0], extra=torch.zeros(2))
    with pytest.raises(InputError, match="not in the base") as e:
        modelstock.merge(base, [extra, fts[1]])
    assert (e.value.source, e.value.tensor) == ("finetuned[0]", "extra")
    wrong = dict(fts[0], embed=torch.zeros(513, 9))
    with pytest.raises(InputError, match="shape") as e:
        modelstock.merge(base, [wrong, fts[1]])
    assert e.value.tensor == "embed"
    with pytest.raises(InputError, match="at least two"):
        modelstock.merge(base, [fts[0]])


def test_modules_and_wrapper_prefixes():
    torch.manual_seed(1)
    net = lambda: nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 2))  # noqa: E731
    base, a, b = net(), net(), net()
    wrapped = {"module." + k: v for k, v in b.state_dict().items()}  # DDP / open_clip naming
    out = modelstock.merge(base, [a, wrapped])
    assert list(out) == list(base.state_dict())
    ref = modelstock.merge(base.state_dict(), [a.state_dict(), b.state_dict()])
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    fresh = net()
    fresh.load_state_dict(out, strict=True)


def test_result_does_not_alias_inputs_or_keep_stacks():
    base, fts = make_models(2)
    out = modelstock.merge(base, fts)
    for k, v in out.items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
        assert v.data_ptr() not in {base[k].data_ptr(), fts[0][k].data_ptr(), fts[1][k].data_ptr()} or v.numel() == 0


def test_report_figures_match_definitions():
    base, fts = make_models(3)
    report = MergeReport()
    modelstock.merge(base, fts, report=report)
    layer = next(la for la in report.layers if la.name == "embed")
    ds = [(f["embed"].double() - base["embed"].double()).flatten() for f in fts]
    assert layer.norms == pytest.approx([float(d.norm()) for d in ds], rel=1e-6)
    pairs = [float(ds[i] @ ds[j] / (ds[i].norm() * ds[j].norm() + 1e-8)) for i in range(3) for j in range(i + 1, 3)]
    assert layer.cos_pairs == pytest.approx(pairs, rel=1e-6)
    assert layer.angle_deg == pytest.approx(math.degrees(math.acos(sum(pairs) / 3)), rel=1e-6)
    assert layer.t == pytest.approx(3 * layer.cos / (1 + 2 * layer.cos), rel=1e-9)


def test_the_angle_is_the_updates_even_where_the_clamp_acts():
    """The clamp decides t; the reported angle is between the updates as they are (above 90
    degrees when they point apart), not the clamped cos's 90."""
    torch.manual_seed(0)
    base = {"w": torch.randn(64)}
    d = 0.01 * torch.randn(64)
    fts = [{"w": base["w"] + d}, {"w": base["w"] - d + 0.005 * torch.randn(64)}]
    report = MergeReport()
    modelstock.merge(base, fts, report=report)
    (layer,) = report.layers
    d1, d2 = (f["w"].double() - base["w"].double() for f in fts)
    angle = math.degrees(math.acos(float(d1 @ d2 / (d1.norm() * d2.norm() + 1e-8))))
    assert layer.clamped and layer.t == 0 and angle > 120
    assert layer.angle_deg == pytest.approx(angle, rel=1e-6)


@pytest.mark.parametrize("rows,k", [(1, 25_000), (1, 257), (3, 100_003), (41, 300), (2, 1)])
def test_gram_accumulates_like_fp64(rows, k):
    # Large-magnitude, same-sign products are where a sequential fp32 sum drifts.
    w = 1 + torch.rand(3, rows * k)
    got = gram(w[0], [w[1], w[2]], rows)
    w64 = w.double().view(3, rows, k)
    d = (w64[1:] - w64[:1]).transpose(0, 1)
    ref = torch.bmm(d, d.transpose(1, 2))
    # The deltas are rounded once to fp32 (the spec's fp32 arithmetic); the sums add ~nothing.
    bound = 4 * torch.finfo(torch.float32).eps * torch.bmm(d.abs(), d.abs().transpose(1, 2))
    assert ((got - ref).abs() <= bound).all()


def test_bad_options():
    base, fts = make_models(2)
    with pytest.raises(ValueError, match="granularity"):
        modelstock.merge(base, fts, granularity="column")
    with pytest.raises(ValueError, match="backend"):
        modelstock.merge(base, fts, backend="cuda")
    with pytest.raises(ValueError, match="fp32"):
        modelstock.merge(base, fts, backend="triton", compute_dtype=torch.float64)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    base, fts = make_models(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        modelstock.merge(base, fts, backend="triton")
    # "auto" never picks the kernels for CPU tensors
    from modelstock.backends import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("rows,k", [(1, 1), (1, 300_007), (5, 70_001), (700, 3)])
@pytest.mark.parametrize("alias", ["none", "base", "first"])
def test_merge_into_tiles_cover_every_element(rows, k, alias):
    # Sizes around the tile size: every element written once, rows get their own t, in place ok.
    w0, w1, w2, w3 = torch.randn(4, rows * k)
    t = torch.rand(rows, dtype=torch.float64)
    want = w0.double().view(rows, k) + t[:, None] * ((w1 + w2 + w3).double().view(rows, k) / 3 - w0.double().view(rows, k))
    out = {"none": torch.full_like(w0, float("nan")), "base": w0.clone(), "first": w1.clone()}[alias]
    args = {"base": (out, [w1, w2, w3]), "first": (w0, [out, w2, w3])}.get(alias, (w0, [w1, w2, w3]))
    tol = merge_tolerance(want.view(-1), w0, [w1, w2, w3], torch.float32)
    merge_into(out, args[0], args[1], t)
    assert_within(out, want.view(-1), tol, "merge_into")


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("path", ["torch", "numpy", "numpy-from-gram", "triton"])
def test_merged_layer_rounds_once_at_the_weights_magnitude(n, path):
    # Fine-tuned weights: w_i = w0 + small deltas. The merge takes the mean of the deltas, so
    # its only rounding at the weights' magnitude is the final add: within half an fp32 ulp
    # of the exact value, plus the deltas' own roundings. (The mean of the weights, minus w0,
    # rounds twice there: up to (1 + t) / 2 ulp, which this bound refuses.)
    import numpy as np

    from modelstock.backends import numpy_ops as stream_math

    from .helpers import DEVICE

    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(300_007, generator=g)
    ws = finetuned_like(w0, n, cos=0.4, scale=1e-3, generator=g)
    t = torch.tensor([0.6], dtype=torch.float64)
    exact = w0.double() + t * (sum(w.double() for w in ws) / n - w0.double())
    if path == "torch":
        got = merge_into(torch.empty_like(w0), w0, ws, t)
    elif path == "triton":
        got = modelstock.merge({"w": w0.to(DEVICE)}, [{"w": w.to(DEVICE)} for w in ws], backend="triton")["w"]
        # t from the inputs (about 0.4 * 2 / 1.4 for N = 2): the bound below takes it from the report
        report = MergeReport()
        modelstock.merge({"w": w0}, [{"w": w} for w in ws], backend="torch", report=report)
        t = torch.tensor([report.layers[0].t], dtype=torch.float64)
        exact = w0.double() + t * (sum(w.double() for w in ws) / n - w0.double())
    else:
        a0, arrays = w0.numpy(), [w.numpy() for w in ws]
        out = np.empty_like(a0)
        if path == "numpy":
            stream_math.merge_into(out, a0, arrays, t.numpy())
        else:
            stream_math.gram(a0, arrays, 1, mean_delta=out)
            stream_math.merge_from_mean_delta(out, a0, t.numpy())
        got = torch.from_numpy(out)
    eps = torch.finfo(torch.float32).eps
    deltas = torch.stack([(w - w0).double().abs() for w in ws]).amax(0)
    bound = 0.5 * eps * exact.abs() * (1 + eps) + (n + 2) * eps * float(t) * deltas
    assert_within(got.cpu(), exact, bound, path)
