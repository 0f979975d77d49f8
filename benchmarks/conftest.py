import json
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
# Records are written only when asked (`make bench RECORD=1`), so a plain run leaves the tree clean.
RECORD = os.environ.get("RECORD", "") not in ("", "0")
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


# `make bench` reports, it does not judge: each benchmark adds the figures that matter (measured as
# its record measures them) and the summary prints them as one table; targets are shown beside
# them, never asserted (they live in the README and the records).
_FIGURES: list[tuple[str, str, str, str]] = []


def figure(case: str, what: str, value: float, unit: str = "", target: str = "") -> None:
    """One row of the summary table: ``case``, ``what`` was measured, its ``value`` and ``unit``,
    and the ``target`` it is compared with in the README (text, not checked)."""
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    _FIGURES.append((case, what, f"{shown} {unit}".strip(), target))


def save_record(name: str, record: dict) -> Path | None:
    """``benchmarks/results/<name>`` when records are asked for (RECORD=1), else nothing."""
    if not RECORD:
        return None
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    head = ("case", "figure", "value", "target (README)")
    widths = [max(len(row[i]) for row in [head, *_FIGURES]) for i in range(4)]
    terminalreporter.section("benchmark figures")
    for row in [head, tuple("-" * w for w in widths), *_FIGURES]:
        terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    where = f"records written under {RESULTS}" if RECORD else "no records written (make bench RECORD=1 writes them)"
    terminalreporter.write_line(where)
