import os
import platform
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
# Synthetic checkpoints are large (3 x 605 MB for ViT-B-32): kept between runs, outside the repo.
CACHE = Path(os.environ.get("MODELSTOCK_BENCH_CACHE", "/tmp/modelstock-bench"))


@pytest.fixture(scope="session")
def clip_checkpoints():
    """Base and two fine-tuned checkpoints shaped like open_clip models, written once."""
    from modelstock.synthetic import clip_shapes, write_synthetic

    def get(model_name: str, n: int = 2, dtype: torch.dtype = torch.float32):
        folder = CACHE / f"{model_name}-n{n}-{str(dtype).split('.')[-1]}"
        names = ["base"] + [f"ft{i + 1}" for i in range(n)]
        paths = [folder / f"{name}.safetensors" for name in names]
        if not all(p.exists() for p in paths):
            write_synthetic(folder, clip_shapes(model_name), n, dtype=dtype)
        return paths

    return get


def machine_record() -> dict:
    return {
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
