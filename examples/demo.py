"""`make demo`: both papers end to end on real data, on the CPU, in a few minutes, no download.

Model Stock: a tiny vision transformer with open_clip's own architecture is pre-trained on a
broad version of a digit task (scikit-learn's digits with random rotations, noise, blur and
inversion), fine-tuned twice on the clean task (different seeds and data order), and merged by
the `modelstock merge` command, file to file, as a user would. The table compares, as in the
paper: the pre-trained model, each fine-tuned model, their uniform average, WiSE-FT (0.5
between pre-trained and one fine-tuned model), Model Stock after training and Model Stock
during training (PeriodicMerge at every epoch end); on the held-out set (ID) and four shifted
copies of it (OOD).

DynOPool: a small CNN with 2x2 max pooling, the same with DynOPool2d, and with DynOPool2d plus
the compute-cost loss at a budget below the baseline's MACs: accuracy, MACs and learned scales.

Whatever the numbers show is reported as it is. Outputs: demo-output/ (results.md, results.json,
id_vs_ood.png, layers.png, dynopool.png, report.json, the checkpoints).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The same figures on every run: fixed seeds, deterministic algorithms and a fixed thread count
# (main()); and, set before torch loads, the x86 code paths pinned to AVX2 for torch's own
# kernels, MKL and oneDNN, which otherwise pick by the CPU (AVX-512 or not), each rounding its
# own way. A variable the user set wins.
THREADS = 2
PINNED = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
if platform.machine().lower() in ("x86_64", "amd64"):
    PINNED.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2,STRICT", ONEDNN_MAX_CPU_ISA="AVX2")
for _name, _value in PINNED.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import demo_lib as L  # noqa: E402

FULL = dict(pre_epochs=30, ft_epochs=12, cnn_epochs=40, limit=None)
QUICK = dict(pre_epochs=1, ft_epochs=1, cnn_epochs=1, limit=240)


def model_stock_part(data, out: Path, budget: dict, log) -> list[dict]:
    import modelstock

    torch.manual_seed(0)
    pre = L.TinyViT()
    _, t = L.seconds(lambda: L.train([pre], data, epochs=budget["pre_epochs"], lr=2e-3, seeds=[0], augment=True))
    log(f"pre-trained the tiny ViT on the broad task in {t:.1f} s")
    fts = [copy.deepcopy(pre) for _ in range(2)]
    _, t = L.seconds(lambda: L.train(fts, data, epochs=budget["ft_epochs"], lr=1e-3, seeds=[1, 2]))
    log(f"fine-tuned two copies in {t:.1f} s")
    paths = [out / f"vit-{name}.safetensors" for name in ("pretrained", "ft1", "ft2")]
    for path, m in zip(paths, [pre, *fts]):
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)

    merged_path = out / "vit-model-stock.safetensors"
    cmd = [sys.executable, "-m", "modelstock", "merge", *map(str, paths), "-o", str(merged_path),
           "--report", str(out / "report.json"), "--plot", str(out / "layers.png"), "--force"]
    log("$ modelstock merge " + " ".join(str(a) for a in cmd[4:]))
    subprocess.run(cmd, check=True)
    merge_seconds = json.loads((out / "report.json").read_text())["seconds"]

    def with_weights(sd):
        m = copy.deepcopy(pre)
        m.load_state_dict(sd)
        return m

    # the paper's baselines, as merge methods of the same library (modelstock/methods)
    uniform = modelstock.merge(pre, fts, method="uniform")
    wise = modelstock.merge(pre, fts[:1], method=modelstock.methods.WiseFT(alpha=0.5))

    during = [copy.deepcopy(pre) for _ in range(2)]
    periodic = modelstock.PeriodicMerge(pre, during)
    merge_time = [0.0]

    def merge_now():
        _, t = L.seconds(periodic.merge)
        merge_time[0] += t

    L.train(during, data, epochs=budget["ft_epochs"], lr=1e-3, seeds=[3, 4], on_epoch_end=merge_now)
    log(f"Model Stock during training: {periodic.merges} merges, {merge_time[0]:.3f} s merging")

    rows = [("Pre-trained", pre, 0, None), ("Fine-tuned #1", fts[0], 1, None), ("Fine-tuned #2", fts[1], 1, None),
            ("Uniform average of #1, #2", with_weights(uniform), 2, None),
            ("WiSE-FT (0.5, #1)", with_weights(wise), 1, None),
            ("Model Stock (after training)", with_weights(load_file(merged_path)), 2, merge_seconds),
            ("Model Stock (during training)", during[0], 2, merge_time[0])]
    return [{"method": name, **L.evaluate(m, data), "models fine-tuned": n, "merge s": t} for name, m, n, t in rows]


def dynopool_part(data, budget: dict, log) -> list[dict]:
    from dynopool import ComputeCostLoss, DynOPool2d, count_macs, replace_pooling

    shape = (1, 1, L.SIZE, L.SIZE)
    results = []
    torch.manual_seed(0)
    base = L.SmallCNN()
    L.train([base], data, epochs=budget["cnn_epochs"], lr=2e-3, seeds=[5])
    base_macs = int(count_macs(base, shape).detach())
    results.append({"model": "CNN, 2x2 max pooling", **L.evaluate(base, data), "MACs": base_macs, "scales": []})
    for label, with_cost in (("CNN, DynOPool", False), ("CNN, DynOPool + cost loss (budget 0.6x)", True)):
        torch.manual_seed(0)
        model = L.SmallCNN()
        replace_pooling(model, shape)
        extra = ComputeCostLoss(model, shape, budget=0.6 * base_macs, weight=1.0) if with_cost else None
        L.train([model], data, epochs=budget["cnn_epochs"], lr=2e-3, seeds=[5], extra_loss=extra)
        pools = [m for m in model.modules() if isinstance(m, DynOPool2d)]
        scales = [[round(1 / a, 3) for a in p.alpha.detach().tolist()] for p in pools]
        macs = int(count_macs(model, shape).detach())
        results.append({"model": label, **L.evaluate(model, data), "MACs": macs, "scales": scales})
        log(f"{label}: scales per layer (h, w) {scales}, MACs {macs:,} (baseline {base_macs:,})")
    return results


def table(rows, columns) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 1 else f"{v:.3f}"
        if isinstance(v, int) and v > 9999:
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def pictures(ms_rows, dyno_rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in ms_rows:
        ax.scatter(r["ID"], r["OOD mean"], s=60)
        ax.annotate(r["method"], (r["ID"], r["OOD mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("ID accuracy (%)")
    ax.set_ylabel("OOD mean accuracy (%)")
    ax.set_title("Digits, tiny open_clip ViT: ID vs OOD")
    fig.tight_layout()
    fig.savefig(out / "id_vs_ood.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    labels = [r["model"] for r in dyno_rows[1:]]
    for i, r in enumerate(dyno_rows[1:]):
        ax.bar([j + 0.35 * i for j in range(len(r["scales"]))], [s[0] for s in r["scales"]], width=0.35, label=labels[i])
    ax.axhline(0.5, color="0.5", lw=0.8, ls="--", label="2x2 max pooling (scale 0.5)")
    ax.set_xticks([j + 0.175 for j in range(len(dyno_rows[1]["scales"]))],
                  [f"DynOPool {j + 1}" for j in range(len(dyno_rows[1]["scales"]))])
    ax.set_ylabel("learned scale factor (h)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dynopool.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few batches only (the smoke test)")
    ap.add_argument("--out", default=os.environ.get("DEMO_OUTPUT", "demo-output"))
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    data = L.load_data(limit=budget["limit"])
    log(f"digits: {len(data.train_x)} train, {len(data.test_x)} held-out; OOD: {', '.join(data.ood)}")
    ms_rows = model_stock_part(data, out, budget, log)
    dyno_rows = dynopool_part(data, budget, log)
    ood = list(data.ood)
    text = ("## Model Stock (tiny open_clip ViT on digits)\n\n"
            + table(ms_rows, ["method", "ID", *ood, "OOD mean", "models fine-tuned", "merge s"])
            + "\n\n## DynOPool (small CNN on digits)\n\n"
            + table(dyno_rows, ["model", "ID", "OOD mean", "MACs", "scales"])
            + f"\n\n(`make demo`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
              f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} kernels, "
              f"{time.perf_counter() - start:.0f} s in all)\n")
    print("\n" + text)
    (out / "results.md").write_text(text)
    setup = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
             "deterministic": torch.are_deterministic_algorithms_enabled()}
    (out / "results.json").write_text(json.dumps({"model_stock": ms_rows, "dynopool": dyno_rows, "setup": setup},
                                                 indent=1))
    pictures(ms_rows, dyno_rows, out)
    log(f"wrote {out}/results.md, results.json, id_vs_ood.png, layers.png, dynopool.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
