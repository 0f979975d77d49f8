"""Fingerprint of what existing merges produce: output bytes (sha256), exit codes, error lines and
report figures of several CLI merges, and the bytes of in-memory merges (reference, Triton kernels
under the interpreter, the GPU file pipeline on CPU tensors, periodic merging, two gloo ranks).

Run on two commits and compare the printed JSON: a refactor that must change nothing (issue 26's
merge-method contract) shows an identical fingerprint.

    python benchmarks/fingerprint_merges.py > after.json     # on the branch
    PYTHONPATH=/tmp/main-checkout python benchmarks/fingerprint_merges.py > before.json
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def sha(path: Path, tmp: Path | None = None) -> str:
    """Of a file's bytes (a folder: of each file); ``tmp``: the temporary folder's name,
    which configs and model cards quote, replaced by TMP first."""
    if path.is_dir():
        return {p.name: sha(p, tmp) for p in sorted(path.iterdir())}
    data = path.read_bytes()
    if tmp is not None and path.suffix in (".md", ".yml"):
        data = data.replace(str(tmp).encode(), b"TMP")
    return hashlib.sha256(data).hexdigest()[:16]


def tensors_sha(sd) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(k.encode() + str(v.dtype).encode() + v.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def models(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"emb.weight": torch.randn(37, 24, generator=g), "fc.weight": torch.randn(24, 24, generator=g),
            "fc.bias": torch.randn(24, generator=g), "ln.weight": torch.ones(24), "scale": torch.tensor([2.5]),
            "bn.num_batches_tracked": torch.tensor(3)}
    fts = []
    for i in range(n):
        f = {k: (v + 1e-2 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in base.items()}
        f["scale"] = base["scale"] + (0.1 if i % 2 else -0.1)
        fts.append(f)
    fts[-1]["bn.num_batches_tracked"] = torch.tensor(7)
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    return cast(base), [cast(f) for f in fts]


def save(tmp: Path, tag, base, fts):
    paths = []
    for i, sd in enumerate([base, *fts]):
        p = tmp / f"{tag}{i}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
    return paths


def cli(args, cwd):
    r = subprocess.run([sys.executable, "-m", "modelstock", *args], cwd=cwd, capture_output=True, text=True)
    err = [line.replace(str(cwd), "TMP") for line in r.stderr.splitlines() if line.startswith("modelstock:")]
    return {"rc": r.returncode, "stderr": err}


def report_figures(path: Path):
    d = json.loads(path.read_text())
    for k in ("seconds", "inputs", "output"):
        d.pop(k, None)
    return d


def cli_cases(tmp: Path) -> dict:
    out = {}
    base, fts = models(2)
    p2 = save(tmp, "a", base, fts)
    b3, f3 = models(3, torch.bfloat16, seed=1)
    p3 = save(tmp, "b", b3, f3)
    cases = {
        "default": [*p2, "-o", "o1.safetensors", "--report", "r1.json"],
        "row-noclamp-fp16": [*p3, "-o", "o2.safetensors", "--granularity", "row", "--no-clamp", "--dtype", "fp16",
                             "--report", "r2.json"],
        "exclude-base-ints": [*p3, "-o", "o3.safetensors", "--exclude", "ln.*", "--int-tensors", "base",
                              "--report", "r3.json"],
        "pt-output": [*p2, "-o", "o4.pt"],
        "shards": [*p3, "-o", "o5.safetensors", "--shard-size", "2KB"],
        "one-finetuned": [*p2[:2], "-o", "e1.safetensors"],
        "output-is-input": [*p2, "-o", p2[1]],
        "int-refuse": [*p3, "-o", "e2.safetensors", "--int-tensors", "refuse"],
        "bad-exclude": [*p2, "-o", "o6.safetensors", "--exclude", "nothing.*"],
    }
    # a NaN, a shape mismatch, a missing tensor, an undefined ratio
    nan = dict(fts[1])
    nan["fc.weight"] = nan["fc.weight"].clone()
    nan["fc.weight"][3, 4] = float("nan")
    save_file(nan, str(tmp / "nan.safetensors"))
    cases["nan"] = [p2[0], p2[1], str(tmp / "nan.safetensors"), "-o", "e3.safetensors"]
    bad = dict(fts[1])
    bad["fc.bias"] = torch.zeros(23)
    save_file(bad, str(tmp / "shape.safetensors"))
    cases["shape"] = [p2[0], p2[1], str(tmp / "shape.safetensors"), "-o", "e4.safetensors"]
    miss = {k: v for k, v in fts[1].items() if k != "fc.bias"}
    save_file(miss, str(tmp / "miss.safetensors"))
    cases["missing"] = [p2[0], p2[1], str(tmp / "miss.safetensors"), "-o", "e5.safetensors"]
    cases["missing-base"] = [p2[0], p2[1], str(tmp / "miss.safetensors"), "-o", "o7.safetensors", "--missing", "base"]
    opp = dict(fts[0])
    opp["scale"] = base["scale"] - (fts[1]["scale"] - base["scale"])
    save_file(opp, str(tmp / "opp.safetensors"))
    cases["undefined-noclamp"] = [p2[0], str(tmp / "opp.safetensors"), p2[2], "-o", "e6.safetensors", "--no-clamp"]
    for name, args in cases.items():
        res = cli(["merge", *args, "--quiet"], tmp)
        o = args[args.index("-o") + 1]
        if res["rc"] == 0:
            outs = sorted(tmp.glob(Path(o).stem + "*"))
            res["out"] = {p.name: sha(p) for p in outs}
        rep = [a for a in args if a.endswith(".json")]
        if rep and (tmp / rep[0]).exists():
            res["report"] = report_figures(tmp / rep[0])
        out[name] = res
    # a Hugging Face folder and a mergekit config
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    torch.manual_seed(0)
    m0 = LlamaForCausalLM(cfg)
    folders = []
    for i in range(3):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(m0.state_dict())
        if i:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1e-2 * torch.randn_like(p))
        m.save_pretrained(tmp / f"hf{i}")
        folders.append(str(tmp / f"hf{i}"))
    res = cli(["merge", *folders, "-o", "hfout", "--quiet"], tmp)
    res["out"] = sha(tmp / "hfout") if res["rc"] == 0 else None
    out["hf-folder"] = res
    (tmp / "mk.yml").write_text(f"merge_method: model_stock\nbase_model: {folders[0]}\nmodels:\n"
                                f"  - model: {folders[1]}\n  - model: {folders[2]}\ndtype: bfloat16\n")
    res = cli(["mergekit-yaml", "mk.yml", "mkout", "--quiet"], tmp)
    res["out"] = sha(tmp / "mkout", tmp) if res["rc"] == 0 else None
    out["mergekit"] = res
    return out


def python_cases(tmp: Path) -> dict:
    import modelstock
    from modelstock.merging import gpu_pipeline

    out = {}
    base, fts = models(3)
    rep = modelstock.MergeReport()
    out["merge"] = tensors_sha(modelstock.merge(base, fts, report=rep))
    out["merge-report"] = [(s.name, s.t, s.cos, s.norms) for s in rep.layers]
    out["merge-row-fp64"] = tensors_sha(modelstock.merge(base, fts, granularity="row", compute_dtype=torch.float64,
                                                         clamp=False, out_dtype=torch.bfloat16))
    out["merge-triton"] = tensors_sha(modelstock.merge(base, fts, backend="triton", exclude=["ln.*"]))
    out["merge-triton-row"] = tensors_sha(modelstock.merge(base, fts, backend="triton", granularity="row"))
    b16, f16 = models(2, torch.bfloat16, seed=2)
    out["merge-triton-bf16"] = tensors_sha(modelstock.merge(b16, f16, backend="triton"))
    targets = [{k: v.clone() for k, v in f.items()} for f in fts]
    modelstock.merge_(targets, base, targets)
    out["merge_"] = tensors_sha(targets[0])
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(2)]
    pre = {k: v.clone() for k, v in nets[0].state_dict().items()}
    nets[1].load_state_dict(pre)
    pm = modelstock.PeriodicMerge(pre, nets, every=2)
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    for step in range(4):
        for i, (n, o) in enumerate(zip(nets, opts)):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(10 * step + i))
            loss = n(x).pow(2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
        pm.step()
    out["periodic"] = tensors_sha(nets[0].state_dict())
    paths = save(tmp, "py", base, fts)
    r = modelstock.merge_files(paths[0], paths[1:], tmp / "py.safetensors", granularity="row")
    out["merge_files"] = sha(tmp / "py.safetensors")
    out["merge_files-summary-layers"] = [(s.name, s.kind, s.t) for s in r.layers]
    gpu_pipeline.check_device = lambda device: torch.device("cpu")
    modelstock.merge_files(paths[0], paths[1:], tmp / "dev.safetensors", device="cuda", backend="triton",
                           chunk_size=600, exclude=["ln.*"])
    out["gpu-pipeline"] = sha(tmp / "dev.safetensors")
    out["sharded"] = sharded(tmp)
    return out


def _rank(rank, world, init, tmp):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import modelstock

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Linear(12, 7))
    pre = {k: v.clone() for k, v in base.state_dict().items()}
    nets = []
    for i in range(2):
        m = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Linear(12, 7))
        m.load_state_dict(pre)
        with torch.no_grad():
            g = torch.Generator().manual_seed(i + 1)
            for p in m.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
        fully_shard(m)
        nets.append(m)
    for gran in ("tensor", "row"):
        modelstock.merge_(nets, pre, nets, granularity=gran)
    full = {k: v.full_tensor() for k, v in nets[0].state_dict().items()}
    if rank == 0:
        torch.save(full, f"{tmp}/sharded.pt")
    dist.destroy_process_group()


def sharded(tmp: Path) -> str:
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return tensors_sha(torch.load(tmp / "sharded.pt"))


def main():
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {"cli": cli_cases(tmp), "python": python_cases(tmp)}
    json.dump(result, sys.stdout, indent=1, sort_keys=True, default=str)
    print()


if __name__ == "__main__":
    main()
