"""Hugging Face hub ids (org/name, org/name@revision) as inputs of `modelstock merge` and of
mergekit configs, offline, from a cache laid out as huggingface_hub lays it out (checked with
its own scan_cache_dir): the snapshot of the revision asked for, only the model's own files
read, a local path first, one line for an id the cache lacks."""
import hashlib
import json
import os
import sys

import pytest
import torch

from modelstock.cli import main

from .helpers import assert_within, merge_tolerance, spec_merge_fp64
from .test_folders import llama, save_models
from .test_mergekit_yaml import merged_state, write_config

pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

# files a hub repo holds beside the model, which a merge must neither read nor copy
DECOYS = {"README.md": b"# a model card\n", "training_args.bin": b"not weights", "notes.txt": b"private",
          "onnx/model.onnx": b"an export"}
_opened: list | None = None


def _audit(event, args):
    if _opened is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _opened.append(os.path.abspath(args[0]))


sys.addaudithook(_audit)  # cannot be removed: it records only while a test sets _opened


@pytest.fixture
def opened():
    global _opened
    _opened = []
    yield _opened
    _opened = None


def put_in_cache(cache, repo, folder, revision="main"):
    """``folder``'s files and the decoys as the hub client stores a download: each file's bytes
    in blobs/<sha256>, snapshots/<commit>/<path> a relative symlink to its blob, and
    refs/<revision> naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} | DECOYS
    commit = hashlib.sha1(b"".join(name.encode() + data for name, data in sorted(files.items()))).hexdigest()
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return root / "snapshots" / commit


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """base, ft1, ft2 as local folders; in the cache acme/base (main) and acme/ft, whose main
    is ft2 and whose revision v2 is ft1 (so only the revision asked for gives the right merge)."""
    folders, states = save_models(tmp_path / "local", llama, 2)
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshots = [put_in_cache(cache, "acme/base", folders[0]), put_in_cache(cache, "acme/ft", folders[2]),
                 put_in_cache(cache, "acme/ft", folders[1], revision="v2")]
    scanned = {r.repo_id: r for r in huggingface_hub.scan_cache_dir(cache).repos}
    assert {ref for rev in scanned["acme/ft"].revisions for ref in rev.refs} == {"main", "v2"}
    return folders, states, cache, snapshots


def check_merge(out, states, clamp):
    got = merged_state(out)
    assert set(got) == set(states[0])
    for k, v in got.items():
        w0, ws = states[0][k], [s[k] for s in states[1:]]
        want, t = spec_merge_fp64(w0, ws, clamp=clamp)
        assert_within(v, want, merge_tolerance(want, w0, ws, w0.dtype, t=t), k)


def only_model_files_read(opened, cache):
    # the client reads its own bookkeeping (refs/, trees/); of the snapshot only the model's files are read
    read = sorted({os.path.relpath(p, cache) for p in opened if p.startswith(str(cache) + os.sep)})
    assert read, "nothing of the cache was read"
    model_files = ("config.json", "generation_config.json", "tokenizer.json", "special_tokens_map.json",
                   "model.safetensors")
    for p in read:
        assert p.split(os.sep)[1] in ("refs", "trees") or os.path.basename(p) in model_files, read


def test_mergekit_config_takes_hub_ids_from_the_cache_at_their_revision(hub, tmp_path, opened, capsys):
    folders, states, cache, _ = hub
    config = write_config(tmp_path / "ms.yml", "acme/base", ["acme/ft@v2", folders[2]])
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["mergekit-yaml", str(config), str(out), "--quiet"]) == 0, capsys.readouterr().err
    check_merge(out, states, clamp=False)
    only_model_files_read(opened, cache)
    assert (out / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()
    card = (out / "README.md").read_text()  # mergekit's card (naming the models as the config does), not the repo's
    assert "model card" not in card and "with acme/base as the base" in card and "* acme/ft@v2" in card
    assert not {"training_args.bin", "notes.txt", "onnx"} & {p.name for p in out.iterdir()}


def test_merge_takes_hub_ids_and_a_local_path_of_that_name_wins(hub, tmp_path, opened, monkeypatch):
    folders, states, cache, snapshots = hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "ft").symlink_to(folders[1])  # a local acme/ft: ft1, where the cache's main is ft2
    out = tmp_path / "out"
    assert main(["merge", "acme/base", "acme/ft", str(folders[2]), "-o", str(out), "--report", "r.json", "--quiet"]) == 0
    check_merge(out, states, clamp=True)
    inputs = json.loads((tmp_path / "r.json").read_text())["inputs"]  # the weights read: the snapshot's, the local
    assert inputs[0].startswith(str(snapshots[0]) + os.sep) and inputs[1].startswith(os.path.join("acme", "ft", "")), inputs
    only_model_files_read(opened, cache)
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "special_tokens_map.json"}


@pytest.mark.parametrize("command", ["merge", "mergekit-yaml"])
@pytest.mark.parametrize("ref", ["acme/nothing", "acme/ft@v3"])
def test_a_hub_id_the_cache_lacks_offline_is_one_line(hub, tmp_path, capsys, command, ref):
    folders, _, cache, _ = hub
    out = tmp_path / "out"
    if command == "merge":
        argv = ["merge", "acme/base", ref, str(folders[2]), "-o", str(out)]
    else:
        argv = ["mergekit-yaml", str(write_config(tmp_path / "ms.yml", "acme/base", [ref, folders[2]])), str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ref in err[0] and "not in the Hugging Face cache" in err[0] and str(cache) in err[0], err
    assert not out.exists()


def test_online_the_id_is_downloaded_at_its_revision_model_files_only(hub, tmp_path, monkeypatch):
    """Online, huggingface_hub downloads: asked for the revision and only the model's files
    (the stand-in serves them from the local folders)."""
    folders, states, _, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def snapshot_download(repo_id, *, revision=None, local_files_only, allow_patterns, **kwargs):
        asked.append((repo_id, revision, local_files_only))
        assert "config.json" in allow_patterns and "model.safetensors" in allow_patterns
        assert not any(pattern in allow_patterns for pattern in ("*", "*.md", "*.bin", "*.onnx", "*.txt"))
        return str({"acme/base": folders[0], "acme/ft": folders[1]}[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = tmp_path / "out"
    assert main(["merge", "acme/base", "acme/ft@v2", str(folders[2]), "-o", str(out), "--quiet"]) == 0
    assert asked == [("acme/base", None, False), ("acme/ft", "v2", False)]
    check_merge(out, states, clamp=True)


def test_without_huggingface_hub_an_id_is_one_line_naming_the_extra(hub, tmp_path, capsys, monkeypatch):
    folders, _, _, _ = hub
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", "acme/base", str(folders[1]), str(folders[2]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "acme/base" in err[0] and "pip install huggingface_hub" in err[0], err
    assert not out.exists()
