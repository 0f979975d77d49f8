"""Test-side truths and checks, written independently of the package's code."""
from __future__ import annotations

import torch

# The one device every device-dependent test runs on: CUDA where there is one, else the CPU
# (the Triton kernels then run under TRITON_INTERPRET=1, set in conftest.py). Tests take it
# through the `device` fixture or import it for parametrization; none branches on its own.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def spec_merge_fp64(w0, ws, *, granularity="tensor", clamp=True, eps=1e-8):
    """The spec's formula, literally, in fp64: one (cos, t) per tensor or per slice along dim 0.

    Returns (merged fp64 tensor, t as a 1-D fp64 tensor with one entry per slice)."""
    w0 = w0.double()
    ws = [w.double() for w in ws]
    if granularity == "row" and w0.ndim >= 2 and w0.numel() > 0:
        parts = [spec_merge_fp64(w0[r], [w[r] for w in ws], clamp=clamp, eps=eps) for r in range(w0.shape[0])]
        return torch.stack([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n = len(ws)
    ds = [(w - w0).flatten() for w in ws]
    cos = [torch.dot(ds[i], ds[j]) / (ds[i].norm() * ds[j].norm() + eps) for i in range(n) for j in range(i + 1, n)]
    c = torch.stack(cos).mean()
    c = c.clamp(0, 1) if clamp else c.clamp(-1, 1)
    t = n * c / (1 + (n - 1) * c)
    mean = sum(ws) / n
    return w0 + t * (mean - w0), t.reshape(1)


def merge_tolerance(ref, w0, ws, out_dtype, compute_dtype=torch.float32, t=None):
    """Elementwise bound for a merge computed in ``compute_dtype`` and stored in ``out_dtype``:
    one unit in the last place of the output (the final rounding may cross a rounding boundary
    of the computed value) plus a few roundings of the compute dtype at the inputs' magnitude
    (the running mean and the interpolation round N + 3 times in all), amplified by |t| when
    the ratio ``t`` (one per slice, from the spec formula) extrapolates beyond [0, 1]."""
    scale = w0.double().abs()
    for w in ws:
        scale = torch.maximum(scale, w.double().abs())
    if t is not None:
        gain = t.double().abs().clamp_min(1)
        scale = scale * (gain.view(-1, *[1] * (scale.ndim - 1)) if gain.numel() > 1 else gain)
    out_ulp = torch.finfo(out_dtype).eps * ref.abs().clamp_min(torch.finfo(out_dtype).tiny)
    return out_ulp + (len(ws) + 3) * torch.finfo(compute_dtype).eps * scale


def assert_within(actual, expected, tol, what=""):
    """Fail with the count and first positions of the elements outside ``tol``. The three
    tensors may live on any devices: they are compared in fp64 on the CPU."""
    expected = torch.as_tensor(expected).detach().double().cpu()
    actual = actual.detach().double().cpu().reshape(expected.shape)
    tol = torch.as_tensor(tol).detach().double().cpu()
    err = (actual - expected).abs()
    bad = ~(err <= tol)
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        worst = int(torch.argmax(torch.where(bad, err / tol.clamp_min(1e-300), 0.0)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; first at {idx}; "
            f"worst flat index {worst}: got {actual.flatten()[worst].item()!r}, "
            f"expected {expected.flatten()[worst].item()!r}, bound {tol.flatten()[worst].item():.3g}")


def finetuned_like(w0, n, *, cos=0.5, scale=1e-2, generator=None):
    """n fine-tuned versions of w0 whose updates share a direction (pairwise cos ~ ``cos``)."""
    shared = torch.randn(w0.shape, generator=generator)
    out = []
    for _ in range(n):
        own = torch.randn(w0.shape, generator=generator)
        out.append(w0 + scale * (cos ** 0.5 * shared + (1 - cos) ** 0.5 * own))
    return out
