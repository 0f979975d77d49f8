import os

import torch

# Before any Triton kernel is defined: without a GPU, kernels run under Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# open_clip / huggingface_hub: never try the network (each failed lookup retries for ~46 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """CUDA where there is one, else the CPU (kernels under the interpreter): tests/helpers.DEVICE."""
    from .helpers import DEVICE

    return DEVICE


def pytest_configure(config):
    # `make test-fast` leaves these out; `make test` (CI) runs everything.
    for name, what in (("slow", "takes more than a few seconds on 2 cores"),
                       ("distributed", "starts torch.distributed ranks (gloo processes)"),
                       ("subprocess", "runs other processes (the CLI, pip, a second merge)")):
        config.addinivalue_line("markers", f"{name}: {what}")
