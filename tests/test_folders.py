"""Hugging Face model folders in, a model folder out: built with transformers' own classes from
small configs (random weights, nothing downloaded), merged by the command line, loaded back with
from_pretrained; weights against the fp64 formula, companion files byte for byte."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelstock import InputError, merge_files
from modelstock.cli import main

from .helpers import assert_within, merge_tolerance, spec_merge_fp64

transformers = pytest.importorskip("transformers")


def clip():
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=24)
    return transformers.CLIPModel, cfg


def llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM, cfg


def save_models(root, arch, n, shard=None):
    """base/ and ft1/..ftN/ (the fine-tuned ones: the base plus a shared and an own update), each
    with the base's extra files; returns the folders and their state dicts."""
    cls, cfg = arch()
    torch.manual_seed(0)
    base = cls(cfg).eval()
    folders, states = [], []
    shared = {k: torch.randn_like(v) for k, v in base.state_dict().items() if v.is_floating_point()}
    for i in range(n + 1):
        model = cls(cfg).eval()
        model.load_state_dict(base.state_dict())
        if i:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.add_(1e-2 * (0.6 * shared[k] + 0.4 * torch.randn_like(p)))
        folder = root / ("base" if i == 0 else f"ft{i}")
        model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "stand-in"}}')
        (folder / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
        folders.append(folder)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return folders, states


def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", [clip, llama], ids=["clip", "llama"])
@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_folders_in_folder_out_loads_with_from_pretrained(tmp_path, arch, shard):
    folders, states = save_models(tmp_path, arch, 2, shard)
    out = tmp_path / "merged"
    argv = ["merge", *map(str, folders), "-o", str(out), "--quiet"] + (["--shard-size", shard] if shard else [])
    assert main(argv) == 0
    base = folders[0]
    # every file of the base but its weights, byte for byte, and nothing else
    def others(folder):
        return sorted(p.name for p in folder.iterdir() if not p.name.endswith((".safetensors", ".safetensors.index.json")))

    assert others(out) == others(base) and {"config.json", "tokenizer.json"} <= set(others(base))
    for name in others(base):
        assert digest(out / name) == digest(base / name), name
    if shard:
        assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    else:
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    cls, _ = arch()
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got = model.state_dict()
    saved = {}
    for f in base.glob("*.safetensors"):
        saved.update(load_file(f))
    for k in saved:  # the merged tensors against the fp64 formula
        w0, ws = states[0][k], [s[k] for s in states[1:]]
        want, t = spec_merge_fp64(w0, ws)
        assert_within(got[k], want, merge_tolerance(want, w0, ws, w0.dtype, t=t), k)


def test_folder_output_refuses_to_overwrite_and_replaces_with_force(tmp_path):
    folders, _ = save_models(tmp_path, llama, 2, "20KB")
    out = tmp_path / "merged"
    assert main(["merge", *map(str, folders), "-o", str(out), "--quiet", "--shard-size", "20KB"]) == 0
    before = {p.name: digest(p) for p in out.iterdir()}
    assert main(["merge", *map(str, folders), "-o", str(out), "--quiet"]) == 2  # exists: nothing touched
    assert {p.name: digest(p) for p in out.iterdir()} == before
    # --force into the same folder with another layout: the old shards and index are gone
    assert main(["merge", *map(str, folders), "-o", str(out), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_file_where_the_output_folder_goes_is_an_error(tmp_path):
    folders, _ = save_models(tmp_path, llama, 2)
    (tmp_path / "merged").write_text("not a folder")
    with pytest.raises(InputError, match="output is a folder"):
        merge_files(folders[0], folders[1:], tmp_path / "merged")


def test_fine_tuned_inputs_may_be_single_files(tmp_path):
    folders, _ = save_models(tmp_path, llama, 2)
    out = tmp_path / "merged"
    merge_files(folders[0], [folders[1] / "model.safetensors", folders[2]], out)
    assert not transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)[1]["missing_keys"]


def save_bin(folder, state_dict, shards=1):
    """A model folder as transformers 4 wrote it without safetensors: ``pytorch_model.bin``, or
    ``pytorch_model-0000k-of-0000n.bin`` shards and ``pytorch_model.bin.index.json``."""
    (folder / "model.safetensors").unlink(missing_ok=True)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    names = list(state_dict)
    if shards == 1:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, folder / "pytorch_model.bin")
        return
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * len(names) // shards: (i + 1) * len(names) // shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state_dict[k].contiguous() for k in part}, folder / file)
        weight_map.update({k: file for k in part})
        total += sum(state_dict[k].numel() * state_dict[k].element_size() for k in part)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


@pytest.mark.parametrize("layout", ["base-bin", "fine-tuned-bin"])
def test_bin_folders_read_as_base_or_fine_tuned_and_written_as_safetensors(tmp_path, layout):
    folders, states = save_models(tmp_path, llama, 2)
    (folders[0] / "training_args.bin").write_bytes(b"not weights")  # beside them, as trainers leave it
    if layout == "base-bin":
        save_bin(folders[0], states[0], shards=3)
    else:
        save_bin(folders[1], states[1])
        save_bin(folders[2], states[2], shards=2)
    out = tmp_path / "merged"
    assert main(["merge", *map(str, folders), "-o", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir() if "model" in p.name) == ["model.safetensors"]
    assert not (out / "training_args.bin").exists()
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = model.state_dict()
    for k, w0 in states[0].items():
        if w0.is_floating_point():
            ws = [s[k] for s in states[1:]]
            want, t = spec_merge_fp64(w0, ws)
            assert_within(got[k], want, merge_tolerance(want, w0, ws, w0.dtype, t=t), k)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"  # transformers 4 refuses safetensors without it


def test_a_folder_without_model_weights_is_refused(tmp_path, capsys):
    folders, _ = save_models(tmp_path, llama, 2)
    for f in folders[2].glob("model*.safetensors*"):
        f.unlink()
    (folders[2] / "training_args.bin").write_bytes(b"not weights")
    assert main(["merge", *map(str, folders), "-o", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(folders[2]) in err and "pytorch_model.bin" in err and not (tmp_path / "m").exists()


def test_output_dtype_is_written_into_the_config(tmp_path):
    folders, _ = save_models(tmp_path, llama, 2)
    out = tmp_path / "merged"
    assert main(["merge", *map(str, folders), "-o", str(out), "--quiet", "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16  # as mergekit's output loads
    # a config as transformers 4 wrote it (torch_dtype, also in a sub-config), given mergekit's name
    cfg = json.loads((folders[0] / "config.json").read_text())
    cfg.pop("dtype")
    cfg.update(torch_dtype="float32", text_config={"torch_dtype": "float32", "hidden_size": 32})
    (folders[0] / "config.json").write_text(json.dumps(cfg))
    out2 = tmp_path / "merged2"
    assert main(["merge", *map(str, folders), "-o", str(out2), "--quiet", "--dtype", "float16"]) == 0
    got = json.loads((out2 / "config.json").read_text())
    assert got["torch_dtype"] == "float16" and got["text_config"]["torch_dtype"] == "float16"
    assert {k: v for k, v in got.items() if k not in ("torch_dtype", "text_config")} == \
        {k: v for k, v in cfg.items() if k not in ("torch_dtype", "text_config")}
