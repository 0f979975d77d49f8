"""DynOPool's output as an ordinary tensor on every path: in-place ops after it, -inf / inf /
NaN as max_pool2d treats them, and the fast PyTorch path (torch_pool) against the reference.

Paths: the reference (``reference.dynopool2d``, the spec), the PyTorch path (backend "torch":
the CPU's), the Triton kernels through their autograd.Function (backend "triton"; under
TRITON_INTERPRET=1 on the CPU), and the same kernels as the custom op torch.compile traces."""
import pytest
import torch
import torch.nn.functional as F

from dynopool import dynopool2d, reference, torch_pool, triton_pool
from dynopool.reference import output_size

from .helpers import DEVICE

PATHS = ["reference", "torch", "triton", "custom_op"]
EPS32 = torch.finfo(torch.float32).eps


def pool(path, x, alpha, delta):
    h, w = x.shape[-2:]
    a = alpha.detach().tolist()
    size = (output_size(h, a[0]), output_size(w, a[1]))
    if path == "reference":
        return reference.dynopool2d(x, alpha, delta, size)
    if path == "torch":
        return dynopool2d(x, alpha, delta, backend="torch", output_size=size)
    if path == "triton":
        return dynopool2d(x, alpha, delta, backend="triton", output_size=size)
    return triton_pool._pool_op(x, alpha, delta, *size)[0]


def device_of(path):
    return torch.device("cpu") if path in ("reference", "torch") else DEVICE


def leaves(x, alpha, delta, device):
    return [t.detach().clone().to(device).requires_grad_() for t in (x, alpha, delta)]


def add_inplace(t, other):
    t += other
    return t


IN_PLACE = {"ReLU(inplace=True)": lambda t, o: torch.nn.ReLU(inplace=True)(t), "relu_": lambda t, o: t.relu_(),
            "+=": add_inplace}
OUT_OF_PLACE = {"ReLU(inplace=True)": lambda t, o: torch.relu(t), "relu_": lambda t, o: torch.relu(t),
                "+=": lambda t, o: t + o}


@pytest.mark.parametrize("op", list(IN_PLACE))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_in_place_ops_on_the_output_give_the_out_of_place_gradients(path, op, channels_last):
    # as after max_pool2d: a surgered SqueezeNet's ReLU(inplace=True) follows its pools
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    alpha, delta = torch.tensor([1.7, 2.3]), torch.tensor([0.3, 0.2])
    other = torch.randn(2, 3, output_size(9, 1.7), output_size(8, 2.3)).to(device_of(path))
    results = []
    for ops in (IN_PLACE, OUT_OF_PLACE):
        xs, a, d = leaves(x, alpha, delta, device_of(path))
        if channels_last:
            xs = xs.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        o = other.clone().requires_grad_()
        out = ops[op](pool(path, xs, a, d), o)
        weights = torch.linspace(-1, 2, out.numel(), device=out.device).view(out.shape)
        (out * weights).sum().backward()
        results.append([out.detach(), xs.grad, a.grad, d.grad] + ([o.grad] if op == "+=" else []))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def non_finite_input(shape=(2, 3, 8, 6)):
    """Random values with -inf (a single pixel, a whole 2 x 2 window, a border pixel), inf, and
    NaN (alone, and beside inf in one window); never two NaN in a window (max_pool2d's choice
    between two NaN is its own)."""
    torch.manual_seed(2)
    x = torch.randn(shape)
    x[0, 0, 0, 0] = -float("inf")
    x[0, 1, 2:4, 2:4] = -float("inf")
    x[0, 2, 7, 5] = -float("inf")
    x[0, 0, 4, 3] = -float("inf")
    x[1, 0, 5, 3] = float("inf")
    x[1, 2, 4, 1] = float("nan")
    x[1, 1, 3, 0] = float("nan")
    x[1, 1, 3, 1] = float("inf")
    return x


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inf_and_nan_as_max_pool2d_at_alpha_2_delta_quarter(path, channels_last):
    # each query sits on one pixel: its other taps have weight zero and contribute nothing, so
    # -inf stays -inf (0 * -inf would be NaN) and one NaN pixel reaches one output, not four
    x = non_finite_input()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xs, a, d = leaves(x, torch.tensor([2.0, 2.0]), torch.tensor([0.25, 0.25]), device_of(path))
    if channels_last:
        xs = xs.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = pool(path, xs, a, d)
    xm = x.clone().requires_grad_()
    want = F.max_pool2d(xm, 2)
    assert int(want.isnan().sum()) == 2 and bool((want == -float("inf")).any())
    torch.testing.assert_close(out.cpu(), want.detach(), rtol=0, atol=0, equal_nan=True)
    grad = torch.randn(want.shape)
    out.backward(grad.to(out.device))
    want.backward(grad)
    torch.testing.assert_close(xs.grad.cpu(), xm.grad, rtol=0, atol=0)
    # the slopes into -inf, inf and NaN count as zero: alpha and delta get finite gradients
    assert torch.isfinite(a.grad).all() and torch.isfinite(d.grad).all()


@pytest.mark.parametrize("path", ["torch", "triton", "custom_op"])
def test_inf_and_nan_at_fractional_coordinates_agree_with_the_reference(path):
    # alpha 1.7 x 2.3: weights between 0 and 1. -inf beside a finite tap is -inf (no NaN), and
    # NaN reaches exactly the outputs with a tap of nonzero weight on it, as in the reference
    x = non_finite_input((2, 3, 11, 9))
    alpha, delta = torch.tensor([1.7, 2.3]), torch.tensor([0.31, 0.18])
    xr, ar, dr = leaves(x.double(), alpha.double(), delta.double(), torch.device("cpu"))
    want = reference.dynopool2d(xr, ar, dr, (output_size(11, 1.7), output_size(9, 2.3)))
    xs, a, d = leaves(x, alpha, delta, device_of(path))
    out = pool(path, xs, a, d).cpu()
    assert 0 < int(want.isnan().sum()) < want.numel()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    finite = torch.isfinite(want)
    torch.testing.assert_close(out[finite].double(), want[finite].detach(), rtol=0,
                               atol=8 * EPS32 * float(x[torch.isfinite(x)].abs().max()))
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    out_grad = grad.clone()
    want.backward(grad.double())
    pool(path, xs, a, d).backward(out_grad.to(xs.device))
    for got, ref in ((a.grad, ar.grad), (d.grad, dr.grad)):
        assert torch.isfinite(got).all()
        scale = float(grad.abs().sum()) * 2 * float(x[torch.isfinite(x)].abs().max()) * 10
        torch.testing.assert_close(got.cpu().double(), ref, rtol=0, atol=20 * EPS32 * scale)


# alpha, delta, shape: downsampling, upsampling, clamped queries (large delta), one input row
CONFIGS = [((1.7, 2.3), (0.31, 0.18), (2, 3, 11, 9)), ((0.73, 1.31), (0.21, 0.43), (1, 2, 5, 7)),
           ((2.6, 3.1), (0.9, 1.4), (2, 5, 13, 12)), ((1.3, 0.6), (0.3, 0.2), (2, 3, 1, 9)),
           ((2.0, 2.0), (0.25, 0.25), (2, 3, 8, 6))]


@pytest.mark.parametrize("alpha,delta,shape", CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fast_path_matches_the_reference_in_fp64(alpha, delta, shape, channels_last):
    torch.manual_seed(4)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    size = (output_size(shape[2], alpha[0]), output_size(shape[3], alpha[1]))
    got, want = [], []
    for fn, into in ((torch_pool.dynopool2d, got), (reference.dynopool2d, want)):
        xs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
        out = fn(xs, a, d, size)
        weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        (out * weights).sum().backward()
        into += [out.detach(), xs.grad, a.grad, d.grad]
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fast_path_gradcheck_in_x_and_the_coordinates(channels_last):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    # query coordinates off the integers (the slopes are one-sided there) and inside the map
    yq = torch.tensor([0.3, 1.6, 2.2, 3.9, 4.4, 5.7, 6.1, 7.8], dtype=torch.float64, requires_grad=True)
    xq = torch.tensor([0.2, 1.3, 2.6, 3.4, 4.1, 6.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch_pool.sample_at, (x, yq, xq))
