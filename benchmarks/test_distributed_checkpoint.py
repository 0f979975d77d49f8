"""Peak memory of a file merge whose inputs are torch.distributed.checkpoint folders, against the
same merge of the same tensors as safetensors files, in the same run.

    make bench        # or: pytest -q benchmarks/test_distributed_checkpoint.py --benchmark-only

Three checkpoints (base and two fine-tuned) of 8 fp32 tensors of 64 MiB (512 MiB each, 8x the
largest tensor), written by ``dcp.save`` in one process: every tensor one chunk, the worst case
for the reader (the checkpoint's reader loads a chunk whole, then copies it into the tensor).
Each merge runs in a child process that imports everything first, then resets its peak
resident size (``/proc/self/clear_refs``), merges, and reports the peak's growth over what it
held before (``VmHWM`` - ``VmRSS``). Record: ``benchmarks/results/cpu-merge-files-dcp-<date>.json``.
"""
import json
import os
import statistics
import subprocess
import sys

import torch

from .conftest import CACHE, figure, machine_record, save_record

ROUNDS = int(os.environ.get("MODELSTOCK_BENCH_ROUNDS", "3"))
TENSORS, ROWS, COLS = 8, 4096, 4096  # fp32: 64 MiB a tensor
MIB = 2**20

_CHILD = """
import json, sys, time
import modelstock, torch.distributed.checkpoint  # imported before the baseline: not the merge's memory

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from what is resident now
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
start = time.perf_counter()
modelstock.merge_files(sys.argv[1], sys.argv[2:-1], sys.argv[-1])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "growth": status("VmHWM") - before, "reset": reset}))
"""


def write_checkpoints(folder):
    """base, ft1, ft2: each as a DCP folder and as a safetensors file with the same tensors."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    names = ["base", "ft1", "ft2"]
    done = folder / "done"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        base = {f"layers.{i}.weight": torch.randn(ROWS, COLS, generator=g) for i in range(TENSORS)}
        shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
        for name in names:
            sd = base if name == "base" else {k: v + 1e-2 * (shared[k] + torch.randn(v.shape, generator=g))
                                              for k, v in base.items()}
            dcp.save({"model": sd}, checkpoint_id=folder / name, no_dist=True)
            save_file(sd, folder / f"{name}.safetensors")
            del sd
        done.touch()
    return [folder / n for n in names], [folder / f"{n}.safetensors" for n in names]


def run_merge(paths, out) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    out.unlink()
    return json.loads(done.stdout.splitlines()[-1])


def test_dcp_merge_peak_memory(benchmark, tmp_path):
    dcp_paths, st_paths = write_checkpoints(CACHE / f"dcp-{TENSORS}x{ROWS * COLS * 4 // MIB}MiB")
    largest = ROWS * COLS * 4
    inputs = len(dcp_paths)
    runs = {"dcp": [], "safetensors": []}

    def once():
        for key, paths in (("safetensors", st_paths), ("dcp", dcp_paths)):
            runs[key].append(run_merge(paths, tmp_path / "merged.safetensors"))

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)

    growth = {k: max(r["growth"] for r in v) for k, v in runs.items()}
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    input_bytes = {"dcp": sum(f.stat().st_size for p in dcp_paths for f in p.iterdir()),
                   "safetensors": sum(p.stat().st_size for p in st_paths)}
    # The bound: each input's tensor of the layer in flight (inputs x largest), one more while a
    # tensor is loaded (the chunk the reader loads, copied into the tensor), and the pipeline's
    # result buffer (the largest layer plus 32 MB of read-ahead): (inputs + 2) x largest + 32 MB,
    # with 64 MB over it for the allocator and the threads. The whole state is 8x more than one
    # tensor per input: a reader that held a checkpoint would be 3 x 512 MiB.
    bound = (inputs + 2) * largest + 96 * MIB
    record = {
        "suite": "merge_files", "case": "dcp-8x64MiB", **machine_record(), "rounds": ROUNDS,
        "inputs": inputs, "tensors_per_input": TENSORS, "largest_tensor_mib": largest // MIB,
        "input_bytes": input_bytes, "peak_rss_growth_mib": {k: round(v / MIB) for k, v in growth.items()},
        "peak_rss_growth_in_largest_tensors": {k: round(v / largest, 2) for k, v in growth.items()},
        "all_growth_mib": {k: [round(r["growth"] / MIB) for r in v] for k, v in runs.items()},
        "peak_reset": all(r["reset"] for v in runs.values() for r in v),
        "bound_mib": bound // MIB, "seconds": seconds,
        "gbps_read": {k: input_bytes[k] / seconds[k] / 1e9 for k in seconds},
        "ratio_vs": {"safetensors": {"growth": growth["dcp"] / growth["safetensors"],
                                     "seconds": seconds["dcp"] / seconds["safetensors"]}},
    }
    benchmark.extra_info.update(record)
    save_record(f"cpu-merge-files-dcp-{record['date']}.json", record)
    for key in ("dcp", "safetensors"):
        figure("3 x 8 x 64 MiB", f"peak RSS growth, {key} inputs", record["peak_rss_growth_mib"][key], "MiB",
               f"<= {bound // MIB} MiB" if key == "dcp" else "")
    figure("3 x 8 x 64 MiB", "time dcp / safetensors", record["ratio_vs"]["safetensors"]["seconds"], "x")
