"""Where an op runs: the one rule both packages' public functions apply (``backend="auto"``).

"auto" sends CUDA tensors the kernels take to the Triton kernels and everything else to the
package's PyTorch reference; "torch" forces the reference; "triton" forces the kernels, on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests)."""
from __future__ import annotations

import functools
import os

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, device, *, kernels_take: bool = True) -> str:
    """"torch" or "triton" for tensors on ``device`` (a torch.device); ``kernels_take``: the
    kernels accept these tensors (dtype, options), which "auto" requires."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernels_take and has_triton() else "torch"
    if not (device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError("backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)")
    return "triton"
