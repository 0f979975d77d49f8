"""`modelstock mergekit-yaml`: mergekit's own config for merge_method: model_stock, over Llama
folders built with transformers (small config, random weights), against the fp64 formula as
mergekit's model_stock defines it (cos clipped to [-1, 1] only: clamp=False)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from modelstock.cli import main

from .helpers import assert_within, merge_tolerance, spec_merge_fp64
from .test_folders import llama, save_models

transformers = pytest.importorskip("transformers")


def write_config(path, base, models, extra=""):
    path.write_text("merge_method: model_stock\n"
                    f"base_model: {base}\n"
                    "models:\n" + "".join(f"  - model: {m}\n" for m in models) + extra)
    return path


def merged_state(folder):
    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(f))
    return sd


@pytest.mark.parametrize("filter_wise", [False, True])
def test_config_merges_like_mergekit_and_writes_its_folder(tmp_path, filter_wise, capsys):
    folders, states = save_models(tmp_path, llama, 3)
    # the base listed among the models too, as mergekit configs often do: it counts once
    config = write_config(tmp_path / "ms.yml", folders[0], [folders[0], *folders[1:]],
                          f"parameters:\n  filter_wise: {str(filter_wise).lower()}\ndtype: float32\n")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["mergekit-yaml", str(config), str(out), "--lazy-unpickle", "--allow-crimes", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "--lazy-unpickle means nothing here" in err and "--allow-crimes means nothing here" in err
    assert (out / "README.md").read_text().count("model_stock") >= 1
    assert (out / "mergekit_config.yml").read_text() == config.read_text()
    assert (out / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()
    assert (out / "tokenizer.json").is_file()
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = merged_state(out)
    for k, v in got.items():
        w0, ws = states[0][k], [s[k] for s in states[1:]]
        want, t = spec_merge_fp64(w0, ws, granularity="row" if filter_wise else "tensor", clamp=False)
        assert_within(v, want, merge_tolerance(want, w0, ws, w0.dtype, t=t), k)


def test_dtype_shard_size_and_no_tokenizer(tmp_path):
    folders, _ = save_models(tmp_path, llama, 2)
    config = write_config(tmp_path / "ms.yml", folders[0], folders[1:], "dtype: bfloat16\n")
    out = tmp_path / "out"
    assert main(["mergekit-yaml", str(config), str(out), "--out-shard-size", "20K", "--no-copy-tokenizer",
                 "--quiet"]) == 0
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors.index.json").is_file()
    assert all(v.dtype == torch.bfloat16 for v in merged_state(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # loads in bf16, as mergekit's


@pytest.mark.parametrize("body,message", [
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {f}\n  - model: {g}\n", "merge_method 'ties'"),
    ("merge_method: model_stock\nbase_model: meta-llama/Llama-3-8B\nmodels:\n  - model: {f}\n  - model: {g}\n",
     "not a local path"),
    ("merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f}\n", "at least two models"),
    ("merge_method: model_stock\nbase_model: {b}\nslices:\n  - sources: []\nmodels:\n  - model: {f}\n  - model: {g}\n",
     "not supported"),
    ("merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f}\n  - model: {g}\nparameters:\n  weight: 2\n",
     "only filter_wise"),
    ("merge_method: [model_stock\n", "not valid YAML"),
])
def test_configs_this_cannot_honour_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, body, message):
    folders, _ = save_models(tmp_path, llama, 2)
    config = tmp_path / "bad.yml"
    config.write_text(body.format(b=folders[0], f=folders[1], g=folders[2]))
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' own progress bars while saving the models
    assert main(["mergekit-yaml", str(config), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
