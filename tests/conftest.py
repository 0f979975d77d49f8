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
