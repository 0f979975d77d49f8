"""The DynOPool operator (reference path) against an independent direct-gather formulation
written here from the spec, max_pool2d, gradcheck in fp64, and its edge cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from dynopool import DynOPool2d, dynopool2d
from dynopool.reference import output_size, sample_max


def direct(x, alpha, delta):
    """The spec, literally: 4 query points per cell, 4 bilinear taps each, max, ties first."""
    n, c, h, w = x.shape

    def axis(size, a, d):
        out = max(1, int(torch.round(torch.tensor(size / float(a.detach()), dtype=torch.float64))))
        s_hat = out + (size / a - (size / a).detach())
        s = size / s_hat
        p = (torch.arange(out, dtype=x.dtype) + 0.5) * s - 0.5
        ys = [p + (2 * k - 1) * d * s for k in (0, 1)]
        # the gradient is zero only strictly outside [0, size - 1] (the spec): a mask, not a where
        inside = [((y >= 0) & (y <= size - 1)).to(y.dtype) for y in ys]
        return [y * m + (y.clamp(0, size - 1) * (1 - m)).detach() for y, m in zip(ys, inside)]

    ys, us = axis(h, alpha[0], delta[0]), axis(w, alpha[1], delta[1])

    def bilinear(y, u):
        y0, u0 = y.detach().floor(), u.detach().floor()
        y1, u1 = (y0 + 1).clamp(max=h - 1), (u0 + 1).clamp(max=w - 1)
        wy, wu = (y - y0)[:, None], (u - u0)[None, :]
        tap = lambda yy, uu: x[:, :, yy.long()[:, None], uu.long()[None, :]]  # noqa: E731
        return (tap(y0, u0) * (1 - wy) * (1 - wu) + tap(y0, u1) * (1 - wy) * wu
                + tap(y1, u0) * wy * (1 - wu) + tap(y1, u1) * wy * wu)

    out = bilinear(ys[0], us[0])
    for k, l in ((0, 1), (1, 0), (1, 1)):
        q = bilinear(ys[k], us[l])
        out = torch.where(q > out, q, out)
    return out


def params(a, d, dtype=torch.float64):
    return (torch.tensor(a, dtype=dtype, requires_grad=True), torch.tensor(d, dtype=dtype, requires_grad=True))


CONFIGS = [((1.7, 2.3), (0.31, 0.18), (2, 3, 11, 9)), ((0.73, 1.31), (0.21, 0.43), (1, 2, 5, 7)),
           ((2.6, 3.1), (0.9, 1.4), (2, 2, 13, 12)), ((1.0, 4.4), (0.05, 0.27), (1, 3, 8, 17))]


@pytest.mark.parametrize("alpha,delta,shape", CONFIGS)
def test_forward_and_gradients_match_direct_formulation(alpha, delta, shape):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a1, d1 = params(alpha, delta)
    a2, d2 = params(alpha, delta)
    out1, out2 = dynopool2d(x, a1, d1), direct(x, a2, d2)
    assert out1.shape == out2.shape == (shape[0], shape[1], output_size(shape[2], alpha[0]), output_size(shape[3], alpha[1]))
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out1.shape, dtype=torch.float64)
    gx1, ga1, gd1 = torch.autograd.grad((out1 * weights).sum(), (x, a1, d1))
    gx2, ga2, gd2 = torch.autograd.grad((out2 * weights).sum(), (x, a2, d2))
    for got, want in ((gx1, gx2), (ga1, ga2), (gd1, gd2)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha,delta,shape", CONFIGS)
def test_gradcheck_x_and_delta(alpha, delta, shape):
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(alpha, dtype=torch.float64)
    d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: dynopool2d(x, a, d), (x, d))


def test_gradcheck_in_the_cell_count():
    # The straight-through size makes the forward flat in alpha, so alpha is checked through
    # the continuous cell count size_hat it feeds (and the chain rule below).
    torch.manual_seed(3)
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    s_hat = torch.tensor([4.37, 2.81], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([0.3, 0.22], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s, d: sample_max(x, 4, 3, s, d), (x, s_hat, d))


def test_straight_through_gradient_of_alpha():
    torch.manual_seed(4)
    h, w = 11, 9
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    a, d = params((1.7, 2.3), (0.3, 0.2))
    out = dynopool2d(x, a, d)
    weights = torch.randn(out.shape, dtype=torch.float64)
    (ga,) = torch.autograd.grad((out * weights).sum(), a)
    # d out / d alpha = d out / d size_hat (at size_hat = size_out) * d(size / alpha) / d alpha
    ho, wo = out.shape[-2:]
    s_hat = torch.tensor([float(ho), float(wo)], dtype=torch.float64, requires_grad=True)
    (gs,) = torch.autograd.grad((sample_max(x, ho, wo, s_hat, d.detach()) * weights).sum(), s_hat)
    want = gs * torch.tensor([-h / 1.7 ** 2, -w / 2.3 ** 2], dtype=torch.float64)
    torch.testing.assert_close(ga, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 1, 2, 2), (3, 5, 14, 30)])
def test_equals_max_pool_at_alpha_2_delta_quarter(dtype, shape):
    x = torch.randn(shape).to(dtype)
    out = dynopool2d(x, torch.tensor([2.0, 2.0]), torch.tensor([0.25, 0.25]))
    assert out.dtype == dtype and torch.equal(out, F.max_pool2d(x, 2))


def test_output_sizes_round_half_to_even_never_below_one():
    assert output_size(9, 2.0) == 4 and output_size(7, 2.0) == 4  # 4.5 -> 4, 3.5 -> 4
    assert output_size(10, 0.5) == 20  # upsampling
    assert output_size(5, 100.0) == 1
    pool = DynOPool2d(alpha=(1.5, 0.8))
    assert pool.output_size(9, 10) == (6, 12)
    assert pool(torch.randn(1, 1, 9, 10)).shape == (1, 1, 6, 12)
    assert "alpha=(1.500, 0.800)" in repr(pool) and "scale=(0.667, 1.250)" in repr(pool)


def test_ties_go_to_the_first_query():
    x = torch.ones(1, 1, 6, 6, requires_grad=True)  # every query equal
    a, d = torch.tensor([2.0, 2.0]), torch.tensor([0.25, 0.25])
    dynopool2d(x, a, d).sum().backward()
    want = torch.zeros(6, 6)
    want[0::2, 0::2] = 1  # the (0, 0) query of each 2x2 cell: its top-left pixel
    assert torch.equal(x.grad[0, 0], want)


def test_clamped_queries_have_no_delta_gradient():
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    a, d = params((7.0, 7.0), (3.0, 3.0))  # one cell; queries pushed past both borders
    out = dynopool2d(x, a, d)
    (gd,) = torch.autograd.grad(out.sum(), d)
    assert torch.equal(gd, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(out[..., 0, 0], torch.stack([x[..., 0, 0], x[..., 0, 6], x[..., 6, 0], x[..., 6, 6]]).amax(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    x = torch.randn(2, 3, 10, 9).to(dtype)
    a, d = torch.tensor([1.7, 2.3]), torch.tensor([0.3, 0.2])
    assert torch.equal(dynopool2d(x, a, d), dynopool2d(x.float(), a, d).to(dtype))


def test_channels_last_and_non_contiguous_inputs():
    x = torch.randn(2, 4, 10, 9)
    a, d = torch.tensor([1.7, 2.3]), torch.tensor([0.3, 0.2])
    want = dynopool2d(x, a, d)
    cl = dynopool2d(x.contiguous(memory_format=torch.channels_last), a, d)
    # channels_last runs in its own layout (its matrix products mix H before W): each output
    # is a 4-tap bilinear of fp32 values, a few roundings apart from the NCHW order's
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, want, rtol=0, atol=8 * torch.finfo(torch.float32).eps * float(x.abs().max()))
    strided = torch.randn(2, 4, 9, 10).transpose(2, 3)
    torch.testing.assert_close(dynopool2d(strided, a, d), dynopool2d(strided.contiguous(), a, d), rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (lambda: dynopool2d(torch.randn(3, 8, 8), torch.tensor([2.0, 2.0]), torch.tensor([0.25, 0.25])), "4-D"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), torch.tensor([0.0, 2.0]), torch.tensor([0.25, 0.25])), "alpha"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), torch.tensor([-1.0, 2.0]), torch.tensor([0.25, 0.25])), "alpha"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), torch.tensor([math.inf, 2.0]), torch.tensor([0.25, 0.25])), "alpha"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), torch.tensor([2.0, 2.0]), torch.tensor([math.nan, 0.25])), "delta"),
    (lambda: DynOPool2d(alpha=0), "alpha"),
    (lambda: DynOPool2d(delta=(1, 2, 3)), "delta"),
    # with the size given, parameters on the host are checked too (it reads nothing from a device)
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), [math.nan, 2.0], 0.25, output_size=(4, 4)), "alpha"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), [0.0, 2.0], 0.25, output_size=(4, 4)), "alpha"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), torch.tensor([-2.0, 2.0]), torch.tensor([0.25, 0.25]),
                        output_size=(4, 4)), "alpha"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), 2.0, [0.25, math.inf], output_size=(4, 4)), "delta"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), 2.0, 0.25, output_size=(0, 4)), "output_size"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), 2.0, 0.25, output_size=4), "output_size"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), [2.0, 2.0, 2.0], 0.25), "alpha"),
    (lambda: DynOPool2d(backend="cuda"), "backend"),
    (lambda: dynopool2d(torch.randn(1, 1, 8, 8), 2.0, 0.25, backend="cuda"), "backend"),
    (lambda: DynOPool2d(size_offset=math.nan), "size_offset"),
])
def test_bad_input_is_a_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_non_float_inputs_are_refused(dtype):
    # bilinear sampling of integers used to come back truncated (2.9999995 -> 2)
    x = (torch.arange(64).reshape(1, 1, 8, 8) % 3).to(dtype)
    with pytest.raises(ValueError, match="floating-point"):
        dynopool2d(x, torch.tensor([1.7, 1.7]), torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="floating-point"):
        dynopool2d(x, 1.7, 0.3, output_size=(5, 5))
    with pytest.raises(ValueError, match="floating-point"):
        DynOPool2d(1.7, 0.3)(x)


def test_numbers_and_pairs_are_accepted_as_the_module_takes_them():
    x = torch.randn(2, 3, 11, 9)
    want = dynopool2d(x, torch.tensor([1.7, 2.0]), torch.tensor([0.3, 0.3]))
    for alpha, delta in (([1.7, 2.0], 0.3), ((1.7, 2.0), [0.3, 0.3])):
        assert torch.equal(dynopool2d(x, alpha, delta), want)
        assert torch.equal(dynopool2d(x, alpha, delta, output_size=tuple(want.shape[-2:])), want)
    assert torch.equal(dynopool2d(x, 2.0, 0.25, output_size=(6, 4)), dynopool2d(x, [2.0, 2.0], [0.25, 0.25]))


def test_backend_is_checked_when_set():
    pool = DynOPool2d()
    with pytest.raises(ValueError, match="backend"):
        pool.backend = "cuda"
    assert pool.backend == "auto"


def test_size_offset_keeps_a_sites_rounding():
    # floor(H / alpha + b): b = 0 is a 2x2 pool's floor(H / 2), b = 1/2 a padded stride-2
    # conv's ceil(H / 2), b = -1/2 an unpadded 3x3 stride-2 conv's floor((H - 1) / 2)
    for h in range(1, 40):
        assert output_size(h, 2.0, 0.0) == max(1, h // 2)
        assert output_size(h, 2.0, 0.5) == (h + 1) // 2
        assert output_size(h, 2.0, -0.5) == max(1, (h - 1) // 2)
    assert output_size(97, 2.0) == 48  # round half to even: the plain layer's rule
    assert output_size(10, 3.0, 0.5) == 3 and output_size(11, 3.0, 0.5) == 4  # floor(3.33 + .5), floor(3.67 + .5)
    pool = DynOPool2d(2.0, 0.25, size_offset=(0.5, 0.0), grad_scale="sum")  # the spec's gradient, unscaled
    x = torch.randn(1, 2, 97, 131, requires_grad=True)
    out = pool(x)
    assert out.shape[-2:] == (49, 65) == pool.output_size(97, 131)
    assert "size=floor(H / alpha + 0.5), floor(W / alpha)" in repr(pool)
    # the straight-through gradient is that of H / alpha whatever the rounding
    weights = torch.randn(out.shape)
    (ga,) = torch.autograd.grad((out * weights).sum(), pool.alpha)
    s_hat = torch.tensor([49.0, 65.0], requires_grad=True)
    (gs,) = torch.autograd.grad((sample_max(x.detach(), 49, 65, s_hat, pool.delta.detach()) * weights).sum(), s_hat)
    torch.testing.assert_close(ga, gs * torch.tensor([-97 / 4, -131 / 4]))


def test_module_learns_alpha_and_freezes_delta_on_request():
    pool = DynOPool2d(alpha=1.7, delta=0.3, learn_delta=False)
    x = torch.randn(2, 3, 12, 12)
    pool(x).square().mean().backward()
    assert pool.alpha.grad is not None and bool(torch.isfinite(pool.alpha.grad).all())
    assert pool.delta.grad is None and not pool.delta.requires_grad


def test_queries_on_the_border_keep_their_gradient():
    # alpha = 2, delta = 0.25 on an even size puts the first query exactly on row 0 and the last
    # on row h - 1: inside [0, h - 1], so delta's gradient flows through them (one-sided toward
    # the interior at row 0; at row h - 1 the bilinear derivative itself is zero).
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, :] = 1.0  # the only rise is from row 0 to row 1: d out[0] / d y_00 = 1
    x[0, 0, 0, :] = 2.0  # the (0, *) queries win cell row 0
    a, d = params((2.0, 2.0), (0.25, 0.25))
    out = dynopool2d(x, a, d)
    (gd,) = torch.autograd.grad(out[0, 0, 0, 0], d)
    # y_00 = 0.5 * s - 0.5 - delta * s with s = 2: d y_00 / d delta_h = -2; d out / d y_00 = 1 - 2
    assert gd.tolist() == [2.0, 0.0]
