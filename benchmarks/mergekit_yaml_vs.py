"""`modelstock mergekit-yaml` against mergekit's own `mergekit-yaml` on the same config and the
same local Llama-style folders (transformers' LlamaForCausalLM, random weights): whole-process
time of each, and how far apart the merged weights are.

    MERGEKIT_YAML=/path/to/venv/bin/mergekit-yaml python benchmarks/mergekit_yaml_vs.py [--out DIR]

mergekit runs from its own virtualenv (it pins its own dependencies). Writes
cpu-mergekit-yaml-<date>.json: median seconds of ROUNDS interleaved runs each (page cache warm,
dirty pages flushed before each run), per tensor the largest relative difference
|ours - mergekit| / max|mergekit|, and the largest relative difference of each from the formula
evaluated in fp64 (these deltas are far above mergekit's eps floor, so eps plays no part).
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
              "max_rel_diff_per_tensor": rel}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu-mergekit-yaml-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("seconds", "ratio_vs_mergekit", "max_rel_diff",
                                               "max_rel_diff_vs_fp64_formula")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
