"""Model Stock on LoRA adapters, natively, against merging the same models after peft's
merge_and_unload (issue 26): whole-process wall time and peak memory of

  baseline   modelstock merge BASE FT1 FT2 -o OUT        FT_i = the adapter applied to the base
                                                          (merge_and_unload, saved; not timed)
  full       modelstock merge BASE LORA1 LORA2 -o OUT     the merged model, from the factors
  adapter    modelstock merge LORA1 LORA2 --adapter -o OUT  the merged adapter

on a Llama-shaped model built from a config (random weights, bf16, a few hundred MB) with
rank-16 adapters on all 7 projections. Each command runs ``--repeats`` times (median), the files
in the page cache. Also recorded: the time peak merge_and_unload + save takes per adapter (what
the baseline needs before its merge). Targets: full <= 0.75x, adapter <= 0.15x the baseline.

    .venv/bin/python benchmarks/lora_merge.py [--layers 8] [--repeats 3] [--dir DIR]

The models are built by a process of their own, so that the timing parent stays small: a
child's peak RSS (``wait4``) counts its parent's pages up to its ``exec``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Children write and reuse bytecode caches, as a default Python does (this workplace sets
# PYTHONDONTWRITEBYTECODE, which would charge every run ~0.3 s of compiling)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(cmd) -> tuple[float, int]:
    """(wall seconds, peak RSS in MiB) of a command, as a fresh process."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - start
    err = p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{cmd} failed: {err}")
    return seconds, usage.ru_maxrss // 1024


def build(root: Path, layers: int, rank: int):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    unload = []
    for i in range(2):
        model = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        pm.save_pretrained(root / f"lora{i}")
        del pm, model
        start = time.perf_counter()
        base = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
        PeftModel.from_pretrained(base, root / f"lora{i}").merge_and_unload().save_pretrained(root / f"ft{i}")
        unload.append(time.perf_counter() - start)
    size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    return size, unload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--dir", help="build the models here and keep them (default: a temporary folder)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        size, unload = build(Path(args.dir), args.layers, args.rank)
        (Path(args.dir) / "built.json").write_text(json.dumps({"size": size, "unload": unload}))
        return
    py = [sys.executable, "-m", "modelstock", "merge", "--quiet", "--force"]
    with tempfile.TemporaryDirectory() as d:
        root = Path(args.dir or d)
        if not (root / "built.json").exists():
            subprocess.run([sys.executable, __file__, "--build-only", "--dir", str(root), "--layers", str(args.layers),
                            "--rank", str(args.rank)], check=True, stderr=subprocess.DEVNULL)
        built = json.loads((root / "built.json").read_text())
        size, unload = built["size"], built["unload"]
        cmds = {"baseline": py + [str(root / "base"), str(root / "ft0"), str(root / "ft1"), "-o", str(root / "o1")],
                "full": py + [str(root / "base"), str(root / "lora0"), str(root / "lora1"), "-o", str(root / "o2")],
                "adapter": py + [str(root / "lora0"), str(root / "lora1"), "--adapter", "-o", str(root / "o3")]}
        runs = {k: [] for k in cmds}
        for cmd in cmds.values():  # warm-up: bytecode caches written, files in the page cache
            run(cmd)
        for _ in range(args.repeats):  # interleaved, so a slow spell of the shared host hits all alike
            for k, cmd in cmds.items():
                runs[k].append(run(cmd))
        lora_bytes = sum(f.stat().st_size for f in (root / "lora0").glob("*.safetensors"))
    median = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    record = {
        "what": "modelstock merge of two rank-%d LoRA adapters (all 7 projections) of a Llama-shaped bf16 model, "
                "whole process, against the same merge of the adapters applied with merge_and_unload" % args.rank,
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.node()}: {os.cpu_count()} CPUs, shared and loaded (a 2-core VM with other jobs running): "
                "absolute times are noisy, the ratios are measured in the same run, interleaved",
        "python": platform.python_version(), "bytecode_cached": True, "warmup_runs": 1, "layers": args.layers, "base_bytes": size, "adapter_bytes": lora_bytes,
        "seconds": {k: [round(s, 3) for s, _ in v] for k, v in runs.items()},
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "peak_rss_mib": {k: max(m for _, m in v) for k, v in runs.items()},
        "merge_and_unload_and_save_seconds": [round(s, 3) for s in unload],
        "ratio_full": round(median["full"] / median["baseline"], 3),
        "ratio_adapter": round(median["adapter"] / median["baseline"], 3),
        "ratio_full_vs_baseline_with_unload": round(median["full"] / (median["baseline"] + sum(unload)), 3),
        "targets": {"ratio_full": 0.75, "ratio_adapter": 0.15},
    }
    out = Path(args.out) / f"cpu-lora-merge-{record['date']}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
