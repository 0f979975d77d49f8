"""Model Stock on PEFT LoRA adapters, from their factors (modelstock/io/adapters.py,
modelstock/lowrank.py, modelstock/merging/adapters.py). Real adapters built with peft on a tiny
Llama made from a config; the truth is the spec's formula in fp64 on the weights peft itself
materializes from each adapter (merge_and_unload on an fp64 copy of the base)."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import modelstock
from modelstock import InputError, lowrank
from modelstock.cli import main

from .helpers import spec_merge_fp64

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_config():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "base"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


def make_adapter(base_dir, out, *, r=4, alpha=8, targets=("q_proj", "v_proj"), seed=1, safe=True, **config):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    randomize_lora(pm, 0.05)
    pm.save_pretrained(out, safe_serialization=safe)
    return out


def randomize_lora(pm, std):
    """Trained-looking factors (peft starts B at zero): every update nonzero."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)


def full_finetune(base_dir, out, seed=5):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def materialized(base_dir, adapter_dir):
    """peft's own application of the adapter to the base, in fp64: the base's state dict."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir).double()
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.double() for k, v in merged.state_dict().items()}


def fp64_truth(base_dir, finetuned, granularity="tensor", clamp=True):
    base = {k: v.double() for k, v in transformers.LlamaForCausalLM.from_pretrained(base_dir).state_dict().items()}
    fts = []
    for f in finetuned:
        if (f / "adapter_config.json").exists():
            fts.append(materialized(base_dir, f))
        else:
            fts.append({k: v.double() for k, v in load_file(f / "model.safetensors").items()})
    return {k: spec_merge_fp64(w0, [ft[k] for ft in fts], granularity=granularity, clamp=clamp)[0]
            for k, w0 in base.items() if k in fts[0]}


def assert_relative(got: dict, want: dict, bound: float):
    """||got - want|| <= bound ||want|| for every tensor (exact where want is 0)."""
    for k, ref in want.items():
        err, size = float((got[k].double() - ref).norm()), float(ref.norm())
        assert err <= bound * size, f"{k}: error {err:.3g} > {bound} x {size:.3g}"


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """Different ranks, targets and scalings: alpha / r, rsLoRA with an alpha_pattern, an
    embedding, the MLP; every weight is targeted by some adapter but not by all."""
    d = tmp_path_factory.mktemp("adapters")
    return [make_adapter(base_dir, d / "a", r=4, alpha=8, targets=("q_proj", "v_proj"), seed=1),
            make_adapter(base_dir, d / "b", r=8, alpha=16, seed=2, use_rslora=True,
                         targets=("q_proj", "k_proj", "o_proj", "gate_proj", "embed_tokens"),
                         alpha_pattern={"k_proj": 4}),
            make_adapter(base_dir, d / "c", r=2, alpha=3, targets=("q_proj", "down_proj", "lm_head"), seed=3,
                         safe=False)]


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_full_output_matches_the_fp64_formula(base_dir, adapters, tmp_path, granularity):
    out = tmp_path / "merged"
    report = modelstock.merge_files(base_dir, adapters, out, granularity=granularity)
    got = transformers.LlamaForCausalLM.from_pretrained(out).state_dict()
    assert_relative(got, fp64_truth(base_dir, adapters, granularity), 1e-6)
    assert report.method == "model_stock" and len(report.layers) == len(got)
    untargeted = next(s for s in report.layers if s.name == "model.norm.weight")
    assert untargeted.t == 0.0 and untargeted.norms == [0.0, 0.0, 0.0]


def test_adapter_output_applied_by_peft_gives_the_merge(base_dir, adapters, tmp_path):
    out = tmp_path / "merged-adapter"
    modelstock.merge_files(None, adapters, out, adapter=True)  # the base the adapters name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and not config["use_rslora"]
    got = materialized(base_dir, out)
    assert_relative(got, fp64_truth(base_dir, adapters), 1e-5)
    factors = load_file(out / "adapter_model.safetensors")
    q = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert q.shape[0] == 4 + 8 + 2  # rank sum(r_i) where all three target it
    # scale 1: lora_alpha equals the rank for every module
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]


def test_adapters_mixed_with_a_full_finetune(base_dir, adapters, tmp_path):
    full = full_finetune(base_dir, tmp_path / "full")
    inputs = [adapters[0], full, adapters[1]]
    modelstock.merge_files(base_dir, inputs, tmp_path / "m")  # a model folder, as the base
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert_relative(got, fp64_truth(base_dir, inputs), 1e-6)
    with pytest.raises(InputError, match="every fine-tuned input must be one; this is a full checkpoint"):
        modelstock.merge_files(base_dir, inputs, tmp_path / "a", adapter=True)


def test_factor_statistics_equal_the_materialized_ones():
    g = np.random.default_rng(0)
    rows, k = 7, 11
    w0 = g.standard_normal((rows, k)).astype(np.float32)
    deltas = [lowrank.LowRank(g.standard_normal((rows, 3)).astype(np.float32),
                              g.standard_normal((3, k)).astype(np.float32), 0.7),
              lowrank.LowRank(g.standard_normal((rows, 5)).astype(np.float32),
                              g.standard_normal((5, k)).astype(np.float32), 1 / math.sqrt(5)),
              lowrank.Full(w0 + 0.1 * g.standard_normal((rows, k)).astype(np.float32)),
              lowrank.Zero()]
    dense = [d.scale * d.bm.astype(np.float64) @ d.am.astype(np.float64) for d in deltas[:2]]
    dense += [deltas[2].w.astype(np.float64) - w0.astype(np.float64), np.zeros((rows, k))]
    for rows_ in (1, rows):
        want = np.einsum("iqk,jqk->qij", *[np.stack([d.reshape(rows_, -1) for d in dense])] * 2)
        np.testing.assert_allclose(lowrank.gram(w0, deltas, rows_), want, rtol=1e-6, atol=1e-9)


def test_adapter_pairs_never_form_the_update():
    # a 10^5 x 10^5 update would be 40 GB in fp32: the Gram of two such adapters is computed
    # from the factors alone (and equals trace((B1^T B2)(A2 A1^T)), computed here differently)
    g = np.random.default_rng(1)
    n = 100_000
    a = lowrank.LowRank(g.standard_normal((n, 2)).astype(np.float32), g.standard_normal((2, n)).astype(np.float32), 2.0)
    b = lowrank.LowRank(g.standard_normal((n, 3)).astype(np.float32), g.standard_normal((3, n)).astype(np.float32), 0.5)
    got = lowrank.gram(np.empty((0, 0), np.float32), [a, b], 1)
    cross = np.trace((a.bm.T.astype(np.float64) @ b.bm) @ (b.am.astype(np.float64) @ a.am.T)) * 2.0 * 0.5
    np.testing.assert_allclose(got[0, 0, 1], cross, rtol=1e-9)


def test_cli_merges_adapters_both_ways(base_dir, adapters, tmp_path, capsys):
    assert main(["merge", str(base_dir), *map(str, adapters[:2]), "-o", str(tmp_path / "full"), "--quiet"]) == 0
    got = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    assert_relative(got, fp64_truth(base_dir, adapters[:2]), 1e-6)
    assert main(["merge", *map(str, adapters[:2]), "-o", str(tmp_path / "ad"), "--adapter", "--quiet"]) == 0
    assert_relative(materialized(base_dir, tmp_path / "ad"), fp64_truth(base_dir, adapters[:2]), 1e-5)


def test_uniform_method_on_adapters(base_dir, adapters, tmp_path):
    modelstock.merge_files(base_dir, adapters[:2], tmp_path / "u", method="uniform")
    fts = [materialized(base_dir, a) for a in adapters[:2]]
    want = {k: (fts[0][k] + fts[1][k]) / 2 for k in fts[0]}
    assert_relative(load_file(tmp_path / "u" / "model.safetensors"), want, 1e-6)


@pytest.mark.parametrize("kind", ["dora", "ia3", "loha", "lokr", "modules_to_save"])
def test_other_peft_types_are_refused_in_one_line(base_dir, adapters, tmp_path, kind):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    config = {"dora": lambda: peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
              "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
              "loha": lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"]),
              "lokr": lambda: peft.LoKrConfig(r=2, target_modules=["q_proj"]),
              "modules_to_save": lambda: peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                         modules_to_save=["lm_head"])}[kind]()
    peft.get_peft_model(model, config).save_pretrained(tmp_path / kind)
    want = {"dora": "DoRA", "ia3": "PEFT IA3 adapter", "loha": "PEFT LOHA adapter", "lokr": "PEFT LOKR adapter",
            "modules_to_save": "modules_to_save"}[kind]
    with pytest.raises(InputError, match=want) as e:
        modelstock.merge_files(base_dir, [adapters[0], tmp_path / kind], tmp_path / "o")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_mergekit_config_with_base_plus_lora(base_dir, adapters, tmp_path):
    from modelstock.mergekit import run_config

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"merge_method: model_stock\nbase_model: {base_dir}\nmodels:\n"
                   f"  - model: {base_dir}+{adapters[0]}\n  - model: {base_dir}+{adapters[1]}\n")
    run_config(cfg, tmp_path / "mk")
    got = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "mk").state_dict()
    # mergekit's model_stock is the authors' formula: no clamp
    assert_relative(got, fp64_truth(base_dir, adapters[:2], clamp=False), 1e-6)
    other = tmp_path / "other"
    full_finetune(base_dir, other)
    cfg.write_text(f"merge_method: model_stock\nbase_model: {base_dir}\nmodels:\n"
                   f"  - model: {other}+{adapters[0]}\n  - model: {base_dir}+{adapters[1]}\n")
    with pytest.raises(InputError, match="the LoRA's model must be the base_model"):
        run_config(cfg, tmp_path / "mk2")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.fc = torch.nn.Linear(12, 5)
        self.emb = torch.nn.Embedding(10, 4)


def test_conv_linear_embedding_adapters_of_a_plain_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    dirs = []
    for i, (r, targets) in enumerate([(2, ["conv", "fc"]), (3, ["conv", "emb"]), (1, ["fc", "emb", "conv"])]):
        m = Net()
        m.load_state_dict(base)
        pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=r + 1, target_modules=targets))
        randomize_lora(pm, 0.1)
        pm.save_pretrained(tmp_path / f"l{i}")
        dirs.append(tmp_path / f"l{i}")

    def applied(adapter_dir):
        m = Net().double()
        m.load_state_dict(base)
        return {k: v.double() for k, v in peft.PeftModel.from_pretrained(m, adapter_dir).merge_and_unload()
                .state_dict().items()}

    fts = [applied(d) for d in dirs]
    want = {k: spec_merge_fp64(w0.double(), [f[k] for f in fts], granularity="row")[0] for k, w0 in base.items()}
    modelstock.merge_files(tmp_path / "base.safetensors", dirs, tmp_path / "m.safetensors", granularity="row")
    assert_relative(load_file(tmp_path / "m.safetensors"), want, 1e-6)
    modelstock.merge_files(tmp_path / "base.safetensors", dirs, tmp_path / "ad", granularity="row", adapter=True)
    assert_relative(applied(tmp_path / "ad"), want, 1e-5)


def test_gpt2_fan_in_fan_out_adapters(tmp_path):
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    dirs = []
    for i, targets in enumerate([["c_attn"], ["c_attn", "c_fc"]]):
        torch.manual_seed(i + 1)
        pm = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                 peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets, fan_in_fan_out=True))
        randomize_lora(pm, 0.1)
        pm.save_pretrained(tmp_path / f"g{i}")
        dirs.append(tmp_path / f"g{i}")

    def applied(adapter_dir):
        m = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").double()
        return {k: v.double() for k, v in peft.PeftModel.from_pretrained(m, adapter_dir).merge_and_unload()
                .state_dict().items()}

    fts = [applied(d) for d in dirs]
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").state_dict()
    want = {k: spec_merge_fp64(w0.double(), [f[k] for f in fts])[0] for k, w0 in base.items()
            if w0.is_floating_point() and k in fts[0]}
    modelstock.merge_files(tmp_path / "base", dirs, tmp_path / "m")
    got = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").state_dict()
    assert_relative(got, want, 1e-6)
    modelstock.merge_files(tmp_path / "base", dirs, tmp_path / "ad", adapter=True)
    assert_relative(applied(tmp_path / "ad"), want, 1e-5)


def test_in_memory_merge_of_peft_models(base_dir, adapters, tmp_path):
    full = full_finetune(base_dir, tmp_path / "full")
    live = []
    for a in adapters[:2]:
        model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        live.append(peft.PeftModel.from_pretrained(model, a))
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    full_model = transformers.LlamaForCausalLM.from_pretrained(full)
    report = modelstock.MergeReport()
    got = modelstock.merge(base, [live[0], full_model, live[1]], report=report, granularity="row")
    assert_relative(got, fp64_truth(base_dir, [adapters[0], full, adapters[1]], "row"), 1e-6)
    assert report.n == 3 and len(report.layers) == len(got)
    with pytest.raises(InputError, match="merging in place works on full weights"):
        modelstock.InPlaceMerge([full_model], base, [live[0], full_model])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_in_a_weight_no_adapter_targets_is_named(base_dir, adapters, tmp_path, dtype):
    from safetensors.torch import save_file

    base = {k: v.to(dtype) for k, v in load_file(base_dir / "model.safetensors").items()}
    base["model.norm.weight"][3] = float("inf")
    save_file(base, tmp_path / "base.safetensors")
    with pytest.raises(InputError, match=r"base.safetensors: tensor 'model.norm.weight': holds NaN or inf"):
        modelstock.merge_files(tmp_path / "base.safetensors", adapters[:2], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_an_adapter_carrying_other_base_weights_is_refused(base_dir, adapters, tmp_path):
    import shutil

    from safetensors.torch import save_file

    changed = tmp_path / "b-trained-embedding"
    shutil.copytree(adapters[1], changed)
    tensors = load_file(changed / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 1e-3
    save_file(tensors, changed / "adapter_model.safetensors")
    with pytest.raises(InputError, match="carries its own 'model.embed_tokens.weight', which differs"):
        modelstock.merge_files(base_dir, [adapters[0], changed], tmp_path / "o")


def test_adapter_output_folder_is_put_in_place_as_every_output(base_dir, adapters, tmp_path, monkeypatch):
    """--adapter writes a folder like any folder output (io/atomic.py): built out of sight and put
    in place at the end, an existing adapter replaced only with force, a user's other files kept,
    and a merge that stops removes only its own private folder."""
    out = tmp_path / "merged-adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "adapter_config.json").write_text("{}")  # an earlier adapter someone keeps here
    with pytest.raises(modelstock.InputError, match="adapter_config.json"):
        modelstock.merge_files(None, adapters, out, adapter=True)
    assert (out / "adapter_config.json").read_text() == "{}" and sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "notes.txt"]
    modelstock.merge_files(None, adapters, out, adapter=True, force=True)
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "adapter_config.json").read_text())["r"]

    fresh = tmp_path / "fresh"
    from modelstock.io.writer import CheckpointWriter

    def another_process_then_ctrl_c(self, *args, **kwargs):
        fresh.mkdir(exist_ok=True)  # meanwhile another process makes the folder and writes in it
        (fresh / "notes.txt").write_text("theirs")
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointWriter, "commit", another_process_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        modelstock.merge_files(None, adapters, fresh, adapter=True)
    assert sorted(p.name for p in fresh.iterdir()) == ["notes.txt"]  # theirs kept, nothing of ours
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh")]
