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
    ("merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f}\n  - model: {g}\nparameters:\n"
     "  filter_wise: maybe\n", "true or false"),
    ("merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f}\n  - model: {g}\ntokenizer:\n"
     "  source: union\n", "only the base's tokenizer"),
    ("merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f}\n  - model: {g}\ntokenizer:\n"
     "  source: base\n  tokens:\n    <x>: {{source: {f}}}\n", "token surgery"),
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


def save_tokenizer(folder, size):
    """A real tokenizer (transformers' fast tokenizer over a word-level vocabulary) of ``size``
    tokens, saved as save_pretrained saves it, in place of the stand-in."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(size - 3)}
    vocab.update({"<unk>": size - 3, "<s>": size - 2, "</s>": size - 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    fast.save_pretrained(folder)


PUBLISHED = """merge_method: model_stock
base_model: {b}
models:
  - model: {f}
    parameters:
      weight: 1.0
  - model: {g}
parameters:
  normalize: true
  int8_mask: true
{tokenizer}dtype: float32
"""


@pytest.mark.parametrize("tokenizer,rows", [
    ("", 128),                                                   # no tokenizer asked for: as stored
    ("tokenizer_source: base\n", 100),                           # the base's 100 tokens
    ("tokenizer:\n  source: base\n", 100),                       # the same, in mergekit's newer form
    ("tokenizer:\n  source: base\n  pad_to_multiple_of: 48\n", 144),  # padded with the mean row
])
def test_published_configs_and_the_base_tokenizer_resize_the_vocabulary(tmp_path, capsys, tokenizer, rows):
    folders, states = save_models(tmp_path, llama, 2)
    for f in folders:
        save_tokenizer(f, 100)  # 100 tokens for 128 embedding rows (a padded vocabulary)
    config = tmp_path / "ms.yml"
    config.write_text(PUBLISHED.format(b=folders[0], f=folders[1], g=folders[2], tokenizer=tokenizer))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["mergekit-yaml", str(config), str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "parameters.normalize" in err and "parameters.int8_mask" in err and "models[0].parameters" in err
    got = merged_state(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    for k, v in got.items():
        w0, ws = states[0][k], [s[k] for s in states[1:]]
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert v.shape == (rows, 32), k
            kept = min(rows, 100) if tokenizer else 128
            w0, ws = (torch.cat([w[:kept], w[:kept].mean(0, keepdim=True).expand(rows - kept, -1)]) for w in [w0, *ws]), None
            w0, *ws = w0
        want, t = spec_merge_fp64(w0, ws, clamp=False)
        assert_within(v, want, merge_tolerance(want, w0, ws, w0.dtype, t=t), k)
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_base_tokenizer_with_fine_tuned_tokenizers_that_differ_is_refused(tmp_path, capsys):
    folders, _ = save_models(tmp_path, llama, 2)
    for f in folders:
        save_tokenizer(f, 100)
    save_tokenizer(folders[2], 90)  # its ids differ: token surgery
    config = tmp_path / "ms.yml"
    config.write_text(PUBLISHED.format(b=folders[0], f=folders[1], g=folders[2], tokenizer="tokenizer_source: base\n"))
    capsys.readouterr()
    assert main(["mergekit-yaml", str(config), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("modelstock: error:")]
    assert len(err) == 1 and str(folders[2]) in err[0] and "numbers the base's tokens differently" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokenizer,rows", [
    ("tokenizer_source: base\n", 128),
    ("tokenizer:\n  source: base\n", 128),
    ("tokenizer:\n  source: base\n  pad_to_multiple_of: 48\n", 144),
])
def test_base_tokenizer_with_fine_tunes_that_added_tokens_merges_the_base_tokens_rows(tmp_path, capsys, tokenizer,
                                                                                        rows):
    """mergekit's tokenizer_source: base maps each model's rows to the base tokenizer's tokens
    (mergekit/tokenizer/build.py's permutations, embed.py's PermutedEmbeddings): fine-tunes that
    added tokens (their tokenizers keeping the base's ids) lose the rows past them."""
    folders, states = save_models(tmp_path, llama, 2)  # 128 embedding rows
    for f in folders:
        save_tokenizer(f, 128)
    for i, f in enumerate(folders[1:], 1):  # as a fine-tune adds tokens: the tokenizer's, then the model's rows
        tok = transformers.AutoTokenizer.from_pretrained(f)
        tok.add_tokens(["<tool>", f"<own{i}>"])
        tok.save_pretrained(f)
        model = transformers.LlamaForCausalLM.from_pretrained(f)
        model.resize_token_embeddings(len(tok))
        with torch.no_grad():  # the new rows trained too
            model.get_input_embeddings().weight[128:] += 0.1 * torch.randn(2, 32)
        model.save_pretrained(f)
        states[i] = merged_state(f)
        assert states[i]["model.embed_tokens.weight"].shape == (130, 32)
    config = tmp_path / "ms.yml"
    config.write_text(PUBLISHED.format(b=folders[0], f=folders[1], g=folders[2], tokenizer=tokenizer))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["mergekit-yaml", str(config), str(out), "--quiet"]) == 0
    notice = [line for line in capsys.readouterr().err.splitlines() if "tokenizer source base" in line]
    assert len(notice) == 1 and all(f"{f} (130 rows)" in notice[0] for f in folders[1:]), notice
    got = merged_state(out)
    assert {k: v.shape for k, v in got.items()} == {
        k: (rows, 32) if k in ("model.embed_tokens.weight", "lm_head.weight") else v.shape for k, v in states[0].items()}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    for k, v in got.items():
        w0, ws = states[0][k], [s[k] for s in states[1:]]
        if k in ("model.embed_tokens.weight", "lm_head.weight"):  # the base's 128 tokens, then the pad
            w0, *ws = (torch.cat([w[:128], w[:128].mean(0, keepdim=True).expand(rows - 128, -1)]) for w in [w0, *ws])
        want, t = spec_merge_fp64(w0, ws, clamp=False)
        assert_within(v, want, merge_tolerance(want, w0, ws, w0.dtype, t=t), k)
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(folders[0]).get_vocab()
    assert transformers.LlamaForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape == (rows, 32)


# every option of mergekit-yaml 0.1.5's --help, as a user would pass it (values where it takes one)
MERGEKIT_FLAGS = [
    ["--allow-crimes"], ["--no-allow-crimes"], ["--unsafe-truncate-embeddings"], ["--no-unsafe-truncate-embeddings"],
    ["--trust-remote-code"], ["--no-trust-remote-code"], ["--transformers-cache", "/tmp/cache"],
    ["--lora-merge-cache", "/tmp/lora"], ["--lora-merge-dtype", "bfloat16"], ["--random-seed", "7"], ["-v"], ["-vv"],
    ["--quiet"], ["--no-quiet"], ["--cuda"], ["--no-cuda"], ["--device", "cpu"], ["--low-cpu-memory"],
    ["--no-low-cpu-memory"], ["--lazy-unpickle"], ["--no-lazy-unpickle"], ["--read-to-gpu"], ["--no-read-to-gpu"],
    ["--multi-gpu"], ["--no-multi-gpu"], ["-j", "2"], ["--num-threads", "1"], ["--gpu-rich"], ["--async-write"],
    ["--no-async-write"], ["--write-threads", "2"], ["--out-shard-size", "5B"], ["--copy-tokenizer"],
    ["--no-copy-tokenizer"], ["--clone-tensors"], ["--no-clone-tensors"], ["--write-model-card"],
    ["--no-write-model-card"], ["--safe-serialization"], ["--no-safe-serialization"],
]


def test_every_mergekit_yaml_flag_is_accepted(tmp_path, capsys, monkeypatch):
    import modelstock.mergekit as mergekit

    calls = []
    monkeypatch.setattr(mergekit, "run_config", lambda *a, **k: calls.append(k) or type(
        "R", (), {"summary": lambda self: "merged"})())
    monkeypatch.delenv("MODELSTOCK_THREADS", raising=False)
    for flag in MERGEKIT_FLAGS:
        capsys.readouterr()
        assert main(["mergekit-yaml", "c.yml", str(tmp_path / "out"), *flag]) == 0, flag
        err = capsys.readouterr().err
        effective = {"--quiet", "--no-quiet", "--cuda", "--no-cuda", "--device", "-j", "--num-threads", "--gpu-rich",
                     "--out-shard-size", "--copy-tokenizer", "--no-copy-tokenizer", "--write-model-card",
                     "--no-write-model-card"}
        if flag[0] not in effective:  # one line saying it changes nothing here
            assert len(err.strip().splitlines()) == 1 and "ignored" in err and flag[0].lstrip("-")[:1] in err, flag
    by_flag = {tuple(f): k for f, k in zip(MERGEKIT_FLAGS, calls)}
    assert by_flag[("--cuda",)]["device"] == "cuda" and by_flag[("--gpu-rich",)]["device"] == "cuda"
    assert by_flag[("--device", "cpu")]["device"] == "cpu" and by_flag[("--no-copy-tokenizer",)]["copy_tokenizer"] is False
    import os

    assert os.environ["MODELSTOCK_THREADS"] == "1"  # the last -j / --num-threads given
