"""`make demo`'s pipeline on a tiny budget (a few batches), so CI covers its code paths; run twice
as `make demo` runs it (a process of its own), it prints the same figures both times."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("open_clip")
DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
TIMINGS = ("merge s",)  # the only figures that may differ between two runs


def run_quick(out: Path) -> dict:
    done = subprocess.run([sys.executable, str(DEMO), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_demo_quick_prints_the_same_figures_twice(tmp_path):
    first, second = run_quick(tmp_path / "a"), run_quick(tmp_path / "b")
    for part in ("model_stock", "dynopool"):
        for a, b in zip(first[part], second[part], strict=True):
            assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    results, out = first, tmp_path / "a"
    # what makes them so: fixed threads, deterministic algorithms, and on x86 the AVX2 code paths
    # whatever the CPU offers beyond (as torch itself reports them)
    assert results["setup"]["threads"] == 2 and results["setup"]["deterministic"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert results["setup"]["cpu_capability"] == "AVX2"
    methods = [r["method"] for r in results["model_stock"]]
    assert methods == ["Pre-trained", "Fine-tuned #1", "Fine-tuned #2", "Uniform average of #1, #2",
                       "WiSE-FT (0.5, #1)", "Model Stock (after training)", "Model Stock (during training)"]
    for row in results["model_stock"]:
        assert 0 <= row["ID"] <= 100 and 0 <= row["OOD mean"] <= 100
        assert set(row) >= {"rotate", "noise", "blur", "invert", "models fine-tuned", "merge s"}
    assert [r["model"] for r in results["dynopool"]][0] == "CNN, 2x2 max pooling"
    assert all(len(r["scales"]) == 2 for r in results["dynopool"][1:])
    for name in ("results.md", "id_vs_ood.png", "layers.png", "dynopool.png", "report.json",
                 "vit-model-stock.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert "| Model Stock (after training) |" in (out / "results.md").read_text()
