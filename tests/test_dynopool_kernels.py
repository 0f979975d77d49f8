"""DynOPool's Triton kernels (under TRITON_INTERPRET=1 on CPU) against the fp64 reference.

The kernels take their coordinates from a table (msdp_kernels.dynopool.coordinates), so the checks
are split where the rounding is: the table against the reference's fp64 `queries` and their
fp64 autograd derivatives; the operator (forward, gradients to x, alpha and delta) against the
fp64 reference evaluated at the table's own coordinates, with bounds from the few fp32
roundings each output or gradient goes through and one unit in the last place of the stored
dtype (the interpreter truncates low-precision stores)."""
import pytest
import torch
import torch.nn.functional as F

from dynopool import DynOPool2d, dynopool2d
from dynopool import pool as pool_module
from dynopool import reference
from msdp_kernels import dynopool as k

from .helpers import DEVICE, assert_within

EPS32 = torch.finfo(torch.float32).eps
# alpha, delta, (N, C, H, W): downsampling, upsampling (alpha < 1), queries clamped at the
# borders (large delta), odd and prime sizes, channel counts that are not powers of two.
CONFIGS = [((1.7, 2.3), (0.31, 0.18), (2, 3, 11, 9)), ((0.73, 1.31), (0.21, 0.43), (1, 2, 5, 7)),
           ((2.6, 3.1), (0.9, 1.4), (2, 5, 13, 12)), ((1.0, 4.4), (-0.05, 0.27), (1, 3, 8, 17)),
           ((1.3, 0.6), (0.3, 0.2), (2, 3, 1, 9))]  # one input row: every tap on it


def layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def truth(x, alpha, delta, grad):
    """fp64 reference (on the CPU) at the kernels' coordinates: out, g_x, and (g_alpha,
    g_delta) as the reduction of the reference's coordinate gradients times fp64 d y / d
    (alpha, delta); plus the bounds' scales and each output's 4 query values."""
    n, c, h, w = x.shape
    a = alpha.detach().double().cpu().requires_grad_()
    d = delta.detach().double().cpu().requires_grad_()
    a_vals = a.tolist()
    h_out, w_out = reference.output_size(h, a_vals[0]), reference.output_size(w, a_vals[1])
    tab, _ = k.coordinates(alpha.detach().float().to(DEVICE), delta.detach().float().to(DEVICE), h, w, h_out, w_out)
    tab = tab.cpu().double()
    yq = tab[: 2 * h_out].clone().requires_grad_()
    xq = tab[6 * h_out: 6 * h_out + 2 * w_out].clone().requires_grad_()
    x64 = x.detach().double().cpu().contiguous().requires_grad_()
    grad = grad.detach().double().cpu()
    out = reference.sample_at(x64, yq, xq)
    g_x, g_y, g_u = torch.autograd.grad(out, (x64, yq, xq), grad)
    # d y / d (alpha, delta) in fp64 through the reference's straight-through size and queries
    jac = []
    for axis, (size, size_out) in enumerate(((h, h_out), (w, w_out))):
        y = reference.queries(size, size_out, reference.straight_through_size(size, a[axis], size_out), d[axis])
        y = y.T.reshape(-1)
        jac.append(_jacobian(y, a, d, axis))
    g_alpha = torch.stack([g_y @ jac[0][0], g_u @ jac[1][0]])
    g_delta = torch.stack([g_y @ jac[0][1], g_u @ jac[1][1]])
    # scales for the bounds: sum over outputs of |grad| |d q / d y| |factor|, and g_x with |grad|
    (g_x_abs,) = torch.autograd.grad(
        reference.sample_at(x64, yq.detach(), xq.detach()), x64, grad.abs())
    big = x64.detach().abs().max()
    factor = max(float(jac[0].abs().max()), float(jac[1].abs().max()))
    coord_scale = grad.abs().sum() * 2 * big * factor
    # the 4 query values of every output, (n, c, h_out, w_out, 4), for finding near ties
    a_y, a_x = reference.interpolation_matrix(yq.detach(), h), reference.interpolation_matrix(xq.detach(), w)
    q = (a_y @ x64.detach() @ a_x.T).view(n, c, h_out, 2, w_out, 2).permute(0, 1, 2, 4, 3, 5)
    return out.detach(), g_x, g_alpha, g_delta, g_x_abs, coord_scale, big, q.reshape(n, c, h_out, w_out, 4)


def near_ties(q, tol):
    """Outputs whose two largest queries are within ``tol`` of each other (fp64 values): there
    the kernel's fp32 arithmetic may pick either winner, so their gradients are not compared."""
    top2 = q.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) <= tol


def _jacobian(y, a, d, axis):
    rows = [torch.autograd.grad(y[r], (a, d), retain_graph=True, allow_unused=True) for r in range(y.numel())]
    da = torch.stack([(ga if ga is not None else torch.zeros(2, dtype=y.dtype))[axis] for ga, _ in rows])
    dd = torch.stack([(gd if gd is not None else torch.zeros(2, dtype=y.dtype))[axis] for _, gd in rows])
    return torch.stack([da, dd])


def ulp(t, dtype):
    return torch.finfo(dtype).eps * t.abs()


def check_operator(x, alpha, delta):
    """dynopool2d(backend="triton") forward and every gradient against `truth`, x on DEVICE
    in the layout under test. Outputs at near ties get a zero upstream gradient (in both), so
    every gradient is compared at the usual bound; returns how many there were."""
    xk = x.detach().requires_grad_()  # the very strides under test (a view stays a view)
    a = alpha.detach().to(DEVICE).requires_grad_()
    d = delta.detach().to(DEVICE).requires_grad_()
    out = dynopool2d(xk, a, d, backend="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(x.dtype)
    _, _, _, _, _, _, big, q = truth(x, alpha, delta, grad)
    fwd_tol = 8 * EPS32 * big  # each output: 3 fp32 roundings per interpolation, 3 interpolations
    ties = near_ties(q, 2 * fwd_tol)
    grad[ties] = 0
    out.backward(grad.to(DEVICE))
    want, g_x, g_alpha, g_delta, g_x_abs, coord_scale, big, _ = truth(x, alpha, delta, grad)
    assert out.shape == want.shape and out.dtype == x.dtype
    # the layout rule, the same on every backend and device: dense channels_last in,
    # channels_last out; anything else, contiguous
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert_within(out, want, fwd_tol + ulp(want, x.dtype), "forward")
    # each x gradient: a sum of grad * weight products, then the stored dtype
    assert xk.grad.dtype == x.dtype
    if xk.is_contiguous() or xk.is_contiguous(memory_format=torch.channels_last):
        assert xk.grad.stride() == xk.stride()
    assert_within(xk.grad, g_x, 4 * EPS32 * g_x_abs + ulp(g_x, x.dtype), "grad x")
    # alpha, delta: ~6 roundings per term, a <= 1024-term fp32 tree sum per program (10 levels)
    tol = torch.full((2,), 20 * EPS32 * float(coord_scale), dtype=torch.float64)
    assert_within(a.grad, g_alpha, tol, "grad alpha")
    assert_within(d.grad, g_delta, tol, "grad delta")
    return int(ties.sum())


@pytest.mark.parametrize("alpha,delta,shape", CONFIGS)
def test_coordinate_table_matches_fp64_queries_and_derivatives(alpha, delta, shape):
    h, w = shape[2:]
    # the fp64 truth at the fp32 parameters the kernel reads
    a = torch.tensor(alpha, dtype=torch.float32).double().requires_grad_()
    d = torch.tensor(delta, dtype=torch.float32).double().requires_grad_()
    sizes = [reference.output_size(h, alpha[0]), reference.output_size(w, alpha[1])]
    tab = k.coordinates(a.detach().float().to(DEVICE), d.detach().float().to(DEVICE), h, w, *sizes)[0].cpu().double()
    start = 0
    for axis, (size, size_out) in enumerate(((h, sizes[0]), (w, sizes[1]))):
        y = reference.queries(size, size_out, reference.straight_through_size(size, a[axis], size_out), d[axis])
        y = y.T.reshape(-1)  # interleaved r = 2 i + k, as the table
        fa, fd = _jacobian(y, a, d, axis)
        s = size / size_out
        # s, the centre, the spread and their sum each round once in fp32
        y_tol = torch.full_like(y, 4 * EPS32 * (size + abs(delta[axis]) * s + 1))
        assert_within(tab[start: start + 2 * size_out], y.detach(), y_tol, f"y axis {axis}")
        assert_within(tab[start + 2 * size_out: start + 4 * size_out], fa, 16 * EPS32 * fa.abs(), f"dy/dalpha {axis}")
        assert_within(tab[start + 4 * size_out: start + 6 * size_out], fd, 16 * EPS32 * fd.abs(), f"dy/ddelta {axis}")
        start += 6 * size_out


@pytest.mark.parametrize("alpha,delta,shape", CONFIGS)
def test_ranges_are_the_cells_whose_taps_touch_each_row(alpha, delta, shape, monkeypatch):
    monkeypatch.setattr(k, "_RANGE_BLOCK", 4)  # several steps of the ranges loop per axis
    h, w = shape[2:]
    sizes = [reference.output_size(h, alpha[0]), reference.output_size(w, alpha[1])]
    tab, rng = k.coordinates(torch.tensor(alpha, device=DEVICE), torch.tensor(delta, device=DEVICE), h, w, *sizes)
    rng = rng.cpu()
    tab = tab.cpu()
    start = 0
    for axis, (size, size_out) in enumerate(((h, sizes[0]), (w, sizes[1]))):
        y = tab[start: start + 2 * size_out].view(size_out, 2)
        taps = torch.stack([y.floor(), (y.floor() + 1).clamp(max=size - 1)])  # (2, out, k)
        for row in range(size):
            lo0, hi0, lo1, hi1 = rng[row + (h if axis else 0)].tolist()
            for fam, (lo, hi) in enumerate(((lo0, hi0), (lo1, hi1))):
                touching = {i for i in range(size_out) if (taps[:, i, fam] == row).any()}
                assert touching <= set(range(lo, hi)), (axis, row, fam)
                # and nothing in the range is more than one row away
                assert all(row - 1 <= float(y[i, fam]) < row + 1 for i in range(lo, hi)), (axis, row, fam)
        start += 6 * size_out


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("alpha,delta,shape", CONFIGS)
def test_operator_fp32_matches_fp64_reference(alpha, delta, shape, channels_last):
    torch.manual_seed(11)
    x = layout(torch.randn(shape, device=DEVICE), channels_last)
    check_operator(x, torch.tensor(alpha), torch.tensor(delta))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha,delta,shape", CONFIGS[:3:2])
def test_operator_low_precision_matches_fp64_reference(alpha, delta, shape, dtype, channels_last):
    torch.manual_seed(12)
    x = layout(torch.randn(shape, device=DEVICE).to(dtype), channels_last)
    check_operator(x, torch.tensor(alpha), torch.tensor(delta))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_several_blocks_and_non_contiguous_views(monkeypatch, channels_last):
    # blocks of 8 elements: several column and channel blocks, partial last blocks; the alpha /
    # delta gradient's output rows in groups of 3, the last one partial
    monkeypatch.setattr(k, "_ELEMS", 8)
    monkeypatch.setattr(k, "_GRAD_ROWS", 3)
    torch.manual_seed(13)
    big = layout(torch.randn(2, 7, 9, 14, device=DEVICE), channels_last)
    check_operator(big[:, 1:6, 2:, 1:-2], torch.tensor([1.45, 1.8]), torch.tensor([0.3, 0.2]))


@pytest.mark.parametrize("view", ["nchw", "sliced"])
def test_many_channels_run_in_channels_last_with_the_same_results_and_layouts(view):
    # NCHW inputs (and views) with many channels go through the channels_last kernels: the
    # same arithmetic on the same values, so bitwise the results of a channels_last input;
    # the output and d x still follow x's layout rule.
    from dynopool import triton_pool

    torch.manual_seed(21)
    c = triton_pool._CL_MIN_CHANNELS
    x = torch.randn(2, c + 3, 12, 11, device=DEVICE)
    x = x[:, 1:-2] if view == "sliced" else x[:, :c]
    alpha, delta = torch.tensor([1.6, 2.1], device=DEVICE), torch.tensor([0.3, 0.2], device=DEVICE)
    results = []
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        inp = inp.detach().requires_grad_()
        a, d = alpha.clone().requires_grad_(), delta.clone().requires_grad_()
        out = dynopool2d(inp, a, d, backend="triton")
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape))
        results.append((out, inp.grad, a.grad, d.grad))
    (out, gx, ga, gd), (out_cl, gx_cl, ga_cl, gd_cl) = results
    assert out.is_contiguous() and gx.is_contiguous()
    assert k.is_channels_last(out_cl) and k.is_channels_last(gx_cl)
    assert torch.equal(out, out_cl) and torch.equal(gx, gx_cl)
    assert torch.equal(ga, ga_cl) and torch.equal(gd, gd_cl)


# Millions of outputs on a GPU (near ties certain in bf16), a size the interpreter can take on
# the CPU; the check is the same.
NEAR_TIE_SHAPE = {"cuda": (8, 64, 113, 97), "cpu": (2, 16, 29, 23)}[DEVICE.type]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_at_sizes_with_near_ties(dtype, channels_last):
    torch.manual_seed(16)
    x = layout(torch.randn(NEAR_TIE_SHAPE, device=DEVICE).to(dtype), channels_last)
    ties = check_operator(x, torch.tensor([1.7, 2.3]), torch.tensor([0.25, 0.31]))
    if dtype == torch.bfloat16:  # bf16 inputs: equal taps make near (and exact) ties common
        assert ties > 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 5, 14, 10)])
def test_equals_max_pool2d_at_alpha_2_delta_quarter(shape, dtype, channels_last):
    x = layout(torch.randn(shape).to(dtype).to(DEVICE), channels_last).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out = dynopool2d(x, torch.tensor([2.0, 2.0], device=DEVICE), torch.tensor([0.25, 0.25], device=DEVICE),
                     backend="triton")
    want = F.max_pool2d(x2, 2)
    assert torch.equal(out, want)
    grad = torch.randn(want.shape).to(dtype).to(DEVICE)
    out.backward(grad)
    want.backward(grad)
    assert torch.equal(x.grad, x2.grad)


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, device=DEVICE, requires_grad=True)
    a = torch.tensor([2.0, 1.5], device=DEVICE, requires_grad=True)
    d = torch.tensor([0.25, 0.3], device=DEVICE, requires_grad=True)
    out = dynopool2d(x, a, d, backend="triton")
    assert out.shape == (0, 3, 4, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and a.grad.tolist() == [0.0, 0.0] and d.grad.tolist() == [0.0, 0.0]


def test_ties_go_to_the_first_query_and_nan_propagates():
    x = torch.ones(1, 2, 6, 6, device=DEVICE, requires_grad=True)
    a, d = torch.tensor([2.0, 2.0], device=DEVICE), torch.tensor([0.25, 0.25], device=DEVICE)
    dynopool2d(x, a, d, backend="triton").sum().backward()
    want = torch.zeros(6, 6)
    want[0::2, 0::2] = 1
    assert torch.equal(x.grad[0, 0].cpu(), want) and torch.equal(x.grad[0, 1].cpu(), want)
    # NaN wins the max (as in max_pool2d) and reaches exactly the outputs one of whose 16 taps
    # is the NaN pixel (the reference's matrix product along W spreads it over the whole row)
    y = torch.randn(1, 1, 9, 8)
    y[0, 0, 4, 2] = float("nan")
    a, d = torch.tensor([1.7, 2.3]), torch.tensor([0.3, 0.2])
    out = dynopool2d(y.to(DEVICE), a.to(DEVICE), d.to(DEVICE), backend="triton").cpu()

    def touches(size, alpha, delta, pixel):
        out_size = reference.output_size(size, alpha)
        q = reference.queries(size, out_size, torch.tensor(float(out_size)), torch.tensor(delta)).floor()
        return ((q == pixel) | ((q + 1).clamp(max=size - 1) == pixel)).any(0)  # (out,)

    want = touches(9, 1.7, 0.3, 4)[:, None] & touches(8, 2.3, 0.2, 2)[None, :]
    assert 0 < int(want.sum()) < want.numel() and torch.equal(out[0, 0].isnan(), want)


def test_backward_is_deterministic():
    torch.manual_seed(14)
    x = torch.randn(1, 2, 7, 6, device=DEVICE)
    grads = []
    for _ in range(2):
        xk = x.clone().requires_grad_()
        a = torch.tensor([0.8, 1.3], device=DEVICE, requires_grad=True)
        d = torch.tensor([0.4, 0.3], device=DEVICE, requires_grad=True)
        dynopool2d(xk, a, d, backend="triton").pow(2).sum().backward()
        grads.append((xk.grad, a.grad, d.grad))
    assert all(torch.equal(g1, g2) for g1, g2 in zip(*grads))


def test_module_and_backend_choice(monkeypatch):
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    pool = DynOPool2d(alpha=1.5, delta=0.3, backend="triton").to(DEVICE)
    out = pool(x)
    assert out.shape == (2, 3, *pool.output_size(9, 9))
    out.sum().backward()
    assert pool.alpha.grad is not None and pool.delta.grad is not None
    assert pool_module.resolve_backend("auto", x.cpu()) == "torch"  # CPU tensors: the reference
    assert pool_module.resolve_backend("auto", x.cpu().double()) == "torch"
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        dynopool2d(x.double(), pool.alpha, pool.delta, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        pool_module.resolve_backend("triton", x.cpu())


def test_gpu_benchmark_script_writes_its_record(tmp_path):
    # the script a lent GPU runs (benchmarks/gpu_check.sh), on tiny shapes here
    from benchmarks import gpu_dynopool

    record = gpu_dynopool.run(tmp_path, dtypes=["float32"], shapes=[(2, 3, 8, 9)], device=DEVICE)
    assert record["suite"] == "dynopool" and [c["layout"] for c in record["cases"]] == ["channels_last", "nchw"]
    for case in record["cases"]:
        assert set(case["ms"]) == {"triton", "reference", "max_pool2d"}
        assert case["max_abs_diff_vs_reference"]["out"] < 1e-5
    assert len(list(tmp_path.glob("gpu-dynopool-*.json"))) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels", [4, 16], ids=["nchw", "nchw-run-channels-last"])
def test_compiled_model_matches_eager_across_a_size_change(backend, channels):
    torch.manual_seed(15)
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1), DynOPool2d(1.7, 0.3, backend=backend),
                              torch.nn.Conv2d(channels, 2, 3)).to(DEVICE)
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.randn(2, 3, 12, 12, device=DEVICE)
    sizes = set()
    for _ in range(3):
        results = []
        for model in (compiled, net):
            net.zero_grad()
            out = model(x)
            out.square().sum().backward()
            results.append([out.detach()] + [p.grad.clone() for p in net.parameters()])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        sizes.add(tuple(results[0][0].shape))
        with torch.no_grad():
            net[1].alpha.add_(0.2)  # 12 / 1.7 -> 7 cells, 12 / 2.1 -> 6 cells
    assert len(sizes) == 2


@pytest.mark.parametrize("channels", [3, 16])  # 16: an NCHW input converted to channels_last
def test_the_op_reads_nothing_to_the_host_and_launches_two_kernels_each_way(monkeypatch, channels):
    # What a call costs the host, pinned: with its output size given, the op never waits for
    # the device (no value read back: on CUDA, the sync debug mode raises on any sync) and
    # launches 2 kernels forward (the coordinate table, the pooling) and 2 backward (the
    # alpha/delta partial sums, the gather of x's gradient), whatever x's layout.
    launches = []
    kernel_type = type(k._forward_kernel)
    run = kernel_type.run
    monkeypatch.setattr(kernel_type, "run", lambda self, *a, **kw: launches.append(self.fn.__name__) or run(self, *a, **kw))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **kw: reads.append(_n) or _r(self, *a, **kw))
    x = torch.randn(2, channels, 12, 11, device=DEVICE, requires_grad=True)
    alpha = torch.tensor([1.7, 2.3], device=DEVICE, requires_grad=True)
    delta = torch.tensor([0.3, 0.2], device=DEVICE, requires_grad=True)
    grad = torch.randn(2, channels, 7, 5, device=DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = dynopool2d(x, alpha, delta, backend="triton", output_size=(7, 5))
        forward = list(launches)
        out.backward(grad)
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    # on CUDA nothing is read back; parameters on the host are checked there (alpha finite and
    # > 0, delta finite: one read of values already on the host, no device to wait for)
    assert reads == ([] if DEVICE.type == "cuda" else ["tolist"])
    assert forward == ["_coordinates_kernel", "_forward_kernel"]
    assert launches[2:] == ["_coordinate_grads_kernel", "_input_grad_kernel"]
    assert x.grad is not None and alpha.grad is not None and delta.grad is not None
