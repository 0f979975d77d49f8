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


# Files whose every test is slow on 2 cores (Triton's interpreter, whole CNNs, exports, the demo).
# A test elsewhere carries its own @pytest.mark.slow.
SLOW_FILES = {"test_merge_kernels", "test_dynopool_kernels", "test_compile_for_gpu", "test_demo",
              "test_dynopool_surgery", "test_dynopool_deploy", "test_device_files"}
# What a test's own code or its fixtures' call, for the marks it then gets (helper functions
# they call are not read: a test whose helper starts processes is marked by hand).
_CALLS = {"distributed": ("mp.spawn(", "multiprocessing.spawn(", "init_process_group("),
          "subprocess": ("subprocess.", "Popen(", "sys.executable")}


def _sources(item):
    import inspect

    functions = [item.function]
    fixture_defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    functions += [d.func for name in item.fixturenames for d in fixture_defs.get(name, ())]
    for fn in functions:
        try:
            yield inspect.getsource(fn)
        except (OSError, TypeError):
            pass


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        source = "\n".join(_sources(item))
        for mark, calls in _CALLS.items():
            if any(c in source for c in calls):
                item.add_marker(getattr(pytest.mark, mark))
