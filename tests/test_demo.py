"""`make demo`'s pipeline on a tiny budget (a few batches), so CI covers its code paths."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("open_clip")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import demo  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
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
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| Model Stock (after training) |" in (tmp_path / "results.md").read_text()
