"""Checkpoint formats: our streamed writer and readers against the safetensors package and
torch.save / torch.load, and the refusals a user sees for broken files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelstock import InputError
from modelstock.io import CheckpointWriter, open_checkpoint, output_paths, to_torch


def sample_state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 3, generator=g).half(),
        "double": torch.randn(4, generator=g).double(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "steps": torch.tensor(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(6, dtype=torch.int32).view(2, 3),
    }


def entries_of(sd):
    return [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in sd.items()]


def write(path, sd, metadata=None, shard_size=None):
    with CheckpointWriter(path, entries_of(sd), metadata, shard_size) as w:
        for k, v in sd.items():
            w.write(k, v)
        return w.commit()


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def read_all(path):
    ck = open_checkpoint(path)
    try:
        return {k: to_torch(ck.read(k), dtype) for k, (dtype, _) in ck.tensors().items()}, ck
    finally:
        ck.close()


def test_safetensors_written_by_us_read_by_the_safetensors_package(tmp_path):
    sd = sample_state_dict()
    write(tmp_path / "m.safetensors", sd, {"format": "pt", "note": "kept"})
    assert_same(load_file(tmp_path / "m.safetensors"), sd)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_safetensors_written_by_the_package_read_by_us(tmp_path):
    sd = sample_state_dict()
    save_file(sd, tmp_path / "m.safetensors", metadata={"k": "v"})
    got, ck = read_all(tmp_path / "m.safetensors")
    assert_same(got, sd)
    assert ck.metadata == {"k": "v"}


def test_view_is_the_stored_tensor_without_a_copy(tmp_path):
    sd = sample_state_dict()
    save_file(sd, tmp_path / "m.safetensors")
    ck = open_checkpoint(tmp_path / "m.safetensors")
    view = ck.view("a.bias")  # bfloat16 travels as its bits
    assert view.dtype == np.uint16 and not view.flags.writeable and not view.flags.owndata
    assert torch.equal(to_torch(view.copy(), "bfloat16"), sd["a.bias"])
    ck.close()


def test_sharded_round_trip_through_index_and_folder(tmp_path):
    sd = {f"layer{i}.weight": torch.randn(64, 16) for i in range(5)}  # 4 KiB each
    paths = write(tmp_path / "model.safetensors", sd, {"format": "pt"}, shard_size=9000)
    names = sorted(p.name for p in paths)
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    assert paths == output_paths(tmp_path / "model.safetensors", entries_of(sd), 9000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 16 * 4
    assert set(index["weight_map"]) == set(sd)
    merged_back = {}
    for shard in set(index["weight_map"].values()):
        merged_back.update(load_file(tmp_path / shard))
    assert_same(merged_back, sd)
    assert_same(read_all(tmp_path / "model.safetensors.index.json")[0], sd)
    assert_same(read_all(tmp_path)[0], sd)


def test_shard_size_larger_than_model_writes_one_file(tmp_path):
    sd = sample_state_dict()
    assert write(tmp_path / "m.safetensors", sd, shard_size=10**9) == [tmp_path / "m.safetensors"]


def test_pt_round_trip_and_open_clip_wrapper(tmp_path):
    sd = sample_state_dict()
    write(tmp_path / "m.pt", sd)
    assert_same(torch.load(tmp_path / "m.pt", weights_only=True), sd)
    assert_same(read_all(tmp_path / "m.pt")[0], sd)
    # What open_clip's training script saves.
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}, tmp_path / "oc.pt")
    got, _ = read_all(tmp_path / "oc.pt")
    assert_same(got, {"module." + k: v for k, v in sd.items()})


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="Python objects") as e:
        open_checkpoint(tmp_path / "evil.pt")
    assert e.value.source.endswith("evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "bad_json", "text_pt"])
def test_broken_files_are_refused(tmp_path, kind):
    sd = sample_state_dict()
    path = tmp_path / "x.safetensors"
    save_file(sd, path)
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[:-10])
        match = "truncated"
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
        match = "not a safetensors"
    elif kind == "empty":
        path.write_bytes(b"")
        match = "not a safetensors"
    elif kind == "bad_json":
        path.write_bytes(raw[:8] + b"{" * (len(raw) - 8))
        match = "not JSON"
    else:
        path = tmp_path / "x.pt"
        path.write_text("hello, not a checkpoint\n")
        match = "not a checkpoint"
    with pytest.raises(InputError, match=match) as e:
        open_checkpoint(path)
    assert e.value.source == str(path)


def test_missing_file_and_index_naming_a_missing_tensor(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                   "b": "s1.safetensors"}}))
    with pytest.raises(InputError, match="not in s1.safetensors") as e:
        open_checkpoint(tmp_path / "m.safetensors.index.json")
    assert e.value.tensor == "b"


def test_failed_write_leaves_nothing(tmp_path):
    sd = sample_state_dict()
    for out in ["m.safetensors", "m.pt"]:
        with pytest.raises(RuntimeError, match="boom"):
            with CheckpointWriter(tmp_path / out, entries_of(sd), shard_size=64) as w:
                for i, (k, v) in enumerate(sd.items()):
                    if i == 3:
                        raise RuntimeError("boom")
                    w.write(k, v)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_out_of_order_tensors(tmp_path):
    sd = sample_state_dict()
    with pytest.raises(RuntimeError, match="expected a.weight"):
        with CheckpointWriter(tmp_path / "m.safetensors", entries_of(sd)) as w:
            w.write("a.bias", sd["a.bias"])
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_an_output_and_its_shards_are_recognised(tmp_path):
    from modelstock.io import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".model.safetensors.{dead.pid}-0123abcd.tmp": True,  # the single-file output
        f".model-00002-of-00003.safetensors.{dead.pid}-0123abcd.tmp": True,  # a shard, any count
        f".model.safetensors.index.json.{dead.pid}-0123abcd.tmp": True,  # its index
        f".model.safetensors.{os.getpid()}-0123abcd.tmp": False,  # a live process's
        f".model-v2.safetensors.{dead.pid}-0123abcd.tmp": False,  # another output
        f".model.safetensors.{dead.pid}.tmp": False,  # not our naming
        "model.safetensors": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path / "model.safetensors")
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stale in names.items() if not stale)
