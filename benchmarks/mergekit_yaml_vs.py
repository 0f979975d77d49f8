"""`modelstock mergekit-yaml` against mergekit's own `mergekit-yaml` on the same config and the
same local Llama-style folders (transformers' LlamaForCausalLM, random weights): whole-process
time of each, and how far apart the merged weights are.

    MERGEKIT_YAML=/path/to/venv/bin/mergekit-yaml python benchmarks/mergekit_yaml_vs.py [--out DIR]

mergekit runs from its own virtualenv (it pins its own dependencies). Writes
cpu-mergekit-yaml-<date>.json: median seconds of ROUNDS interleaved runs each (page cache warm,
dirty pages flushed before each run), per tensor the largest relative difference
|ours - mergekit| / max|mergekit|, and the largest relative difference of each from the formula
evaluated in fp64 (these deltas are far above mergekit's eps floor, so eps plays no part).

Then configs as people publish them (``parameters: {normalize, int8_mask}``, per-model
``weight``, ``tokenizer_source: base`` and ``tokenizer: {source: base, pad_to_multiple_of}``
over a real tokenizer shorter than the embedding): each tool's tensor names and shapes, the
config's ``vocab_size`` and the largest weight difference; and every flag of the installed
``mergekit-yaml --help`` given to ``modelstock mergekit-yaml``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.conftest import machine_record  # noqa: E402

ROUNDS = 3


def build(root: Path, n: int = 2) -> list[Path]:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    shared = {k: torch.randn_like(v) for k, v in base.state_dict().items()}
    folders = []
    for i in range(n + 1):
        folder = root / ("base" if i == 0 else f"ft{i}")
        if not folder.exists():
            model = transformers.LlamaForCausalLM(cfg)
            model.load_state_dict(base.state_dict())
            if i:
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        p.add_(1e-2 * (0.6 * shared[k] + 0.4 * torch.randn_like(p)))
            model.save_pretrained(folder)
        folders.append(folder)
    return folders


def published(work: Path, folders: list[Path], mergekit: str) -> dict:
    """The two tools on configs as published, with a real tokenizer of 7000 tokens for the
    8000-row embedding (a padded vocabulary): names, shapes, vocab_size, largest difference."""
    from tests.test_mergekit_yaml import save_tokenizer

    for f in folders:
        save_tokenizer(f, 7000)
    cases = {
        "normalize_int8_mask_weight_tokenizer_source": "tokenizer_source: base\n",
        "tokenizer_pad_to_multiple_of_64": "tokenizer:\n  source: base\n  pad_to_multiple_of: 64\n",
    }
    results = {}
    for name, tokenizer in cases.items():
        config = work / f"{name}.yml"
        config.write_text(f"merge_method: model_stock\nbase_model: {folders[0]}\nmodels:\n"
                          f"  - model: {folders[1]}\n    parameters:\n      weight: 1.0\n  - model: {folders[2]}\n"
                          f"parameters:\n  normalize: true\n  int8_mask: true\n{tokenizer}dtype: float32\n")
        outs = {key: work / f"out-{name}-{key}" for key in ("modelstock", "mergekit")}
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "modelstock", "mergekit-yaml", str(config), str(outs["modelstock"]),
                        "--quiet"], check=True)
        subprocess.run([mergekit, str(config), str(outs["mergekit"])], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        w = {k: weights(v) for k, v in outs.items()}
        shapes = {k: {n: list(t.shape) for n, t in v.items()} for k, v in w.items()}
        vocab = {k: json.loads((v / "config.json").read_text())["vocab_size"] for k, v in outs.items()}
        same = shapes["modelstock"] == shapes["mergekit"]
        diff = max(float((w["modelstock"][n].double() - t.double()).abs().max() / t.double().abs().max())
                   for n, t in w["mergekit"].items()) if same else None
        results[name] = {"same_names_and_shapes": same, "vocab_size": vocab,
                         "embed_rows": {k: v["model.embed_tokens.weight"][0] for k, v in shapes.items()},
                         "max_rel_diff": diff}
        assert same and vocab["modelstock"] == vocab["mergekit"], results[name]
    return results


def flags_accepted(mergekit: str) -> dict:
    """Every option the installed mergekit-yaml's --help lists, given to ours: accepted?"""
    import re

    from modelstock import cli

    text = subprocess.run([mergekit, "--help"], capture_output=True, text=True).stdout
    text = re.sub(r"-\n\s+", "-", text)  # a flag wrapped across lines
    flags = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b", text)) - {"--help"})
    takes_value = {f for f in flags if re.search(re.escape(f) + r"(?:, --[a-z][a-z0-9-]*)? (?:TEXT|INTEGER|SIZE)", text)}
    parser = cli._parser()
    accepted = {}
    for flag in flags:
        argv = ["mergekit-yaml", "c.yml", "out", flag] + (["2"] if flag in takes_value else [])
        try:
            parser.parse_args(argv)
            accepted[flag] = True
        except SystemExit:
            accepted[flag] = False
    assert all(accepted.values()), [f for f, ok in accepted.items() if not ok]
    return accepted


def timed(argv) -> float:
    os.sync()
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def weights(folder: Path) -> dict:
    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(f))
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="/tmp/modelstock-mergekit")
    args = ap.parse_args()
    mergekit = os.environ["MERGEKIT_YAML"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = build(work)
    config = work / "model_stock.yml"
    config.write_text("merge_method: model_stock\n"
                      f"base_model: {folders[0]}\n"
                      "models:\n" + "".join(f"  - model: {f}\n" for f in folders[1:]) + "dtype: float32\n")
    outs = {"modelstock": work / "out-modelstock", "mergekit": work / "out-mergekit"}
    argv = {"modelstock": [sys.executable, "-m", "modelstock", "mergekit-yaml", str(config), str(outs["modelstock"]),
                           "--quiet", "--force"],
            "mergekit": [mergekit, str(config), str(outs["mergekit"]), "--lazy-unpickle"]}
    times = {k: [] for k in argv}
    for _ in range(ROUNDS):
        for key in argv:
            shutil.rmtree(outs[key], ignore_errors=True)
            times[key].append(timed(argv[key]))
    ours, theirs = weights(outs["modelstock"]), weights(outs["mergekit"])
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    rel = {k: float((ours[k].double() - theirs[k].double()).abs().max() / theirs[k].double().abs().max())
           for k in ours}
    # each against the formula in fp64 (mergekit's: cos clipped to [-1, 1] only), to say whose
    # rounding a difference is
    inputs = [weights(f) for f in folders]
    vs_fp64 = {"modelstock": 0.0, "mergekit": 0.0}
    for k in ours:
        w0, ws = inputs[0][k].double(), [w[k].double() for w in inputs[1:]]
        ds = [(w - w0).flatten() for w in ws]
        cos = (ds[0] @ ds[1]) / (ds[0].norm() * ds[1].norm())
        t = 2 * cos / (1 + cos)
        want = w0 + t * ((ws[0] + ws[1]) / 2 - w0)
        for key, got in (("modelstock", ours[k]), ("mergekit", theirs[k])):
            vs_fp64[key] = max(vs_fp64[key], float((got.double() - want).abs().max() / want.abs().max()))
    seconds = {k: statistics.median(v) for k, v in times.items()}
    record = {"suite": "mergekit_yaml", **machine_record(), "rounds": ROUNDS,
              "model": "LlamaForCausalLM hidden 512, 8 layers, vocab 8000, fp32, N = 2",
              "input_bytes": sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors")),
              "seconds": seconds, "ratio_vs_mergekit": seconds["modelstock"] / seconds["mergekit"],
              "max_rel_diff": max(rel.values()), "max_rel_diff_vs_fp64_formula": vs_fp64,
              "max_rel_diff_per_tensor": rel,
              "published_configs": published(work, folders, mergekit), "mergekit_flags_accepted": flags_accepted(mergekit)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu-mergekit-yaml-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("seconds", "ratio_vs_mergekit", "max_rel_diff",
                                               "max_rel_diff_vs_fp64_formula")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
