"""What the merge reports of itself: layers by depth in the JSON report and the plot, the
summary's words on the clamp, and a warning where the ratio leaves [0, 1] without it; each
against the fp64 formula's own ratios (tests/helpers.spec_merge_fp64)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import modelstock.report
from modelstock.cli import main

from .helpers import spec_merge_fp64

# depth order, as a model builds them; a file lists them as text sorts (layers.10 before layers.2)
NAMES = [f"layers.{i}.weight" for i in range(12)]
OPPOSED = {"layers.3.weight": 1e-2, "layers.10.weight": 1.0}  # the second update: -u plus this much noise


@pytest.fixture
def deep(tmp_path):
    """base, ft1, ft2 over twelve layers; in layers 3 and 10 the two updates point (nearly)
    opposite ways, so without the clamp t < 0 there (about -4e4 in layer 3)."""
    g = torch.Generator().manual_seed(0)
    base, ft1, ft2 = {}, {}, {}
    for name in NAMES:
        base[name] = torch.randn(16, 16, generator=g)
        u = 1e-2 * torch.randn(16, 16, generator=g)
        noise = 1e-2 * torch.randn(16, 16, generator=g)
        v = -u + OPPOSED[name] * noise if name in OPPOSED else 0.5 * u + noise
        ft1[name], ft2[name] = base[name] + u, base[name] + v
    paths = []
    for label, sd in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        save_file(sd, tmp_path / f"{label}.safetensors")
        paths.append(str(tmp_path / f"{label}.safetensors"))
    t = {name: spec_merge_fp64(base[name], [ft1[name], ft2[name]], clamp=False)[1].item() for name in NAMES}
    return tmp_path, paths, t


def test_no_clamp_warns_once_naming_the_layers_where_t_left_0_1_and_the_summary_says_so(deep, capsys):
    tmp, paths, t = deep
    outside = [name for name in NAMES if not 0 <= t[name] <= 1]  # by depth
    assert outside == ["layers.3.weight", "layers.10.weight"] and t["layers.3.weight"] < -1e3
    assert main(["merge", *paths, "-o", str(tmp / "out.safetensors"), "--no-clamp"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("modelstock: warning:")]
    assert len(warnings) == 1, captured.err
    named = [name for name in NAMES if f"{name} (t = " in warnings[0]]
    assert named == outside and warnings[0].index(outside[0]) < warnings[0].index(outside[1]), warnings[0]
    assert "clamp acted" not in captured.out
    assert f"t left [0, 1] in 2 layer(s): {', '.join(outside)}." in captured.out, captured.out


def test_with_the_clamp_no_warning_and_the_summary_names_the_clamped_layers_by_depth(deep, capsys):
    tmp, paths, t = deep
    clamped = [name for name in NAMES if t[name] < 0]  # the clamp acts where cos < 0, i.e. t < 0
    assert main(["merge", *paths, "-o", str(tmp / "out.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert f"The [0, 1] clamp acted on 2 layer(s): {', '.join(clamped)}." in captured.out, captured.out


def test_report_and_plot_order_layers_by_depth(deep, monkeypatch):
    pytest.importorskip("matplotlib")
    tmp, paths, _ = deep
    with safe_open(paths[0], "np") as f:
        assert list(f.keys()) != NAMES  # the file's own order, which the report must not follow
    plotted = []
    groups = modelstock.report.layer_groups
    monkeypatch.setattr(modelstock.report, "layer_groups", lambda names, *a: plotted.append(names) or groups(names, *a))
    assert main(["merge", *paths, "-o", str(tmp / "out.safetensors"), "--report", str(tmp / "r.json"),
                 "--plot", str(tmp / "p.png"), "--quiet"]) == 0
    report = json.loads((tmp / "r.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == NAMES
    assert plotted == [NAMES]
    assert modelstock.report.MergeReport.read_json(tmp / "r.json").clamped_layers == [
        name for name in NAMES if name in OPPOSED]
