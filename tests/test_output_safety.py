"""A user's files are sacred: a merge never deletes, overwrites or reads beyond what it was given.

Every case here did harm or read too far before (main at fe64edc): `--force` into an input
folder deleted the base's shards, `--force` into an existing folder deleted optimizer state and
other formats, an index could name shards outside its folder, malformed safetensors that the
safetensors library refuses were merged, and `--report` into a missing folder failed only after
the output was written."""
import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelstock import InputError, merge_files
from modelstock.cli import main

from .test_folders import llama, save_models, transformers  # noqa: F401  (transformers: importorskip)


def tree(root):
    """Every file under ``root`` (links as their target's text), by content: what must not change."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def run(argv, capsys):
    rc = main(["merge", *map(str, argv), "--quiet"])
    err = capsys.readouterr().err.strip()
    return rc, err


def refused(argv, capsys, root, *must_say):
    before = tree(root)
    rc, err = run(argv, capsys)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("modelstock: error: "), err
    for text in must_say:
        assert text in err, (text, err)
    assert tree(root) == before
    return err


@pytest.fixture
def sharded(tmp_path):
    folders, _ = save_models(tmp_path, llama, 2, "20KB")
    assert len(list(folders[0].glob("model-*-of-*.safetensors"))) > 1
    return tmp_path, folders


@pytest.mark.parametrize("which", ["base", "ft2"])
def test_force_into_an_input_folder_is_refused_and_touches_nothing(sharded, capsys, which):
    root, folders = sharded
    out = folders[0] if which == "base" else folders[2]
    refused([*folders, "-o", out, "--force"], capsys, root, str(out), "overwrite an input")


def test_an_output_that_resolves_to_holds_or_lies_in_an_input_is_refused(sharded, capsys):
    root, folders = sharded
    (root / "link").symlink_to(folders[0], target_is_directory=True)
    refused([*folders, "-o", root / "link", "--force"], capsys, root, "overwrite an input")
    # the folder holding the inputs
    refused([*folders, "-o", root, "--force"], capsys, root, "holds an input")
    # a new folder inside an input folder (a second set of weights there would change the input)
    refused([*folders, "-o", folders[1] / "merged"], capsys, root, "inside the input folder")
    # a fine-tuned model given as a file whose folder is the output
    refused([folders[0], folders[1], folders[2] / "model.safetensors.index.json", "-o", folders[2], "--force"],
            capsys, root)
    # a single-file output that is a link to a shard of an input
    shard = sorted(folders[1].glob("model-*.safetensors"))[0]
    (root / "out.safetensors").symlink_to(shard)
    refused([root / "base" / "model.safetensors.index.json", folders[1] / "model.safetensors.index.json",
             folders[2] / "model.safetensors.index.json", "-o", root / "out.safetensors", "--force"],
            capsys, root, "overwrite an input")


def test_force_replaces_only_what_the_merge_writes_and_the_weights_it_replaces(sharded, capsys):
    root, folders = sharded
    out = root / "merged"
    out.mkdir()
    keep = {"training_args.bin": b"args", "optimizer.pt": b"adam", "rng_state.pth": b"rng",
            "scheduler.pt": b"sched", "model.Q4_K_M.gguf": b"gguf", "notes.txt": b"mine"}
    for name, data in keep.items():
        (out / name).write_bytes(data)
    # weights of an older layout that would shadow the new ones: replaced
    old = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
           "model-00001-of-00009.safetensors", "model.safetensors.index.json"]
    for name in old:
        (out / name).write_bytes(b"old")
    (out / "config.json").write_text("{}")  # a file the merge writes: replaced with the base's
    rc, err = run([*folders, "-o", out], capsys)
    assert rc == 2 and "--force" in err  # without --force: the folder holds files it would replace
    rc, err = run([*folders, "-o", out, "--force"], capsys)
    assert rc == 0, err
    for name, data in keep.items():
        assert (out / name).read_bytes() == data, name
    assert not any((out / name).exists() for name in old)
    assert (out / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_an_existing_folder_of_unrelated_files_needs_no_force_and_keeps_them(sharded, capsys):
    root, folders = sharded
    out = root / "merged"
    out.mkdir()
    (out / "optimizer.pt").write_bytes(b"adam")
    rc, err = run([*folders, "-o", out], capsys)
    assert rc == 0, err
    assert (out / "optimizer.pt").read_bytes() == b"adam" and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "ABS", "sub/x.safetensors", ".."])
def test_an_index_may_name_only_files_in_its_own_folder(tmp_path, capsys, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    g = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(4, 4, generator=g)}
    save_file(w, outside / "x.safetensors")
    (tmp_path / "ft" / "sub").mkdir(parents=True)
    save_file(w, tmp_path / "ft" / "sub" / "x.safetensors")
    name = str(outside / "x.safetensors") if shard == "ABS" else shard
    (tmp_path / "ft" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    save_file({"w": w["w"] + 0.01}, tmp_path / "base.safetensors")
    save_file({"w": w["w"] - 0.01}, tmp_path / "ft1.safetensors")
    err = refused([tmp_path / "base.safetensors", tmp_path / "ft1.safetensors",
                   tmp_path / "ft" / "model.safetensors.index.json", "-o", tmp_path / "o.safetensors"],
                  capsys, tmp_path, "model.safetensors.index.json", "tensor 'w'", "file name in the index's folder")
    assert not (tmp_path / "o.safetensors").exists(), err


def _raw_safetensors(path, header: dict, data: bytes, pad_to=None):
    raw = json.dumps(header).encode()
    if pad_to:
        raw += b" " * (pad_to - len(raw))
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _malformed(path, case):
    """A file the safetensors library refuses, with the tensor our error must name."""
    f32 = lambda n: torch.arange(n, dtype=torch.float32).numpy().tobytes()  # noqa: E731
    if case == "overlap":  # b's data starts inside a's
        _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, f32(6))
        return "b"
    if case == "alias":  # two names over the same bytes
        _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32(4))
        return "b"
    if case == "gap":
        _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, f32(6))
        return "b"
    if case == "trailing":
        _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32(4))
        return "a"
    if case == "huge_header":  # within the old 100 MiB cap, over the format's 100,000,000 bytes
        _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32(2),
                         pad_to=100_000_008)
        return None
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["overlap", "alias", "gap", "trailing", "huge_header"])
def test_malformed_safetensors_refused_as_the_library_refuses_them(tmp_path, capsys, case):
    bad = tmp_path / "ft2.safetensors"
    tensor = _malformed(bad, case)
    with pytest.raises(Exception):  # the independent truth: the safetensors library refuses it
        with safe_open(str(bad), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    names = {"a": [2], "b": [2]} if case in ("gap",) else {"a": [4], "b": [4]} if case in ("overlap", "alias") \
        else {"a": [2]}
    base = {k: torch.zeros(s) for k, s in names.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file({k: v + 1 for k, v in base.items()}, tmp_path / "ft1.safetensors")
    must = [str(bad)] + ([f"tensor '{tensor}'"] if tensor else ["100000000"])
    refused([tmp_path / "base.safetensors", tmp_path / "ft1.safetensors", bad, "-o", tmp_path / "o.safetensors"],
            capsys, tmp_path, *must)
    bad.unlink()  # the 100 MB file


@pytest.mark.parametrize("flag", ["--report", "--plot"])
def test_report_and_plot_paths_checked_before_any_input_is_read(tmp_path, capsys, flag, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": w + 0.01 * i * torch.randn(8, generator=g)}, paths[-1])
    import modelstock.merging.files as files

    def no_reading(*a, **k):
        raise AssertionError("an input was opened before the output paths were checked")

    monkeypatch.setattr(files, "open_checkpoint", no_reading)
    name = "r.json" if flag == "--report" else "p.png"
    refused([*paths, "-o", tmp_path / "o.safetensors", flag, tmp_path / "missing" / name], capsys, tmp_path,
            "folder does not exist", "missing")
    refused([*paths, "-o", tmp_path / "o.safetensors", flag, paths[1], "--force"], capsys, tmp_path,
            "overwrite an input")
    refused([*paths, "-o", tmp_path / "o.safetensors", flag, tmp_path / "o.safetensors"], capsys, tmp_path,
            "different files")


def test_merge_files_refuses_an_output_folder_holding_its_inputs(tmp_path):
    folders, _ = save_models(tmp_path, llama, 2)
    before = tree(tmp_path)
    with pytest.raises(InputError, match="overwrite an input"):
        merge_files(folders[0], folders[1:], folders[1], force=True)
    assert tree(tmp_path) == before
