"""merge_files (streamed, file to file) against the in-memory merge and the fp64 formula."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modelstock
from modelstock import InputError, MergeReport
import modelstock.merging.cpu_pipeline as files

from .helpers import assert_within, merge_tolerance, spec_merge_fp64
from .test_merge import make_models


def save_models(tmp_path, base, fts, ext=".safetensors"):
    paths = []
    for name, sd in zip(["base"] + [f"ft{i}" for i in range(len(fts))], [base, *fts]):
        path = tmp_path / f"{name}{ext}"
        (save_file if ext == ".safetensors" else torch.save)(sd, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("n", [2, 3])
def test_file_merge_equals_in_memory_merge_and_formula(tmp_path, dtype, granularity, n):
    base, fts = make_models(n, dtype)
    base["bn.num_batches_tracked"] = torch.tensor(5)
    for f in fts:
        f["bn.num_batches_tracked"] = torch.tensor(5)
    paths = save_models(tmp_path, base, fts)
    report = modelstock.merge_files(paths[0], paths[1:], tmp_path / "out.safetensors", granularity=granularity)
    got = load_file(tmp_path / "out.safetensors")
    want = modelstock.merge(base, fts, granularity=granularity)
    for k, w0 in base.items():
        if w0.is_floating_point():
            # Both paths within the bound of the fp64 formula, so within twice it of each other
            # (numpy's and torch's matmul sum the Gram's runs in different orders).
            ref, t = spec_merge_fp64(w0, [f[k] for f in fts], granularity=granularity)
            tol = merge_tolerance(ref, w0, [f[k] for f in fts], dtype, t=t)
            assert got[k].dtype == want[k].dtype, k
            assert_within(got[k], ref, tol, k)
            assert_within(got[k], want[k].double(), 2 * tol, k)
        else:
            assert torch.equal(got[k], want[k]), k
    assert report.n == n and len(report.layers) == len(base)
    assert report.bytes_written == (tmp_path / "out.safetensors").stat().st_size - _header_size(tmp_path / "out.safetensors")


def _header_size(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_metadata_kept_and_provenance_added(tmp_path):
    base, fts = make_models(2)
    paths = save_models(tmp_path, base, fts)
    save_file(base, paths[0], metadata={"format": "pt", "origin": "pretrain"})
    modelstock.merge_files(paths[0], paths[1:], tmp_path / "out.safetensors", exclude=["embed"])
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["origin"] == "pretrain" and meta["format"] == "pt"
    prov = json.loads(meta["modelstock"])
    assert prov == {"method": "model_stock", "n": 2, "granularity": "tensor", "clamp": True, "eps": 1e-8,
                    "exclude": ["embed"], "base": "base.safetensors",
                    "finetuned": ["ft0.safetensors", "ft1.safetensors"]}


@pytest.mark.parametrize("out_name", ["out.pt", "out.safetensors"])
def test_mixed_formats_and_out_dtype(tmp_path, out_name):
    base, fts = make_models(2)
    p_base = tmp_path / "base.safetensors"
    save_file(base, p_base)
    # open_clip-style training checkpoint, and a plain .pt
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in fts[0].items()}}, tmp_path / "ft0.pt")
    torch.save(fts[1], tmp_path / "ft1.bin")
    modelstock.merge_files(p_base, [tmp_path / "ft0.pt", tmp_path / "ft1.bin"], tmp_path / out_name,
                           out_dtype=torch.bfloat16)
    out = load_file(tmp_path / out_name) if out_name.endswith("safetensors") else torch.load(tmp_path / out_name)
    want = modelstock.merge(base, fts, out_dtype=torch.bfloat16)
    assert set(out) == set(want)  # in the base file's order, which save_file sorts
    for k in want:
        ref, t = spec_merge_fp64(base[k], [f[k] for f in fts])
        tol = merge_tolerance(ref, base[k], [f[k] for f in fts], torch.bfloat16, t=t)
        assert out[k].dtype == torch.bfloat16, k
        assert_within(out[k], ref, tol, k)
        assert_within(out[k], want[k].double(), 2 * tol, k)


def test_sharded_output_and_sharded_input(tmp_path):
    base, fts = make_models(2)
    paths = save_models(tmp_path, base, fts)
    report = modelstock.merge_files(paths[0], paths[1:], tmp_path / "m.safetensors", shard_size="10KB")
    assert len(report.output) > 2 and report.output[-1].endswith("m.safetensors.index.json")
    # A sharded checkpoint is a valid input (index or folder).
    (tmp_path / "sharded").mkdir()
    modelstock.merge_files(paths[0], paths[1:], tmp_path / "sharded" / "model.safetensors", shard_size=4000)
    again = modelstock.merge_files(tmp_path / "sharded", [tmp_path / "m.safetensors.index.json", paths[2]],
                                   tmp_path / "again.safetensors")
    assert again.n == 2
    # Merging a model with itself twice: all deltas vanish except ft1's; result is finite.
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "again.safetensors").values())


def test_ring_serves_layers_larger_and_smaller_than_read_ahead(tmp_path, monkeypatch):
    # A tiny ring forces waiting on the reader and wrap-around; results stay bitwise the same.
    base, fts = make_models(3)
    paths = save_models(tmp_path, base, fts)
    monkeypatch.setattr(files, "_READ_AHEAD_BYTES", 64)
    modelstock.merge_files(paths[0], paths[1:], tmp_path / "small_ring.safetensors")
    modelstock.merge_files(paths[0], paths[1:], tmp_path / "big_ring.safetensors")
    got, want = load_file(tmp_path / "small_ring.safetensors"), load_file(tmp_path / "big_ring.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_failure_mid_merge_leaves_no_file(tmp_path):
    base, fts = make_models(2)
    fts[1]["logit_scale"] = torch.tensor(float("inf"))  # a late layer in the file
    paths = save_models(tmp_path, base, fts)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError) as e:
        modelstock.merge_files(paths[0], paths[1:], tmp_path / "out.safetensors")
    assert e.value.source == str(paths[2]) and e.value.tensor == "logit_scale"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_output_checks(tmp_path):
    base, fts = make_models(2)
    paths = save_models(tmp_path, base, fts)
    with pytest.raises(InputError, match="overwrite an input"):
        modelstock.merge_files(paths[0], paths[1:], paths[1], force=True)
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists"):
        modelstock.merge_files(paths[0], paths[1:], tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    modelstock.merge_files(paths[0], paths[1:], tmp_path / "out.safetensors", force=True)
    assert set(load_file(tmp_path / "out.safetensors")) == set(base)
    with pytest.raises(InputError, match="folder does not exist"):
        modelstock.merge_files(paths[0], paths[1:], tmp_path / "no" / "out.safetensors")


def test_report_json_round_trip_and_plot(tmp_path):
    base, fts = make_models(3)
    base["bn.num_batches_tracked"] = torch.tensor(5)
    for f in fts:
        f["bn.num_batches_tracked"] = torch.tensor(5)
    paths = save_models(tmp_path, base, fts)
    report = modelstock.merge_files(paths[0], paths[1:], tmp_path / "o.safetensors", exclude=["proj.bias"],
                                    granularity="row")
    report.write_json(tmp_path / "r.json")
    back = MergeReport.read_json(tmp_path / "r.json")
    assert back.layers == report.layers and back.n == 3
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["method"] == "model_stock" and d["parameters"] == sum(v.numel() for v in base.values())
    layer = next(la for la in d["layers"] if la["name"] == "conv.weight")
    assert layer["rows"] == 6 and len(layer["norms"]) == 3 and len(layer["cos_pairs"]) == 3
    assert {la["kind"] for la in d["layers"]} == {"merge", "average", "copy"}
    report.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Merged 3 fine-tuned checkpoints" in report.summary()
