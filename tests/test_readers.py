"""The reader contract (``modelstock/io/source.py``), held for every registered format.

Each format has a builder below that writes a checkpoint the way its own ecosystem does (the
safetensors library, torch.save, a Hugging Face index, a model folder, ...); the reader must
give back exactly those tensors: names in order, dtypes, shapes, a view, a read and a partial
read of each, the files it reads, and a clean close. A format registered without a builder
here fails the first test, so a new format cannot join without this check."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelstock.io import open_checkpoint, to_numpy
from modelstock.io.source import formats

from .test_checkpoint import sample_state_dict as sample


def _index(folder, sd, shard_name, save, index_name):
    """Two shards and a Hugging Face index, as save_pretrained lays them out."""
    names = list(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        file = shard_name.format(i + 1, len(parts))
        save({k: sd[k] for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder / index_name


def build_safetensors(tmp, sd):
    save_file(sd, tmp / "m.safetensors")
    return tmp / "m.safetensors"


def build_torch_file(tmp, sd):
    torch.save(sd, tmp / "m.pt")
    return tmp / "m.pt"


def build_index(tmp, sd):
    return _index(tmp, sd, "model-{:05d}-of-{:05d}.safetensors", save_file, "model.safetensors.index.json")


def build_model_folder(tmp, sd):
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(sd, folder / "model.safetensors")
    return folder


def build_distributed_checkpoint(tmp, sd):
    # one process here (the 2-rank saves are tests/test_distributed_checkpoint.py's): the same
    # folder layout, written by the same dcp.save
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": sd, "optimizer": {"step": 3}}, checkpoint_id=tmp / "ckpt", no_dist=True)
    return tmp / "ckpt"


BUILDERS = {
    "safetensors": build_safetensors,
    "torch file": build_torch_file,
    "index": build_index,
    "model folder": build_model_folder,
    "distributed checkpoint": build_distributed_checkpoint,
}


def test_every_registered_format_is_held_to_the_contract():
    assert {f.name for f in formats()} == set(BUILDERS)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process says so
@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_reader_contract(tmp_path, fmt):
    sd = sample()
    path = BUILDERS[fmt](tmp_path, sd)
    with open_checkpoint(path) as ck:
        assert str(ck.path).startswith(str(tmp_path))
        assert isinstance(ck.metadata, dict)
        meta = ck.tensors()
        assert sorted(meta) == sorted(sd)
        for name, t in sd.items():
            want = to_numpy(t)
            dtype, shape = meta[name]
            assert dtype == str(t.dtype).removeprefix("torch.") and tuple(shape) == tuple(t.shape), name
            view = ck.view(name)
            assert view.ndim == 1 and view.size == t.numel() and view.dtype == want.dtype, name
            assert np.array_equal(view, want.reshape(-1)), name
            read = ck.read(name)
            assert read.shape == tuple(t.shape) and np.array_equal(read, want), name
            if read.size:
                read.reshape(-1)[0] = read.reshape(-1)[-1] + 1  # the caller owns a read
                assert np.array_equal(ck.read(name), want), name
            raw = want.reshape(-1).view(np.uint8)
            for at, size in [(0, raw.size), (raw.size // 3, raw.size - raw.size // 3 - 1)]:
                dest = np.zeros(max(size, 0), np.uint8)
                ck.read_into(name, dest, at)
                assert np.array_equal(dest, raw[at: at + size]), (name, at)
        files = ck.files()
        assert files and all(tmp_path.resolve() in Path(f).resolve().parents for f in files)
    ck.close()  # closing twice is harmless
