#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine (its own torch and triton; nothing installed
# but the carried wheels in .whl/, e.g. open_clip for the model shapes):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
# 1. with SWEEP=1 only: a sweep of the merge kernels' two tuning knobs on ViT-bigG-14 (Triton
#    only), whose best setting the next steps then use;
# 2. the test suite with the Triton kernels on CUDA;
# 3. the GPU benchmarks: merge (Triton vs loop vs foreach), DynOPool (Triton vs reference vs
#    max_pool2d; with SWEEP=1 first a sweep of its kernels' elements/warps per program).
# Logs and JSON records go under $OUT (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"; } 2>&1 | tee "$OUT/gpu-env.txt"
status=0
best="" best_ms=""
configs=("2048 2" "4096 4" "8192 4" "16384 8")  # elements per program, warps
[ "${SWEEP:-0}" = 1 ] || configs=()
for cfg in "${configs[@]}"; do
    set -- $cfg
    mkdir -p /tmp/sweep
    MODELSTOCK_MERGE_ELEMS=$1 MODELSTOCK_MERGE_WARPS=$2 timeout 90 python3 benchmarks/gpu_merge.py \
        --models ViT-bigG-14 --only triton --out "$OUT" --tag="-sweep-$1-$2" > /tmp/sweep/log-$1-$2 2>&1 || continue
    ms=$(python3 -c "import json,glob; d=json.load(open(glob.glob('$OUT/*sweep-$1-$2-*.json')[0])); print(sum(c['ms']['triton'] for c in d['cases']))")
    echo "sweep elems=$1 warps=$2: $ms ms (bigG fp32 + bf16)" | tee -a "$OUT/gpu-sweep.txt"
    if [ -z "$best_ms" ] || python3 -c "import sys; sys.exit(0 if $ms < $best_ms else 1)"; then best="$1 $2"; best_ms=$ms; fi
done
if [ -n "$best" ]; then set -- $best; export MODELSTOCK_MERGE_ELEMS=$1 MODELSTOCK_MERGE_WARPS=$2; echo "best: $best" | tee -a "$OUT/gpu-sweep.txt"; fi
timeout 150 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -30 | tee "$OUT/gpu-tests.log" || status=1
timeout 200 python3 benchmarks/gpu_merge.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log" || status=1
dyn=("1024 4")
[ "${SWEEP:-0}" = 1 ] && dyn=("512 4" "1024 4" "2048 8")
for cfg in "${dyn[@]}"; do
    set -- $cfg
    tag=""; [ ${#dyn[@]} -gt 1 ] && tag="-sweep-$1-$2"
    MODELSTOCK_DYNOPOOL_ELEMS=$1 MODELSTOCK_DYNOPOOL_WARPS=$2 timeout 200 python3 benchmarks/gpu_dynopool.py \
        --out "$OUT" --tag="$tag" 2>&1 | tee -a "$OUT/gpu-bench-dynopool.log" || status=1
done
exit $status
