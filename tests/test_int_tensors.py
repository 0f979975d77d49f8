"""CNN checkpoints as people have them: a torchvision ResNet-18 fine-tuned a few steps in train mode
advances every BatchNorm's num_batches_tracked, which the merge refused before (fe64edc); and
checkpoints whose tensor sets differ, refused by default, the base's with ``missing="base"``."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelstock
from modelstock import InputError
from modelstock.cli import main

from .helpers import assert_within, merge_tolerance, spec_merge_fp64

torchvision = pytest.importorskip("torchvision")


def finetune(base, steps, seed):
    """A copy of ``base`` trained ``steps`` SGD steps in train mode (BatchNorm statistics and
    counters move) on random data of its own seed."""
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.load_state_dict(base.state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return base, [finetune(base, 3, 1), finetune(base, 5, 2)]


def counters(sd):
    return {k: v for k, v in sd.items() if k.endswith("num_batches_tracked")}


def check_floats(merged, base, fts):
    b, fs = base.state_dict(), [m.state_dict() for m in fts]
    for k, v in merged.items():
        if v.is_floating_point():  # weights and the BatchNorm running statistics
            want, t = spec_merge_fp64(b[k], [f[k] for f in fs])
            assert_within(v, want, merge_tolerance(want, b[k], [f[k] for f in fs], v.dtype, t=t), k)


def test_resnet18_fine_tuned_in_train_mode_merges_by_default(resnets):
    base, fts = resnets
    report = modelstock.MergeReport()
    merged = modelstock.merge(base, fts, report=report)
    want = {k: max(int(m.state_dict()[k]) for m in fts) for k in counters(base.state_dict())}
    assert len(want) == 20 and all(v == 5 for v in want.values())
    assert {k: int(v) for k, v in counters(merged).items()} == want  # the largest count
    check_floats(merged, base, fts)
    assert sorted(report.differing_int_tensors) == sorted(want)
    assert "20 non-float tensor(s) differed between the models, given the largest value" in report.summary()
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.load_state_dict(merged, strict=True)
    assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


def test_int_tensor_policies_base_and_refuse(resnets):
    base, fts = resnets
    merged = modelstock.merge(base, fts, int_tensors="base")
    assert all(int(v) == 0 for v in counters(merged).values())
    with pytest.raises(InputError, match="non-float tensor differs") as e:
        modelstock.merge(base, fts, int_tensors="refuse")
    assert e.value.tensor.endswith("num_batches_tracked") and e.value.source == "finetuned[0]"
    with pytest.raises(ValueError, match="int_tensors"):
        modelstock.merge(base, fts, int_tensors="min")


def test_resnet18_on_the_command_line_reports_the_counters(resnets, tmp_path, capsys):
    base, fts = resnets
    paths = [tmp_path / "base.safetensors", tmp_path / "ft1.pt", tmp_path / "ft2.safetensors"]
    save_file(base.state_dict(), paths[0])
    torch.save({"epoch": 3, "state_dict": fts[0].state_dict()}, paths[1])
    save_file(fts[1].state_dict(), paths[2])
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", *map(str, paths), "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    assert "20 non-float tensor(s) differed" in capsys.readouterr().out
    merged = load_file(out)
    assert all(int(v) == 5 for v in counters(merged).values())
    check_floats(merged, base, fts)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["int_tensors"] == "max" and len(report["differing_int_tensors"]) == 20
    assert main(["merge", *map(str, paths), "-o", str(tmp_path / "o2.safetensors"), "--int-tensors", "refuse"]) == 2
    assert "num_batches_tracked" in capsys.readouterr().err and not (tmp_path / "o2.safetensors").exists()


def test_tensors_in_only_some_models_refused_or_taken_from_the_base(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g), "head.bias": torch.randn(3)}
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    del fts[1]["head.bias"]  # a fine-tune that dropped a tensor...
    fts[1]["adapter.weight"] = torch.randn(2, 2, generator=g)  # ...and added one the base lacks
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "ft1", "ft2")]
    for p, sd in zip(paths, [base, *fts]):
        save_file(sd, p)
    out = tmp_path / "o.safetensors"
    assert main(["merge", *map(str, paths), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "head.bias" in err and "--missing base" in err and not out.exists()
    assert main(["merge", *map(str, paths), "-o", str(out), "--missing", "base"]) == 0
    summary = capsys.readouterr().out
    assert "1 tensor(s) missing in some fine-tuned models taken from the base" in summary
    assert "adapter.weight" in summary
    got = load_file(out)
    assert set(got) == set(base) and torch.equal(got["head.bias"], base["head.bias"])
    for k in ("w", "b"):
        want, t = spec_merge_fp64(base[k], [f[k] for f in fts])
        assert_within(got[k], want, merge_tolerance(want, base[k], [f[k] for f in fts], torch.float32, t=t), k)
    # the same in memory, with a float tensor the base alone has written in the output dtype
    report = modelstock.MergeReport()
    merged = modelstock.merge(base, fts, missing="base", out_dtype=torch.bfloat16, report=report)
    assert merged["head.bias"].dtype == torch.bfloat16 and torch.equal(merged["head.bias"], base["head.bias"].bfloat16())
    assert report.dropped == ["finetuned[1]: adapter.weight"]
    got = load_file(modelstock.merge_files(paths[0], paths[1:], tmp_path / "o16.safetensors",
                                           missing="base", out_dtype="bf16").output[0])
    assert torch.equal(got["head.bias"], base["head.bias"].bfloat16())
